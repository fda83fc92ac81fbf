"""Deployment half of ptq_keras: TensorFlow Lite export of ternary models (``ptq_keras.tflite``).

``convert`` (bytes of one target), ``export`` (files, C array, report), ``verify`` (the parity ladder),
``inspect`` (per-tensor table). Targets: ``int8``, ``micro`` (TFLM_DECODE), ``litert`` (INT2/INT4), ``int4``,
``ethos-u`` (compiled by Arm's Vela, module ``ethosu``).
"""

from .convert import ENCODINGS, TARGETS, ExportError, convert
from .export import ExportResult, export
from .flatbuffer import FlatbufferError
from .report import ExportReport, TensorTable, inspect
from .verify import ParityReport, predict, verify

__all__ = [
    "TARGETS",
    "ENCODINGS",
    "convert",
    "export",
    "verify",
    "inspect",
    "predict",
    "ExportResult",
    "ExportReport",
    "ParityReport",
    "TensorTable",
    "ExportError",
    "FlatbufferError",
]
