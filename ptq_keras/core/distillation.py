"""Knowledge distillation's loss (Hinton et al. 2015) in ``keras.ops``: both frontends' distillers use it."""

from __future__ import annotations

from keras import ops

_EPS = 1e-7


def ends_in_softmax(model) -> bool:
    last = model.layers[-1]
    inner = getattr(last, "layer", last)  # a ternary wrapper
    if type(inner).__name__ == "Softmax":
        return True
    return getattr(getattr(inner, "activation", None), "__name__", "") == "softmax"


def as_logits(outputs, probabilities: bool):
    outputs = ops.cast(outputs, "float32")
    return ops.log(ops.clip(outputs, _EPS, 1.0)) if probabilities else outputs


def soft_target_loss(teacher_logits, student_logits, temperature: float):
    """``T^2 * KL(softmax(t / T) || softmax(s / T))``, averaged over the batch (the gradient scale of the hard loss
    is kept when ``T`` changes). In ``keras.ops``: tf_keras and Keras 3 (TensorFlow or JAX) use it alike."""
    t = ops.log_softmax(ops.cast(teacher_logits, "float32") / temperature, axis=-1)
    s = ops.log_softmax(ops.cast(student_logits, "float32") / temperature, axis=-1)
    kl = ops.sum(ops.exp(t) * (t - s), axis=-1)
    return temperature**2 * ops.mean(kl)
