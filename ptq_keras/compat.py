"""The one place that selects Keras 2 (tf_keras) and imports TensorFlow, tf_keras and tfmot.

TensorFlow 2.21 ships Keras 3, but tfmot 0.8.1 only works with Keras 2 (``tf_keras``). The environment variable
``TF_USE_LEGACY_KERAS`` must be set before TensorFlow is first imported, so ``import ptq_keras`` does it here.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402
import tensorflow_model_optimization as tfmot  # noqa: E402
import tf_keras as keras  # noqa: E402

__all__ = ["tf", "keras", "tfmot", "check_keras_model"]


def check_keras_model(model, what: str = "model") -> None:
    """Raise a TypeError that explains tf_keras when ``model`` is not a tf_keras (Keras 2) model."""
    if isinstance(model, keras.Model):
        return
    module = type(model).__module__ or ""
    if module.startswith("keras"):
        raise TypeError(
            f"The {what} is a Keras 3 model ({type(model).__module__}.{type(model).__name__}); ptq_keras needs "
            "a tf_keras (Keras 2) model, because TensorFlow Model Optimization only supports Keras 2. Rebuild it "
            "with `from ptq_keras import keras` (or `import tf_keras as keras`) and the same layers, then copy "
            "the weights: `new_model.set_weights(old_model.get_weights())`."
        )
    raise TypeError(
        f"The {what} must be a tf_keras model (keras.Model), got {type(model).__module__}."
        f"{type(model).__name__}."
    )
