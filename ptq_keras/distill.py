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

from .compat import check_keras_model, is_keras3

__all__ = ["Distiller", "distill", "soft_target_loss"]  # noqa: F822 - see __getattr__


def __getattr__(name: str):  # loaded on first use: ``import ptq_keras`` imports this module, and nothing heavy
    if name == "Distiller":  # tf_keras's, in its frontend
        from .frontends.tf_keras.distill import Distiller

        return Distiller
    if name == "soft_target_loss":
        from .core.distillation import soft_target_loss

        return soft_target_loss
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
        from .frontends.keras3.distill import Keras3Distiller as make
    else:
        from .frontends.tf_keras.distill import Distiller as make
    model = make(qmodel, teacher, temperature=temperature, alpha=alpha)
    return attach(model)
