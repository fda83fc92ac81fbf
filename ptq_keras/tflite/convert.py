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

The conversion is a pipeline of stages that return values: ``prepare`` (the plain model, the calibration samples and
the options, ``Prepared``) -> ``int8_file`` (the full-integer file every target starts from, converted once per
scale layout) -> ``convert_prepared`` (one target: ``convert_micro``, ``convert_ethos_u``, ...), which returns a
``Conversion``: the bytes and what the stage found on the way (dead channels, MACs, split weights, encoded tensor
names, Vela's figures). ``fit_ram`` runs ``convert_micro`` until the file fits a TFLM arena budget (``ram``).
The checks live in ``checks``, the INT2/INT4 packing in ``pack``; their public names are importable from here too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import warnings
from dataclasses import dataclass, field

import numpy as np

from . import channels, decode, ethosu, flatbuffer, ram, slim, split
from .checks import (
    AUTO,
    DEFAULT_NUM_SAMPLES,
    ENCODINGS,
    TARGETS,
    WEIGHT_OPS,
    ExportError,
    byte_count,
    channel_magnitudes,
    check_layers,
    check_max_decode_bytes,
    check_options,
    check_ram_budget,
    check_ternary,
    check_ternary_model,
    needs_ternary,
    plain_model,
    samples,
    vela_options,
)
from .pack import PACKED_TYPES, pack, pack_model, pack_signed, unpack, unpack_signed
from .ram import AUTO_DECODE_FLOOR, RamFit, auto_decode_bytes
from .slim import trim_for_tflm, trim_model

__all__ = [
    "TARGETS",
    "ENCODINGS",
    "ExportError",
    "RamFit",
    "Prepared",
    "Conversion",
    "convert",
    "prepare",
    "int8_file",
    "convert_prepared",
    "convert_micro",
    "convert_ethos_u",
    "fit_ram",
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
    # re-exported from checks, pack, ram and slim for the code that imports them from here
    "AUTO",
    "AUTO_DECODE_FLOOR",
    "DEFAULT_NUM_SAMPLES",
    "WEIGHT_OPS",
    "auto_decode_bytes",
    "byte_count",
    "channel_magnitudes",
    "check_max_decode_bytes",
    "check_options",
    "check_ram_budget",
    "check_ternary_model",
    "pack_model",
    "plain_model",
    "samples",
    "trim_model",
    "vela_options",
]

S = flatbuffer.schema


# ----------------------------------------------------------------------------- Keras -> int8
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
    with exporting(), quiet, warnings.catch_warnings():
        # The int8 input and output take their quantization from calibration, not from quantized_input_stats.
        warnings.filterwarnings("ignore", message="Statistics for quantized inputs were expected", category=UserWarning)
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


def strip_names(tflite: bytes) -> bytes:
    """``tflite`` without what no kernel reads (tensor names, signatures, metadata, the description), with
    repeated constants, vectors and tables stored once (``slim.slim``); accepted by LiteRT, TFLM and Vela."""
    return slim.slim(tflite)


# ----------------------------------------------------------------------------- the stages
@dataclass(frozen=True, eq=False)
class Prepared:
    """The inputs of every stage: the plain model, its calibration samples and the options; ``int8_files`` caches
    the int8 file per scale layout (``int8_file``). ``with_options`` gives a copy with other options."""

    plain: object
    calibration: np.ndarray
    encoding: str = "lut"  # target micro (``decode.compress``)
    strip: bool = False  # drop tensor names and signatures (``strip_names``)
    latency_budget: float | None = None  # target micro, encoding auto (``decode.compress``)
    vela: ethosu.VelaOptions = field(default_factory=ethosu.VelaOptions)  # target ethos-u
    max_decode_bytes: int | str | None = None  # target micro: split weights larger than this (``split``), or "auto"
    keep_int8: int = 0  # target micro: the largest weight tensors left as plain int8 (``fit_ram``)
    keep_names: bool = False  # target micro: keep tensor names, signatures and metadata (for debugging)
    int8_files: dict = field(default_factory=dict, repr=False, compare=False)  # per_tensor -> int8 bytes

    def with_options(self, **options) -> Prepared:
        """A copy with other ``options`` (the same model, samples and int8 cache)."""
        return dataclasses.replace(self, **options)

    def int8_reference(self) -> bytes | None:
        """The int8 file the targets came from (per-channel scales where converted), None before any conversion."""
        return self.int8_files.get(False, self.int8_files.get(True))


@dataclass(frozen=True)
class Conversion:
    """The bytes of one target and what its conversion found on the way."""

    target: str
    tflite: bytes
    channel_rows: list = field(default_factory=list)  # micro: dead channels per layer (``channels``)
    macs: tuple = (0, 0)  # micro: weight-op MACs before and after dead channels were removed
    split_rows: list = field(default_factory=list)  # micro: one row per split weight (``split``)
    decode_bytes: int | None = None  # micro: the bound the weights were split at (None: nothing split)
    encoded_names: list = field(default_factory=list)  # micro: ``decode.encoded_names`` before names were dropped
    vela_figures: ethosu.VelaFigures | None = None  # ethos-u: Vela's figures


def prepare(model, representative_data, num_samples: int = DEFAULT_NUM_SAMPLES, **options) -> Prepared:
    """The ``Prepared`` inputs: ``plain_model(model)``, its first ``num_samples`` calibration samples and the
    ``options`` (fields of ``Prepared``; ``max_decode_bytes`` validated)."""
    plain = plain_model(model)
    calibration = samples(representative_data, plain, num_samples)
    if "max_decode_bytes" in options:
        options["max_decode_bytes"] = check_max_decode_bytes(options["max_decode_bytes"])
    return Prepared(plain, calibration, **options)


def int8_file(prep: Prepared, per_tensor: bool = False) -> bytes:
    """The int8 file every target starts from, converted once per ``per_tensor`` (target int4) and kept."""
    if per_tensor not in prep.int8_files:
        prep.int8_files[per_tensor] = int8_tflite(prep.plain, prep.calibration, per_tensor_dense=per_tensor)
    return prep.int8_files[per_tensor]


def convert_prepared(prep: Prepared, target: str) -> Conversion:
    """One target of the prepared model."""
    if target == "micro":
        return convert_micro(prep)
    check_layers(prep.plain, target, prep.encoding)
    if target == "ethos-u":
        return convert_ethos_u(prep)
    buf = int8_file(prep, per_tensor=target == "int4")
    if target == "int8" and not prep.strip:
        return Conversion(target, buf)
    model = flatbuffer.read(buf, "int8 .tflite")  # every stage edits this one parsed model; one serialization
    if target in PACKED_TYPES:
        pack_model(model, target)
    if prep.strip:
        slim.slim_model(model)
        return Conversion(target, slim.write(model))
    return Conversion(target, flatbuffer.write(model))


def convert_micro(prep: Prepared) -> Conversion:
    """Target ``micro``: the int8 file with its dead channels removed (``channels``), its weights larger than
    ``prep.max_decode_bytes`` split (``split``) and encoded for ``TFLM_DECODE`` (``decode``), then what TFLM does not
    read dropped (``slim``)."""
    int8_layers = check_layers(prep.plain, "micro", prep.encoding)
    buf = int8_file(prep)
    model = flatbuffer.read(buf, "int8 .tflite")  # every stage edits this one parsed model; one serialization
    if needs_ternary("micro", prep.encoding) and not int8_layers:
        check_ternary_model(model)
    before = channels.weight_macs(model)
    channel_rows = channels.remove_dead_channels(model, buf, prep.calibration)
    macs = (before, channels.weight_macs(model))
    bound = auto_decode_bytes(buf) if prep.max_decode_bytes == AUTO else prep.max_decode_bytes
    split_rows = split.split_model(model, bound) if bound else []
    try:
        decode.compress_model(model, encoding=prep.encoding, latency_budget=prep.latency_budget,
                              keep_int8=prep.keep_int8, keep_unencodable=bool(int8_layers))  # fmt: skip
    except ValueError as exc:
        raise ExportError(f"target 'micro': {exc}") from exc
    trim_model(model)
    encoded_names = decode.encoded_names(model)
    slim.slim_model(model, keep_names=prep.keep_names and not prep.strip)
    return Conversion("micro", slim.write(model), channel_rows=channel_rows, macs=macs, split_rows=split_rows,
                      decode_bytes=bound if split_rows else None, encoded_names=encoded_names)  # fmt: skip


def convert_ethos_u(prep: Prepared) -> Conversion:
    """Target ``ethos-u``: the int8 file (slimmed with ``prep.strip``) compiled by Vela with ``prep.vela``."""
    compiled, figures = compile_ethos_u(convert_prepared(prep, "int8").tflite, prep.vela)
    return Conversion("ethos-u", compiled, vela_figures=figures)


def compile_ethos_u(int8: bytes, options: ethosu.VelaOptions):
    """``(bytes, VelaFigures)`` of an int8 file compiled by Vela; ``ExportError`` with Vela's message."""
    model = flatbuffer.read(int8, "int8 .tflite")
    weights = {
        (s, int(op.inputs[1])): int(np.prod([int(d) for d in graph.tensors[int(op.inputs[1])].shape]))
        for s, graph, op in flatbuffer.weight_ops(model)
    }
    try:
        return ethosu.compile(int8, options, weights=sum(weights.values()))
    except ethosu.VelaError as exc:
        raise ExportError(f"target 'ethos-u': {exc}") from exc


def fit_ram(prep: Prepared, ram_budget: int, say=None):
    """``(Conversion, RamFit)``: the ``micro`` file whose measured TFLM arena is at most ``ram_budget`` bytes,
    the split bound and the weights left plain int8 chosen by ``ram.fit_ram``."""

    def convert_with(max_decode_bytes, keep_int8):
        return convert_micro(prep.with_options(max_decode_bytes=max_decode_bytes, keep_int8=keep_int8))

    return ram.fit_ram(convert_with, int8_file(prep), ram_budget, say)


# ----------------------------------------------------------------------------- public API
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
    check_options(target, encoding, num_samples)
    vela = vela_options(accelerator, system_config, memory_mode, optimise)
    ram_budget = check_ram_budget(ram_budget, max_decode_bytes)
    if ram_budget is not None and target != "micro":
        raise ValueError(f"ram_budget applies to target 'micro' (decode buffers), not {target!r}.")
    prep = prepare(model, representative_data, num_samples, encoding=encoding, strip=bool(strip_names),
                   latency_budget=latency_budget, vela=vela, max_decode_bytes=max_decode_bytes,
                   keep_names=bool(keep_names))  # fmt: skip
    if ram_budget is not None:
        check_layers(prep.plain, target, encoding)
        return fit_ram(prep, ram_budget)[0].tflite
    return convert_prepared(prep, target).tflite
