"""Keras -> full-integer .tflite -> packed ternary targets. ``convert`` returns bytes; ``export`` writes files.

Targets (``TARGETS``):

* ``int8``:   stock full-integer TFLite; ternary weights are int8 ``{-127, 0, 127}`` per output channel.
* ``micro``:  the int8 file with its weights encoded for TFLM's ``TFLM_DECODE`` op (2-bit LUT by default),
  without the quantization parameters no TFLM kernel reads (``trim_for_tflm``). The LUT needs ternary kernels;
  with encoding ``huffman``, ``prune`` or ``auto`` any int8 model (for example a magnitude-pruned one) is
  encoded, each weight tensor by whatever encoding it allows.
* ``litert``: INT2 FULLY_CONNECTED and INT4 CONV_2D / DEPTHWISE_CONV_2D weights (stock LiteRT only).
* ``int4``:   INT4 weights everywhere, fully connected weights with one scale per tensor (LiteRT and TFLM).
* ``ethos-u``: the ``int8`` file compiled by Arm's Vela for an Ethos-U NPU (``ethosu``; options ``accelerator``,
  ``system_config``, ``memory_mode``, ``optimise``). Any int8 model compiles; ternary weights encode smallest.

Packing int8 ``±q`` to ``±L`` keeps every weight product exact: the weight scale becomes ``s_w * q / L`` and the int32
bias is rounded to ``round(b * L / q)`` with scale ``s_in * s_w * q / L`` (``q`` = 127 for converter output).
"""

from __future__ import annotations

import collections.abc
import contextlib
import io
import warnings
from dataclasses import dataclass, field

import numpy as np

from . import channels, decode, ethosu, flatbuffer, micro, slim, split

__all__ = [
    "TARGETS",
    "ENCODINGS",
    "ExportError",
    "RamFit",
    "convert",
    "float_tflite",
    "int8_tflite",
    "check_layers",
    "needs_ternary",
    "check_ternary",
    "pack",
    "unpack",
    "pack_signed",
    "unpack_signed",
    "trim_for_tflm",
    "strip_names",
]

TARGETS = ("int8", "micro", "litert", "int4", "ethos-u")
ENCODINGS = ("lut", "huffman", "prune", "huffman_group", "auto")
WEIGHT_OPS = ("FULLY_CONNECTED", "CONV_2D", "DEPTHWISE_CONV_2D")
# Ops with a constant weight operand that no packed target knows how to store.
_UNPACKABLE_OPS = ("TRANSPOSE_CONV", "BATCH_MATMUL", "CONV_3D", "EMBEDDING_LOOKUP", "UNIDIRECTIONAL_SEQUENCE_LSTM")
# Weight levels per packed type: (schema type, bits, L) with values in {-L, 0, L}.
_LOWBIT = {"INT4": (17, 4, 7), "INT2": (19, 2, 1)}
_PACKED_TYPE = {
    "litert": {"FULLY_CONNECTED": "INT2", "CONV_2D": "INT4", "DEPTHWISE_CONV_2D": "INT4"},
    "int4": {"FULLY_CONNECTED": "INT4", "CONV_2D": "INT4", "DEPTHWISE_CONV_2D": "INT4"},
}
DEFAULT_NUM_SAMPLES = 100

S = flatbuffer.schema


class ExportError(ValueError):
    """The model cannot be exported to the requested target (the message names the layer or tensor)."""


# ----------------------------------------------------------------------------- options and inputs
def byte_count(value, name: str, what: str) -> int | None:
    """``value`` validated as None or a positive int of bytes; ``what`` says what it counts, with an example."""
    if value is None:
        return None
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive number of bytes ({what}) or None, got {value!r}.")
    return int(value)


AUTO = "auto"
AUTO_DECODE_FLOOR = 16384  # max_decode_bytes="auto" never splits a weight tensor of at most this many bytes


def check_max_decode_bytes(max_decode_bytes) -> int | str | None:
    """``max_decode_bytes`` validated: ``"auto"``, None (no split) or a positive int."""
    if isinstance(max_decode_bytes, str) and max_decode_bytes == AUTO:
        return AUTO
    return byte_count(max_decode_bytes, "max_decode_bytes", 'e.g. 16384, or "auto"')


def auto_decode_bytes(int8: bytes) -> int:
    """The split bound ``max_decode_bytes="auto"`` picks for a model: half of its ``int8`` file's TFLM arena (the
    activations' own need, from TFLM's allocation report), at least ``AUTO_DECODE_FLOOR``. The decode buffer then
    adds at most about half to the arena, and a layer splits into few parts (each part costs per-op memory)."""
    arena = micro._report_total(micro.allocation_report(int8))
    return max(AUTO_DECODE_FLOOR, arena // 2 // 1024 * 1024)


def _check_options(target: str, encoding: str, num_samples: int) -> None:
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of {list(TARGETS)}.")
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r}; choose one of {list(ENCODINGS)} (used by target 'micro').")
    if target == "ethos-u" and not ethosu.available():
        raise ExportError(f"target 'ethos-u': {ethosu.missing_message()}")
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}.")


def plain_model(model):
    """The plain model to convert (tf_keras or Keras 3): ``ptq_keras.strip(model)`` if ternarized, else ``model``."""
    from ptq_keras import frontends
    from ptq_keras.frontends.detect import check_keras_model, check_tensorflow_backend, is_keras3

    check_keras_model(model)
    if is_keras3(model):
        check_tensorflow_backend("Exporting to TensorFlow Lite")
    if frontends.is_ternarized(model):
        # Converting the tfmot-wrapped model directly gives wrong int32 bias scales: always go through strip.
        return frontends.plain_copy(model)
    return model


def samples(data, model, limit: int = DEFAULT_NUM_SAMPLES, what: str = "representative_data") -> np.ndarray:
    """Up to ``limit`` float32 input samples, shaped ``(n, *input_shape[1:])``, from an array, a tf.data.Dataset
    (of inputs or ``(inputs, labels)``, batched or not), a generator / iterable, or a callable returning one."""
    if data is None:
        raise ValueError(
            f"{what} is required for the integer targets: pass ~100 typical model inputs as a numpy array shaped "
            f"like the model input {_input_shape(model)}, a tf.data.Dataset of inputs or (inputs, labels), or a "
            "generator of input batches (activation ranges are calibrated on it)."
        )
    if len(model.inputs) != 1:
        raise ValueError(f"model {model.name!r} has {len(model.inputs)} inputs; the exporter supports one input.")
    shape = _input_shape(model)
    rank = len(shape)
    if callable(data) and not hasattr(data, "__iter__"):
        data = data()
    if isinstance(data, np.ndarray) or hasattr(data, "numpy") and not hasattr(data, "element_spec"):
        items = [np.asarray(data)]
    elif isinstance(data, collections.abc.Iterable):
        items = data
    else:
        raise TypeError(f"{what}: expected a numpy array, a tf.data.Dataset or a generator, got {type(data).__name__}.")
    out, count = [], 0
    for item in items:
        if isinstance(item, dict):
            raise TypeError(f"{what}: dict elements are not supported; give the input array (or (inputs, labels)).")
        if isinstance(item, (tuple, list)):
            item = item[0]
        x = np.asarray(item, dtype=np.float32)
        if x.ndim == rank - 1:
            x = x[None]
        if x.ndim != rank or any(d is not None and d != s for d, s in zip(shape[1:], x.shape[1:])):
            raise ValueError(f"{what}: a sample of shape {x.shape} does not fit the model input {shape}.")
        out.append(x[: limit - count])
        count += len(out[-1])
        if count >= limit:
            break
    if count == 0:
        raise ValueError(f"{what} gave no sample.")
    return np.concatenate(out)


def _input_shape(model) -> tuple:
    return tuple(model.inputs[0].shape)


# ----------------------------------------------------------------------------- the Keras side
def needs_ternary(target: str, encoding: str = "lut") -> bool:
    """Whether ``target`` (with ``encoding``) stores only ternary kernels: ``litert``, ``int4`` and ``micro`` with
    the 2-bit LUT. ``micro`` with ``huffman``, ``prune`` or ``auto`` encodes any int8 weights."""
    return target not in ("int8", "ethos-u") and not (target == "micro" and encoding != "lut")


def check_layers(model, target: str, encoding: str = "lut") -> list[str]:
    """Raise ``ExportError`` naming a layer whose weights ``target`` cannot store as exact ternary values.

    Target ``micro`` with the LUT keeps the kernels of layers that are not ternary (``keep_float``,
    ``ternarize(precision="mixed")``) as plain int8 when at least one layer is ternary: it returns their names
    (and warns, naming them); a model with no ternary layer is refused as for the other packed targets."""
    if not needs_ternary(target, encoding):
        return []
    from ptq_keras.activations import is_activation_quantizer
    from ptq_keras.core.layers import kernel_attributes
    from ptq_keras.frontends import is_batchnorm

    problems, ternary_layers = {}, 0
    for layer in _layers(model):
        attributes = kernel_attributes(layer)
        if not attributes:
            if layer.weights and not (is_batchnorm(layer) or is_activation_quantizer(layer)):
                raise ExportError(
                    f"layer {layer.name!r} ({type(layer).__name__}) has weights that target {target!r} cannot pack "
                    "(packed targets store Dense, Conv1D, Conv2D, DepthwiseConv2D and SeparableConv2D kernels); "
                    "export target 'int8' instead, or replace the layer."
                )
            continue
        problem = None
        for attr, channel_dims in attributes:
            kernel = getattr(layer, attr).numpy()
            columns = kernel.reshape(-1, int(np.prod(kernel.shape[-channel_dims:])))
            if target == "int4" and type(layer).__name__ == "Dense":
                _check_one_scale(layer, columns)
            problem = problem or _not_ternary(layer.name, attr, columns, target)
        if problem and target != "micro":
            raise ExportError(problem)
        if problem:
            problems[layer.name] = problem
        else:
            ternary_layers += 1
    if problems and not ternary_layers:
        raise ExportError(next(iter(problems.values())))
    if problems:
        warnings.warn(
            f"target 'micro': {len(problems)} layer(s) are not ternary and keep plain int8 kernels (8 bits per "
            f"weight, no decode): {sorted(problems)} (layers kept in float by keep_float or precision='mixed'; "
            "ternarize them for 2-bit weights).",
            stacklevel=2,
        )
    return sorted(problems)


def _not_ternary(name: str, attr: str, columns: np.ndarray, target: str) -> str | None:
    """The message for the first channel of ``columns`` (weights x channels) that is not ternary, else None."""
    for c in range(columns.shape[1]):
        magnitudes = np.abs(columns[:, c][columns[:, c] != 0])
        if magnitudes.size and not np.allclose(magnitudes, magnitudes[0], rtol=1e-5, atol=0):
            return (
                f"layer {name!r}: {attr} channel {c} is not ternary (values with "
                f"{len(np.unique(magnitudes))} distinct magnitudes, e.g. {magnitudes[:3].tolist()}); "
                f"target {target!r} stores only "
                "{-alpha, 0, +alpha} per channel. Ternarize this layer (ptq_keras.ternarize, then strip), "
                "or export target 'int8'."
            )
    return None


def _check_one_scale(layer, kernel) -> None:
    """Target int4 stores Dense kernels with one scale per tensor (TFLM's INT4 FULLY_CONNECTED needs it)."""
    magnitudes = np.unique(np.abs(kernel[kernel != 0]))
    if magnitudes.size and not np.allclose(magnitudes, magnitudes[0], rtol=1e-5, atol=0):
        raise ExportError(
            f"layer {layer.name!r}: target 'int4' stores Dense kernels with one scale per tensor, but this kernel "
            f"has per-channel scales ({magnitudes.min():.4g} to {magnitudes.max():.4g}). Ternarize Dense layers "
            "with granularity='tensor', or export target 'litert' (LiteRT) or 'micro' (TFLM)."
        )


def _layers(model):
    for layer in model.layers:
        if hasattr(layer, "layers") and layer.layers:
            yield from _layers(layer)
        else:
            yield layer


# ----------------------------------------------------------------------------- TFLite conversion
def float_tflite(model) -> bytes:
    """The fp32 .tflite of the plain model (the size reference)."""
    from ptq_keras.compat import tf

    plain = plain_model(model)
    with _converting(plain):
        return bytes(tf.lite.TFLiteConverter.from_keras_model(plain).convert())


@contextlib.contextmanager
def _converting(model):
    """Around a conversion: static activation quantizers give the converter their plain fake quantization (not
    the int8 kernels' rounding the stripped model computes, ``ptq_keras.activations.link``), and Keras 3's
    message about the temporary SavedModel of each conversion is kept out of the output."""
    from ptq_keras.activations import exporting
    from ptq_keras.compat import is_keras3

    quiet = contextlib.redirect_stdout(io.StringIO()) if is_keras3(model) else contextlib.nullcontext()
    with exporting(), quiet:
        yield


def int8_tflite(plain, calibration: np.ndarray, *, per_tensor_dense: bool = False) -> bytes:
    """Full-integer conversion (int8 weights, activations, input and output) calibrated on ``calibration``;
    buffers re-laid 16-byte aligned for TFLM."""
    from ptq_keras.compat import tf

    converter = tf.lite.TFLiteConverter.from_keras_model(plain)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([calibration[i : i + 1]] for i in range(len(calibration)))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    if per_tensor_dense:
        converter._experimental_disable_per_channel_quantization_for_dense_layers = True
    try:
        with _converting(plain):
            buf = bytes(converter.convert())
    except Exception as exc:  # the converter raises ConverterError with a long MLIR log
        raise ExportError(
            f"full-integer conversion of model {plain.name!r} failed: {str(exc).splitlines()[0][:500]}; every op "
            "must have an int8 TFLite builtin kernel (TFLITE_BUILTINS_INT8)."
        ) from exc
    return flatbuffer.align(buf)


# ----------------------------------------------------------------------------- packing
def pack_signed(values: np.ndarray, bits: int) -> bytes:
    """Two's complement ``bits``-bit packing, element ``k * (8 // bits)`` in the lowest bits of byte ``k``."""
    per_byte = 8 // bits
    flat = values.astype(np.int64).ravel() & ((1 << bits) - 1)
    flat = np.concatenate([flat, np.zeros(-len(flat) % per_byte, dtype=np.int64)]).reshape(-1, per_byte)
    shifts = np.arange(per_byte, dtype=np.int64) * bits
    return (flat << shifts).sum(axis=1).astype(np.uint8).tobytes()


def unpack_signed(data: bytes, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_signed`: ``count`` signed int8 values."""
    per_byte = 8 // bits
    raw = np.frombuffer(bytes(data), dtype=np.uint8).astype(np.int64)
    fields = (raw[:, None] >> (np.arange(per_byte) * bits)) & ((1 << bits) - 1)
    fields = fields.ravel()[:count]
    return np.where(fields >= 1 << (bits - 1), fields - (1 << bits), fields).astype(np.int8)


_name = flatbuffer.tensor_name  # "" when names were stripped


def channel_magnitudes(values: np.ndarray, axis: int, name: str, per_tensor: bool) -> np.ndarray:
    """Per channel the one non-zero magnitude ``q`` of exactly ternary int8 ``values`` (127 for an all-zero
    channel); ``ExportError`` naming the tensor when a channel (or, ``per_tensor``, the tensor) has more."""
    columns = np.moveaxis(values.astype(np.int32), axis, 0).reshape(values.shape[axis], -1)
    if per_tensor:
        columns = columns.reshape(1, -1)
    q = np.full(len(columns), 127, dtype=np.int64)
    for c, column in enumerate(columns):
        levels = np.unique(np.abs(column[column != 0]))
        if len(levels) > 1:
            where = "the tensor" if per_tensor else f"channel {c}"
            hint = (
                " (one scale per tensor: ternarize Dense layers with granularity='tensor' for target 'int4')"
                if per_tensor
                else ""
            )
            raise ExportError(
                f"weight tensor {name!r}: {where} holds {len(levels)} magnitudes {levels[:4].tolist()}, not "
                f"{{-q, 0, q}}{hint}. Only exactly ternary weights can be packed: ternarize that layer, or export "
                "target 'int8'."
            )
        if len(levels):
            q[c] = levels[0]
    return q


def _on_bytes(edit, what: str = "tflite"):
    """The bytes -> bytes form of an in-place stage ``edit(model, *args)``: parse, edit, serialize."""

    def run(tflite: bytes, *args, **kwargs) -> bytes:
        model = flatbuffer.read(tflite, what)
        edit(model, *args, **kwargs)
        return flatbuffer.write(model)

    run.__doc__ = f"{edit.__doc__.split(chr(10))[0]} (bytes in, 16-byte aligned bytes out)"
    return run


def check_ternary(int8_bytes: bytes) -> None:
    """``ExportError`` naming the first weight tensor of a weight op that is not ternary per channel."""
    check_ternary_model(flatbuffer.read(int8_bytes, "int8 .tflite"))


def check_ternary_model(model) -> None:
    """``check_ternary`` on a parsed model."""
    for graph in model.subgraphs:
        for op in graph.operators or []:
            if flatbuffer.builtin_name(model, op.opcodeIndex) not in WEIGHT_OPS:
                continue
            weight = graph.tensors[int(op.inputs[1])]
            values = flatbuffer.buffer_array(model, weight)
            if values is None or weight.type != S.TensorType.INT8:
                continue
            q = weight.quantization
            per_channel = q is not None and q.scale is not None and len(q.scale) > 1
            axis = int(q.quantizedDimension) if per_channel else 0
            channel_magnitudes(values, axis, _name(weight), per_tensor=not per_channel)


def pack_model(model, target: str) -> None:
    """Rewrite the int8 weights as INT2 / INT4 for target ``litert`` or ``int4``, in place."""
    types = _PACKED_TYPE[target]
    done: set[tuple[int, int]] = set()
    for s, graph in enumerate(model.subgraphs):
        for op in graph.operators or []:
            op_name = flatbuffer.builtin_name(model, op.opcodeIndex)
            if op_name in _UNPACKABLE_OPS:
                raise ExportError(
                    f"op {op_name} (output {_name(graph.tensors[op.outputs[0]])!r}) has weights target {target!r} "
                    "cannot pack; export target 'int8'."
                )
            if op_name not in types or (s, int(op.inputs[1])) in done:
                continue
            weight = graph.tensors[int(op.inputs[1])]
            values = flatbuffer.buffer_array(model, weight)
            if values is None or weight.type != S.TensorType.INT8:
                continue
            done.add((s, int(op.inputs[1])))
            bias = graph.tensors[int(op.inputs[2])] if len(op.inputs) > 2 and op.inputs[2] >= 0 else None
            _pack_weight(model, graph, op, weight, values, bias, types[op_name])


pack = _on_bytes(pack_model, "int8 .tflite")


def _pack_weight(model, graph, op, weight, values, bias, type_name: str) -> None:
    schema_type, bits, level = _LOWBIT[type_name]
    q_params = weight.quantization
    scales = np.asarray(q_params.scale, dtype=np.float64)
    axis = int(q_params.quantizedDimension) if len(scales) > 1 else 0
    name = _name(weight)
    q = channel_magnitudes(values, axis, name, per_tensor=len(scales) == 1)
    if len(scales) == 1:
        q = q[:1]
    shape = [1] * values.ndim
    shape[axis] = -1
    ternary = np.sign(values).astype(np.int8) * np.int8(level)
    new_scales = (scales * q / level).astype(np.float32)
    q_params.scale = new_scales
    buffer = S.BufferT()
    buffer.data = np.frombuffer(pack_signed(ternary, bits), dtype=np.uint8)
    model.buffers[weight.buffer] = buffer
    weight.type = schema_type
    if bias is None:
        return
    b = flatbuffer.buffer_array(model, bias)
    if b is None:
        return
    input_scale = np.float32(graph.tensors[int(op.inputs[0])].quantization.scale[0])
    factor = np.broadcast_to(level / q.astype(np.float64), b.shape)
    requantized = np.round(b.astype(np.float64) * factor).astype(np.int32)
    bias_buffer = S.BufferT()
    bias_buffer.data = np.frombuffer(requantized.tobytes(), dtype=np.uint8)
    model.buffers[bias.buffer] = bias_buffer
    bias.quantization.scale = (input_scale * new_scales).astype(np.float32)
    bias.quantization.zeroPoint = np.zeros(len(bias.quantization.scale), dtype=np.int64)


def unpack(packed: bytes) -> bytes:
    """The int8 twin of a ``litert`` / ``int4`` file: the same ``±L`` weight values, scales and biases stored as
    INT8, so both files compute the same integers (an oracle for the bit packing)."""
    model = flatbuffer.read(packed, "packed .tflite")
    levels = {schema_type: bits for schema_type, bits, _ in _LOWBIT.values()}
    for graph in model.subgraphs:
        for tensor in graph.tensors:
            if tensor.type not in levels or model.buffers[tensor.buffer].data is None:
                continue
            count = int(np.prod([int(d) for d in tensor.shape]))
            values = unpack_signed(model.buffers[tensor.buffer].data, levels[tensor.type], count)
            buffer = S.BufferT()
            buffer.data = np.frombuffer(values.tobytes(), dtype=np.uint8)
            model.buffers[tensor.buffer] = buffer
            tensor.type = S.TensorType.INT8
    return flatbuffer.write(model)


def trim_model(model) -> None:
    """Drop quantization parameters no TFLM kernel reads (``micro`` target, TFLM only): the int32 biases' scales
    and zero points (TFLM derives the requantization from the input, weight and output scales) and the
    per-channel zero points of weights when all are 0 (a single 0 remains). ~20 bytes per output channel."""
    for graph in model.subgraphs:
        for op in graph.operators or []:
            if flatbuffer.builtin_name(model, op.opcodeIndex) not in WEIGHT_OPS:
                continue
            weight = graph.tensors[int(op.inputs[1])]
            q = weight.quantization
            if q is not None and q.zeroPoint is not None and len(q.zeroPoint) > 1 and not np.any(q.zeroPoint):
                q.zeroPoint = np.zeros(1, dtype=np.int64)
            if len(op.inputs) > 2 and op.inputs[2] >= 0:
                bias = graph.tensors[int(op.inputs[2])]
                if bias.type == S.TensorType.INT32:
                    bias.quantization = None


trim_for_tflm = _on_bytes(trim_model)


def strip_names(tflite: bytes) -> bytes:
    """``tflite`` without what no kernel reads (tensor names, signatures, metadata, the description), with
    repeated constants, vectors and tables stored once (``slim.slim``); accepted by LiteRT, TFLM and Vela."""
    return slim.slim(tflite)



# ----------------------------------------------------------------------------- public API
@dataclass
class _Prepared:
    plain: object
    calibration: np.ndarray
    int8: dict = field(default_factory=dict)
    vela: ethosu.VelaOptions = field(default_factory=ethosu.VelaOptions)
    vela_figures: ethosu.VelaFigures | None = None  # of the last ethos-u conversion
    max_decode_bytes: int | str | None = None  # target micro: split weights larger than this (``split``), or "auto"
    auto_decode_bytes: int | None = None  # what "auto" resolved to (once per model)
    decode_bytes: int | None = None  # the bound of the last micro conversion's split (None: nothing split)
    split_rows: list = field(default_factory=list)  # of the last micro conversion
    keep_int8: int = 0  # target micro: the largest weight tensors left as plain int8 (``fit_ram``)
    channel_rows: list = field(default_factory=list)  # target micro: dead channels per layer (``channels``)
    macs: tuple = (0, 0)  # target micro: weight-op MACs before and after dead channels were removed
    keep_names: bool = False  # target micro: keep tensor names, signatures and metadata (for debugging)
    encoded_names: list = field(default_factory=list)  # target micro: decode.encoded_names before names were dropped


def vela_options(accelerator=ethosu.DEFAULT_ACCELERATOR, system_config=None, memory_mode=None,
                 optimise="Performance") -> ethosu.VelaOptions:  # fmt: skip
    """The validated Vela options of target ``ethos-u`` (``ExportError`` naming a bad one)."""
    try:
        return ethosu.VelaOptions(accelerator, system_config, memory_mode, optimise)
    except ethosu.VelaError as exc:
        raise ExportError(f"target 'ethos-u': {exc}") from exc


def _prepare(model, representative_data, num_samples: int, vela: ethosu.VelaOptions | None = None) -> _Prepared:
    plain = plain_model(model)
    return _Prepared(plain, samples(representative_data, plain, num_samples), vela=vela or ethosu.VelaOptions())


def compile_ethos_u(int8: bytes, options: ethosu.VelaOptions):
    """``(bytes, VelaFigures)`` of an int8 file compiled by Vela; ``ExportError`` with Vela's message."""
    model = flatbuffer.read(int8, "int8 .tflite")
    weights = {
        (s, int(op.inputs[1])): int(np.prod([int(d) for d in graph.tensors[int(op.inputs[1])].shape]))
        for s, graph in enumerate(model.subgraphs)
        for op in graph.operators or []
        if flatbuffer.builtin_name(model, op.opcodeIndex) in WEIGHT_OPS and len(op.inputs) > 1
    }
    try:
        return ethosu.compile(int8, options, weights=sum(weights.values()))
    except ethosu.VelaError as exc:
        raise ExportError(f"target 'ethos-u': {exc}") from exc


def _convert_prepared(prep: _Prepared, target: str, encoding: str, strip: bool, latency_budget) -> bytes:
    int8_layers = check_layers(prep.plain, target, encoding)
    buf = _int8(prep, per_tensor=target == "int4")
    if target == "int8" and not strip:
        return buf
    if target == "ethos-u":
        if strip:
            buf = _convert_prepared(prep, "int8", encoding, strip, latency_budget)
        compiled, prep.vela_figures = compile_ethos_u(buf, prep.vela)
        return compiled
    model = flatbuffer.read(buf, "int8 .tflite")  # every stage edits this one parsed model; one serialization
    if target == "micro":
        if needs_ternary(target, encoding) and not int8_layers:
            check_ternary_model(model)
        before = channels.weight_macs(model)
        prep.channel_rows = channels.remove_dead_channels(model, buf, prep.calibration)
        prep.macs = (before, channels.weight_macs(model))
        bound = prep.max_decode_bytes
        if bound == AUTO:
            if prep.auto_decode_bytes is None:
                prep.auto_decode_bytes = auto_decode_bytes(buf)
            bound = prep.auto_decode_bytes
        prep.split_rows = split.split_model(model, bound) if bound else []
        prep.decode_bytes = bound if prep.split_rows else None
        try:
            decode.compress_model(model, encoding=encoding, latency_budget=latency_budget, keep_int8=prep.keep_int8,
                                  keep_unencodable=bool(int8_layers))  # fmt: skip
        except ValueError as exc:
            raise ExportError(f"target 'micro': {exc}") from exc
        trim_model(model)
        prep.encoded_names = decode.encoded_names(model)
        slim.slim_model(model, keep_names=prep.keep_names and not strip)
        return slim.write(model)
    elif target in _PACKED_TYPE:
        pack_model(model, target)
    if strip:
        slim.slim_model(model)
        return slim.write(model)
    return flatbuffer.write(model)


def check_ram_budget(ram_budget, max_decode_bytes) -> int | None:
    """``ram_budget`` validated: None or a positive int, and not together with ``max_decode_bytes``."""
    ram_budget = byte_count(ram_budget, "ram_budget", "TFLM arena, e.g. 65536")
    if ram_budget is not None and max_decode_bytes not in (None, AUTO):
        raise ValueError("ram_budget chooses max_decode_bytes itself; pass one of the two, not both.")
    return ram_budget


@dataclass
class RamFit:
    """How target ``micro`` was fitted into ``ram_budget`` bytes of TFLM arena (``fit_ram``)."""

    ram_budget: int
    arena_bytes: int  # of the file returned
    max_decode_bytes: int | None  # the split bound chosen (None: no split needed)
    keep_int8: int  # weight tensors left as plain int8 (no decode buffer)
    tried: list = field(default_factory=list)  # (max_decode_bytes, keep_int8, arena bytes) in the order tried


def fit_ram(prep: _Prepared, encoding: str, strip: bool, latency_budget, ram_budget: int, say=None):
    """``(bytes, RamFit)``: the ``micro`` file whose measured TFLM arena is at most ``ram_budget`` bytes.

    Tried in order, the first that fits wins: no split; splits with ``max_decode_bytes`` halving from half the
    largest weight tensor down to 1 KiB (fewer, larger parts first: less per-op overhead); then, with the bound
    that gave the smallest arena and then without a split, the largest weight tensors kept as plain int8 one by
    one (no decode buffer, more flash). An unreachable budget is an ``ExportError`` stating the smallest arena
    reached (at worst every weight int8 without a split: the activations' own need).
    """
    say = say or (lambda line: None)
    base = flatbuffer.read(_int8(prep), "int8 .tflite")
    largest = max((int(np.prod(base.subgraphs[w.subgraph].tensors[w.tensor].shape)) for w in decode._weights(base)),
                  default=0)  # fmt: skip
    bounds = [None]
    bound = 1 << max(int(largest // 2).bit_length() - 1, 0)
    while bound >= 1024:
        bounds.append(bound)
        bound //= 2
    fit = RamFit(ram_budget, 0, None, 0)

    def attempt(bound, keep):
        prep.max_decode_bytes, prep.keep_int8 = bound, keep
        buf = _convert_prepared(prep, "micro", encoding, strip, latency_budget)
        arena = micro.measure_arena(buf)
        fit.tried.append((bound, keep, arena))
        say(f"  ram_budget {ram_budget:,} B: max_decode_bytes={bound}, {keep} tensor(s) int8 -> arena {arena:,} B")
        return buf, arena

    best = None
    for bound in bounds:
        buf, arena = attempt(bound, 0)
        if arena <= ram_budget:
            fit.arena_bytes, fit.max_decode_bytes = arena, bound
            return buf, fit
        if best is None or arena < best[1]:
            best = (bound, arena)
    for keep in range(1, decode.weight_count(base) + 1):
        for bound in dict.fromkeys((best[0], None)):  # split parts cost per-op memory: also try without
            buf, arena = attempt(bound, keep)
            if arena <= ram_budget:
                fit.arena_bytes, fit.max_decode_bytes, fit.keep_int8 = arena, bound, keep
                return buf, fit
    prep.max_decode_bytes, prep.keep_int8 = None, 0
    smallest = min(t[2] for t in fit.tried)
    raise ExportError(
        f"target 'micro': ram_budget={ram_budget:,} B cannot be met: the smallest TFLM arena reached is "
        f"{smallest:,} B (every weight left plain int8, no split: {fit.tried[-1][2]:,} B, the activations' own "
        f"need). Raise ram_budget to at least {smallest:,}, or make the activations smaller (fewer channels, a "
        "smaller input)."
    )


def _int8(prep: _Prepared, per_tensor: bool = False) -> bytes:
    """The int8 file every target starts from, converted once per ``per_tensor`` (target int4) and kept."""
    if per_tensor not in prep.int8:
        prep.int8[per_tensor] = int8_tflite(prep.plain, prep.calibration, per_tensor_dense=per_tensor)
    return prep.int8[per_tensor]


def convert(
    model,
    representative_data=None,
    *,
    target: str = "int8",
    encoding: str = "lut",
    strip_names: bool = False,
    latency_budget: float | None = None,
    num_samples: int = DEFAULT_NUM_SAMPLES,
    accelerator: str = ethosu.DEFAULT_ACCELERATOR,
    system_config: str | None = None,
    memory_mode: str | None = None,
    optimise: str = "Performance",
    max_decode_bytes: int | str | None = AUTO,
    ram_budget: int | None = None,
    keep_names: bool = False,
) -> bytes:
    """The .tflite bytes of ``model`` for one ``target`` (see ``TARGETS``); nothing is written.

    ``model``: a ternarized (QAT) model or the stripped plain one. ``representative_data``: model inputs
    (numpy array, tf.data.Dataset, generator) for activation calibration; the first ``num_samples`` are used.
    ``encoding`` (target ``micro``): ``lut`` (2-bit index), ``huffman``, ``prune`` or ``auto``
    (``latency_budget`` as in ``decode.compress``). ``strip_names`` drops tensor names and signatures.
    Target ``ethos-u``: ``accelerator`` (``ethosu.ACCELERATORS``), ``system_config`` and ``memory_mode`` (sections
    of Vela's ``Arm/vela.ini``; default per NPU family), ``optimise`` (``Performance`` or ``Size``); ``export``
    also reports Vela's figures. ``max_decode_bytes`` (target ``micro``): split every weight tensor larger than
    that many bytes along its output channels (``split``), so TFLM decodes at most that much at a time; the
    default ``"auto"`` bounds it by half the ``int8`` file's arena, at least 16 KiB (``auto_decode_bytes``: a
    small model is not split; a large layer no longer multiplies the arena); None: no split.
    ``ram_budget`` (target ``micro``): the TFLM arena in bytes the file must run in; ``fit_ram`` chooses the
    split bound (and, if needed, weights left as plain int8) by measuring the arena on TFLM.
    Target ``micro`` writes only what TFLM reads (``slim``: no tensor names, signatures or metadata; repeated
    constants, vectors and tables stored once); ``keep_names=True`` keeps the names, signatures and metadata
    (for debugging), unless ``strip_names``.
    """
    _check_options(target, encoding, num_samples)
    vela = vela_options(accelerator, system_config, memory_mode, optimise)
    ram_budget = check_ram_budget(ram_budget, max_decode_bytes)
    if ram_budget is not None and target != "micro":
        raise ValueError(f"ram_budget applies to target 'micro' (decode buffers), not {target!r}.")
    prep = _prepare(model, representative_data, num_samples, vela)
    prep.max_decode_bytes = check_max_decode_bytes(max_decode_bytes)
    prep.keep_names = bool(keep_names)
    if ram_budget is not None:
        check_layers(prep.plain, target, encoding)
        return fit_ram(prep, encoding, bool(strip_names), latency_budget, ram_budget)[0]
    return _convert_prepared(prep, target, encoding, bool(strip_names), latency_budget)
