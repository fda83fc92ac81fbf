"""ptq_keras: Pruning Ternary Quantization for tf_keras and Keras 3 models.

``import ptq_keras`` selects Keras 2 (tf_keras) for ``tf.keras`` (before TensorFlow loads) and imports nothing
else: the training API and ``ptq_keras.keras`` (tf_keras) load on first use, so a Keras 3 user (``import keras``;
TensorFlow or JAX backend) never imports tf_keras or tfmot. Build tf_keras models with ``ptq_keras.keras``.
"""

from __future__ import annotations

import importlib
import os

if os.environ.get("KERAS_BACKEND", "tensorflow") == "tensorflow":
    # tf.keras is tf_keras (set before TensorFlow is first imported). Not on Keras 3's other backends: there
    # TensorFlow, which Keras 3 may import, would then import tf_keras too.
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from .core import versions as _versions  # noqa: E402

_versions.check()  # a warning per package outside the supported versions, with the fix (metadata only)

from .core.schedules import ConstantSparsity, PolynomialDecay  # noqa: E402
from .distill import distill  # noqa: E402 - the function, not its module (both are named distill)

__version__ = "0.1.0"

# public name -> the module that defines it (imported on first access)
_LAZY = {
    "keras": "ptq_keras.frontends.tf_keras",
    "ternarize": "ptq_keras.wrap",
    "strip": "ptq_keras.wrap",
    "is_ternarized": "ptq_keras.wrap",
    "load_model": "ptq_keras.wrap",
    "attach": "ptq_keras.wrap",
    "custom_object_scope": "ptq_keras.wrap",
    "custom_objects": "ptq_keras.wrap",
    "recalibrate_batchnorm": "ptq_keras.wrap",
    "summary": "ptq_keras.report",
    "resolve_freeze": "ptq_keras.fitting",
    "decay_pruned": "ptq_keras.fitting",
}

__all__ = [
    "keras",
    "ternarize",
    "strip",
    "summary",
    "is_ternarized",
    "load_model",
    "attach",
    "resolve_freeze",
    "decay_pruned",
    "distill",
    "custom_object_scope",
    "custom_objects",
    "recalibrate_batchnorm",
    "ConstantSparsity",
    "PolynomialDecay",
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    try:  # submodules: ptq_keras.tflite, ptq_keras.models, ...
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
