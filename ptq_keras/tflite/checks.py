"""What is checked before anything converts: the options, the inputs, and whether the weights fit the target.

* options: ``check_options`` (target, encoding, samples), ``vela_options`` (target ``ethos-u``),
  ``check_max_decode_bytes`` and ``check_ram_budget`` (target ``micro``);
* inputs: ``plain_model`` (the model to convert) and ``samples`` (the calibration inputs);
* the Keras side: ``check_layers`` names a layer whose weights a packed target cannot store as exact ternary values;
* the int8 file: ``check_ternary`` names a weight tensor that is not ternary per channel (``channel_magnitudes``).
"""

from __future__ import annotations

import collections.abc
import warnings

import numpy as np

from . import ethosu, flatbuffer

__all__ = [
    "TARGETS",
    "ENCODINGS",
    "WEIGHT_OPS",
    "AUTO",
    "DEFAULT_NUM_SAMPLES",
    "ExportError",
    "byte_count",
    "check_options",
    "check_max_decode_bytes",
    "check_ram_budget",
    "vela_options",
    "plain_model",
    "samples",
    "needs_ternary",
    "check_layers",
    "channel_magnitudes",
    "check_ternary",
    "check_ternary_model",
]

TARGETS = ("int8", "micro", "litert", "int4", "ethos-u")
ENCODINGS = ("lut", "huffman", "prune", "huffman_group", "auto")
WEIGHT_OPS = flatbuffer.WEIGHT_OPS
AUTO = "auto"
DEFAULT_NUM_SAMPLES = 100

S = flatbuffer.schema
_name = flatbuffer.tensor_name  # "" when names were stripped


class ExportError(ValueError):
    """The model cannot be exported to the requested target (the message names the layer or tensor)."""


# ----------------------------------------------------------------------------- options
def check_options(target: str, encoding: str, num_samples: int) -> None:
    """``ValueError`` (``ExportError`` for a missing Vela) naming a bad target, encoding or sample count."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of {list(TARGETS)}.")
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r}; choose one of {list(ENCODINGS)} (used by target 'micro').")
    if target == "ethos-u" and not ethosu.available():
        raise ExportError(f"target 'ethos-u': {ethosu.missing_message()}")
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}.")


def vela_options(accelerator=ethosu.DEFAULT_ACCELERATOR, system_config=None, memory_mode=None,
                 optimise="Performance") -> ethosu.VelaOptions:  # fmt: skip
    """The validated Vela options of target ``ethos-u`` (``ExportError`` naming a bad one)."""
    try:
        return ethosu.VelaOptions(accelerator, system_config, memory_mode, optimise)
    except ethosu.VelaError as exc:
        raise ExportError(f"target 'ethos-u': {exc}") from exc


def byte_count(value, name: str, what: str) -> int | None:
    """``value`` validated as None or a positive int of bytes; ``what`` says what it counts, with an example."""
    if value is None:
        return None
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive number of bytes ({what}) or None, got {value!r}.")
    return int(value)


def check_max_decode_bytes(max_decode_bytes) -> int | str | None:
    """``max_decode_bytes`` validated: ``"auto"``, None (no split) or a positive int."""
    if isinstance(max_decode_bytes, str) and max_decode_bytes == AUTO:
        return AUTO
    return byte_count(max_decode_bytes, "max_decode_bytes", 'e.g. 16384, or "auto"')


def check_ram_budget(ram_budget, max_decode_bytes) -> int | None:
    """``ram_budget`` validated: None or a positive int, and not together with ``max_decode_bytes``."""
    ram_budget = byte_count(ram_budget, "ram_budget", "TFLM arena, e.g. 65536")
    if ram_budget is not None and max_decode_bytes not in (None, AUTO):
        raise ValueError("ram_budget chooses max_decode_bytes itself; pass one of the two, not both.")
    return ram_budget


# ----------------------------------------------------------------------------- inputs
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
    from ptq_keras.core.layers import NAMES_TEXT, kernel_attributes
    from ptq_keras.frontends import is_batchnorm

    problems, ternary_layers = {}, 0
    for layer in _layers(model):
        attributes = kernel_attributes(layer)
        if not attributes:
            if layer.weights and not (is_batchnorm(layer) or is_activation_quantizer(layer)):
                raise ExportError(
                    f"layer {layer.name!r} ({type(layer).__name__}) has weights that target {target!r} cannot pack "
                    f"(packed targets store {NAMES_TEXT} kernels); "
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


# ----------------------------------------------------------------------------- the int8 file
def check_ternary(int8_bytes: bytes) -> None:
    """``ExportError`` naming the first weight tensor of a weight op that is not ternary per channel."""
    check_ternary_model(flatbuffer.read(int8_bytes, "int8 .tflite"))


def check_ternary_model(model) -> None:
    """``check_ternary`` on a parsed model."""
    for _, graph, op in flatbuffer.weight_ops(model):
        weight = graph.tensors[int(op.inputs[1])]
        values = flatbuffer.int8_constant(model, weight)
        if values is None:
            continue
        q = weight.quantization
        per_channel = q is not None and q.scale is not None and len(q.scale) > 1
        axis = int(q.quantizedDimension) if per_channel else 0
        channel_magnitudes(values, axis, _name(weight), per_tensor=not per_channel)


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
