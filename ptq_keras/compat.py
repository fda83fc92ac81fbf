"""The one place that selects Keras 2 (tf_keras) and imports TensorFlow, tf_keras and tfmot.

TensorFlow 2.21 ships Keras 3, but tfmot 0.8.1 only works with Keras 2 (``tf_keras``). The environment variable
``TF_USE_LEGACY_KERAS`` must be set before TensorFlow is first imported, so ``import ptq_keras`` does it here.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402
import tensorflow_model_optimization as tfmot  # noqa: E402
import tf_keras as keras  # noqa: E402

__all__ = ["tf", "keras", "tfmot", "check_keras_model", "keras3", "is_keras3"]


def keras3():
    """The Keras 3 package (``import keras``; TensorFlow's default Keras), imported on first use."""
    import keras as keras_3  # noqa: PLC0415 - Keras 3 is only needed for Keras 3 models

    return keras_3


def is_keras3(obj) -> bool:
    """True for a Keras 3 model or layer (Keras 3 is not imported to say no: a Keras 3 object needs it loaded)."""
    k3 = sys.modules.get("keras")
    layers = getattr(k3, "layers", None)
    return layers is not None and isinstance(obj, (k3.Model, layers.Layer))


def check_keras_model(model, what: str = "model") -> None:
    """Raise a TypeError unless ``model`` is a tf_keras (Keras 2) or Keras 3 model."""
    if isinstance(model, keras.Model):
        return
    if is_keras3(model) and isinstance(model, keras3().Model):
        check_keras3_backend(what)
        return
    raise TypeError(
        f"The {what} must be a tf_keras or Keras 3 model, got {type(model).__module__}.{type(model).__name__}."
    )


def check_keras3_backend(what: str = "model") -> None:
    """Keras 3 models are trained and exported by ptq_keras on the TensorFlow backend only."""
    backend = keras3().backend.backend()
    if backend != "tensorflow":
        raise RuntimeError(
            f"The {what} is a Keras 3 model on the {backend!r} backend; ptq_keras trains and exports Keras 3 models "
            "on the TensorFlow backend (its ternary quantizer and the TFLite converter are TensorFlow code). Set "
            "KERAS_BACKEND=tensorflow before Keras is imported (or leave it unset)."
        )
