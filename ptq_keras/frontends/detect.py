"""Which Keras a model is, and what each Keras backend can run; importing nothing heavy (Keras 3 on first use)."""

from __future__ import annotations

import sys

__all__ = ["TRAINING_BACKENDS", "check_keras_model", "check_tensorflow_backend", "keras3", "is_keras3"]


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
    tf_keras = sys.modules.get("tf_keras")  # a tf_keras model exists only once tf_keras is loaded
    if tf_keras is not None and isinstance(model, tf_keras.Model):
        return
    if is_keras3(model) and isinstance(model, keras3().Model):
        backend = keras3().backend.backend()
        if backend not in TRAINING_BACKENDS:
            raise RuntimeError(
                f"The {what} is a Keras 3 model on the {backend!r} backend; ptq_keras trains Keras 3 models on "
                f"{' and '.join(TRAINING_BACKENDS)} (and exports them on tensorflow). Set KERAS_BACKEND=tensorflow "
                "before Keras is imported."
            )
        return
    raise TypeError(
        f"The {what} must be a tf_keras or Keras 3 model, got {type(model).__module__}.{type(model).__name__}."
    )


TRAINING_BACKENDS = ("tensorflow", "jax")


def check_tensorflow_backend(what: str, fix: str | None = None) -> None:
    """Keras 3 runs ``what`` on its TensorFlow backend only (the TFLite converter and tf_keras are TensorFlow);
    ``fix`` replaces the default advice (save the model and convert it in a TensorFlow process)."""
    backend = keras3().backend.backend()
    if backend != "tensorflow":
        raise RuntimeError(
            f"{what} needs Keras 3's TensorFlow backend; this process runs Keras 3 on {backend!r}. "
            + (fix or "Save the model (model.save('q.keras')) and convert it in a process with "
               "KERAS_BACKEND=tensorflow (for example `KERAS_BACKEND=tensorflow ptq-convert --model q.keras ...`).")
        )  # fmt: skip
