"""Keras 3's distiller (``ptq_keras.distill`` on a Keras 3 model): the soft-target term is added in
``compute_loss``, which Keras 3's ``train_step`` calls on every backend (TensorFlow and JAX)."""

from __future__ import annotations

import keras as keras_3
from keras import ops

from ...core.distillation import as_logits as _as_logits
from ...core.distillation import ends_in_softmax as _ends_in_softmax
from ...core.distillation import soft_target_loss


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
