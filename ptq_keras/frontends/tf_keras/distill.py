"""tf_keras's :class:`Distiller` (``ptq_keras.distill`` on a tf_keras model): its own ``train_step`` adds the
soft-target term of :func:`ptq_keras.distill.soft_target_loss`."""

from __future__ import annotations

from ...core.distillation import as_logits as _as_logits
from ...core.distillation import ends_in_softmax as _ends_in_softmax
from ...core.distillation import soft_target_loss
from . import keras, tf


class Distiller(keras.Model):
    """A student trained against a frozen teacher; see :func:`distill`."""

    _ptq_distiller = True

    def __init__(self, student, teacher, *, temperature: float, alpha: float, **kwargs):
        super().__init__(name=kwargs.pop("name", f"{student.name}_distilled"), **kwargs)
        self.student = student
        # The teacher is never updated: it runs in inference mode and only the student's variables get gradients.
        # (Its ``trainable`` flag is left alone: a model cloned from it later must still train.)
        self.teacher = teacher
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self._student_probs = _ends_in_softmax(student)
        self._teacher_probs = _ends_in_softmax(teacher)
        self._soft_tracker = keras.metrics.Mean(name="distill_loss")

    def call(self, inputs, training=None):
        return self.student(inputs, training=training)

    @property
    def metrics(self):
        metrics = super().metrics
        return metrics if any(m is self._soft_tracker for m in metrics) else metrics + [self._soft_tracker]

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        teacher_logits = _as_logits(self.teacher(x, training=False), self._teacher_probs)
        with tf.GradientTape() as tape:
            outputs = self.student(x, training=True)
            hard = self.compiled_loss(y, outputs, sample_weight, regularization_losses=self.student.losses)
            soft = soft_target_loss(
                tf.stop_gradient(teacher_logits), _as_logits(outputs, self._student_probs), self.temperature
            )
            loss = (1.0 - self.alpha) * hard + self.alpha * soft
        variables = self.student.trainable_variables
        self.optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        self.compiled_metrics.update_state(y, outputs, sample_weight)
        self._soft_tracker.update_state(soft)
        return {m.name: m.result() for m in self.metrics}

    def test_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        outputs = self.student(x, training=False)
        self.compiled_loss(y, outputs, sample_weight, regularization_losses=self.student.losses)
        teacher_logits = _as_logits(self.teacher(x, training=False), self._teacher_probs)
        soft = soft_target_loss(teacher_logits, _as_logits(outputs, self._student_probs), self.temperature)
        self.compiled_metrics.update_state(y, outputs, sample_weight)
        self._soft_tracker.update_state(soft)
        return {m.name: m.result() for m in self.metrics}

    def save(self, filepath, *args, **kwargs):
        """Save the student (the ternarized model); the teacher is not saved. Load it with
        ``ptq_keras.load_model`` and wrap it with :func:`distill` again to continue distilling."""
        return self.student.save(filepath, *args, **kwargs)

    def get_config(self):
        raise NotImplementedError(
            "A ptq_keras.distill model is not serialized itself: save() writes its student (model.student)."
        )
