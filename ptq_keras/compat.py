"""Which Keras a model is (:mod:`ptq_keras.frontends.detect`), and ``keras``, ``tf`` and ``tfmot`` (tf_keras,
TensorFlow and tfmot) loaded on first use from the tf_keras frontend, the one module that imports tf_keras and
tfmot."""

from __future__ import annotations

from .frontends.detect import TRAINING_BACKENDS, check_keras_model, check_tensorflow_backend, is_keras3, keras3

__all__ = [  # noqa: F822 - tf, keras, tfmot: see __getattr__
    "tf", "keras", "tfmot", "TRAINING_BACKENDS", "check_keras_model", "check_tensorflow_backend", "keras3", "is_keras3",
]  # fmt: skip

_TF_KERAS = ("keras", "tf", "tfmot")


def __getattr__(name: str):
    if name in _TF_KERAS:
        from .frontends import tf_keras

        return getattr(tf_keras, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
