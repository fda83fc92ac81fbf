"""The tf_keras (Keras 2) frontend: the one place that imports tf_keras and tfmot (and selects tf_keras for
``tf.keras``: ``TF_USE_LEGACY_KERAS`` must be set before TensorFlow is first imported).

TensorFlow 2.21 ships Keras 3, but tfmot 0.8.1 only works with Keras 2 (``tf_keras``); ternarized tf_keras layers
are tfmot ``QuantizeWrapper`` s with a :class:`~ptq_keras.frontends.tf_keras.config.TernaryQuantizeConfig`.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from ...core.versions import tf_keras_mismatch  # noqa: E402

_mismatch = tf_keras_mismatch()
if _mismatch:
    raise ImportError(_mismatch)

import tensorflow as tf  # noqa: E402
import tensorflow_model_optimization as tfmot  # noqa: E402
import tf_keras as keras  # noqa: E402

__all__ = ["tf", "keras", "tfmot"]
