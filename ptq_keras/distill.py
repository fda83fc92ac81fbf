"""Knowledge distillation from the float model: ``ptq_keras.distill(qmodel, teacher)``.

The ternary student learns from the labels and from the float teacher's output distribution (Hinton et al. 2015):

    loss = (1 - alpha) * compiled_loss(y, s) + alpha * T^2 * KL(softmax(t / T) || softmax(s / T))

where ``s`` and ``t`` are the student's and the teacher's logits (probabilities are turned into log-probabilities
when a model ends in a softmax). The returned model trains with plain ``compile`` / ``fit``; its ``train_step``
adds the soft-target term. ``strip``, ``summary``, ``is_ternarized``, ``ptq_keras.tflite.convert/export/verify``
take it and act on the student; ``save`` saves the student (a ternarized model), never the teacher.
"""

from __future__ import annotations

import numbers

from keras import ops

from .compat import check_keras_model, is_keras3

__all__ = ["Distiller", "distill"]  # noqa: F822 - Distiller: see __getattr__


def __getattr__(name: str):
    if name == "Distiller":  # tf_keras's, in its frontend
        from .frontends.tf_keras.distill import Distiller

        return Distiller
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

_EPS = 1e-7


def _ends_in_softmax(model) -> bool:
    last = model.layers[-1]
    inner = getattr(last, "layer", last)  # a ternary wrapper
    if type(inner).__name__ == "Softmax":
        return True
    return getattr(getattr(inner, "activation", None), "__name__", "") == "softmax"


def _as_logits(outputs, probabilities: bool):
    outputs = ops.cast(outputs, "float32")
    return ops.log(ops.clip(outputs, _EPS, 1.0)) if probabilities else outputs


def soft_target_loss(teacher_logits, student_logits, temperature: float):
    """``T^2 * KL(softmax(t / T) || softmax(s / T))``, averaged over the batch (the gradient scale of the hard loss
    is kept when ``T`` changes). In ``keras.ops``: tf_keras and Keras 3 (TensorFlow or JAX) use it alike."""
    t = ops.log_softmax(ops.cast(teacher_logits, "float32") / temperature, axis=-1)
    s = ops.log_softmax(ops.cast(student_logits, "float32") / temperature, axis=-1)
    kl = ops.sum(ops.exp(t) * (t - s), axis=-1)
    return temperature**2 * ops.mean(kl)


def distill(qmodel, teacher, *, temperature: float = 1.0, alpha: float = 0.5):
    """Wrap the ternarized ``qmodel`` so that ``fit`` also matches the float ``teacher``'s outputs.

    Args:
      qmodel: the model returned by :func:`ptq_keras.ternarize` (the student; trained in place).
      teacher: a model of the same Keras API (tf_keras or Keras 3) with the same inputs and outputs (typically the
        float model ``qmodel`` came from); it is frozen (never trained) and runs in inference mode.
      temperature: softening temperature ``T`` of both distributions (> 0).
      alpha: weight of the soft-target term in [0, 1]; ``1 - alpha`` weighs the compiled (label) loss.

    The defaults (``T=1``, ``alpha=0.5``: half the labels, half the teacher's own probabilities) are the mildest
    pull towards the teacher measured (``benchmarks/results/ablation_distill*.md``): when the teacher is the float
    model the student starts from, fine-tuning on labels still improves on it, and heavier soft targets (``T=4``,
    ``alpha=0.9``, Hinton et al.'s setting for a large teacher) held the student to the teacher's level, a point
    under the labels alone. With a stronger teacher (a larger or longer-trained model), raise both.

    Returns a model to ``compile`` and ``fit`` like any other; ``strip(model)`` returns the stripped student.
    """
    from .wrap import attach, is_ternarized

    check_keras_model(qmodel, "student")
    check_keras_model(teacher, "teacher")
    if is_keras3(qmodel) != is_keras3(teacher):
        raise TypeError("distill: the student and the teacher must both be tf_keras or both be Keras 3 models.")
    if not is_ternarized(qmodel):
        raise ValueError(
            f"distill() takes the ternarized student first: {qmodel.name!r} has no ternarized layer. "
            "Call ptq_keras.distill(ptq_keras.ternarize(model), model)."
        )
    if getattr(teacher, "_ptq_distiller", False) or is_ternarized(teacher):
        raise ValueError("The teacher must be a plain (float) model, e.g. the model that was ternarized.")
    if [tuple(t.shape) for t in qmodel.outputs] != [tuple(t.shape) for t in teacher.outputs]:
        raise ValueError(
            f"The teacher's outputs {[tuple(t.shape) for t in teacher.outputs]} do not match the student's "
            f"{[tuple(t.shape) for t in qmodel.outputs]}."
        )
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or temperature <= 0:
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}.")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}.")
    if is_keras3(qmodel):
        make = _keras3_distiller()
    else:
        from .frontends.tf_keras.distill import Distiller as make
    model = make(qmodel, teacher, temperature=temperature, alpha=alpha)
    return attach(model)


def _keras3_distiller():
    """The Keras 3 twin of :class:`Distiller`: the soft-target term is added in ``compute_loss``, which Keras 3's
    ``train_step`` calls on every backend (TensorFlow and JAX)."""
    import keras as keras_3

    class Keras3Distiller(keras_3.Model):
        _ptq_distiller = True

        def __init__(self, student, teacher, *, temperature: float, alpha: float):
            super().__init__(name=f"{student.name}_distilled")
            self.student = student
            # Not tracked: the teacher's variables get no gradient and are not saved (it runs in inference mode).
            object.__setattr__(self, "teacher", teacher)
            self.temperature, self.alpha = float(temperature), float(alpha)
            self._student_probs, self._teacher_probs = _ends_in_softmax(student), _ends_in_softmax(teacher)

        def call(self, inputs, training=None):
            return self.student(inputs, training=training)

        def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
            hard = super().compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training)
            teacher_logits = ops.stop_gradient(_as_logits(self.teacher(x, training=False), self._teacher_probs))
            soft = soft_target_loss(teacher_logits, _as_logits(y_pred, self._student_probs), self.temperature)
            return (1.0 - self.alpha) * hard + self.alpha * soft

        def save(self, filepath, *args, **kwargs):
            """Save the student (the ternarized model); the teacher is not saved."""
            return self.student.save(filepath, *args, **kwargs)

        def get_config(self):
            raise NotImplementedError(
                "A ptq_keras.distill model is not serialized itself: save() writes its student (model.student)."
            )

    return Keras3Distiller
