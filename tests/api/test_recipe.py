"""The recipe the defaults carry: a fractional freeze resolved by plain fit, schedules that re-select every step,
and distillation from the float model."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from conftest import conv1d_model, small_cnn

import ptq_keras
from ptq_keras import fitting, keras
from ptq_keras.compat import tf
from ptq_keras.distill import soft_target_loss


def _data(model, n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((n, *model.input_shape[1:])).astype("float32")
    y = rng.integers(0, model.output_shape[-1], n)
    return x, y


def _compile(model, optimizer="adam"):
    model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True), ["accuracy"])


def _freeze_steps(model):
    return sorted({int(v["freeze_step"].numpy()) for _, _, v in fitting.quantizer_states(model)})


def _masks(model):
    return [v["mask"].numpy().copy() for _, _, v in fitting.quantizer_states(model)]


def test_default_freezes_at_half_of_the_first_fit_and_the_support_stops_moving():
    model = small_cnn()
    x, y = _data(model, n=128)
    qmodel = ptq_keras.ternarize(model, sparsity=0.6)
    assert _freeze_steps(qmodel) == [-1]  # not resolved before fit
    _compile(qmodel, keras.optimizers.SGD(0.5))
    seen = {}

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen[batch] = _masks(qmodel)

    qmodel.fit(x, y, epochs=2, batch_size=16, verbose=0, shuffle=False, callbacks=[Record()])
    assert _freeze_steps(qmodel) == [8]  # 2 epochs x 8 steps, half of it
    # the support moved before the freeze and never after it
    last = seen[7]  # after steps 8..15 (the second epoch's batches overwrite the first's)
    for a, b in zip(seen[0], last):
        np.testing.assert_array_equal(a, b)
    summary = ptq_keras.summary(qmodel, print_fn=None)
    assert all(r.sparsity == pytest.approx(0.6, abs=0.07) for r in summary.layers if r.ternary)


def test_freeze_fraction_counts_from_the_start_of_the_fit_and_initial_epoch():
    model = conv1d_model()
    x, y = _data(model, n=64)
    qmodel = ptq_keras.ternarize(model, sparsity=0.5, freeze_at=0.25)
    _compile(qmodel)
    qmodel.fit(x, y, epochs=5, initial_epoch=1, batch_size=16, verbose=0)  # 4 epochs x 4 steps
    assert _freeze_steps(qmodel) == [4]
    qmodel.fit(x, y, epochs=1, batch_size=16, verbose=0)  # resolved once: a second fit keeps it
    assert _freeze_steps(qmodel) == [4]


def test_unknown_steps_per_epoch_resolve_after_the_first_epoch():
    model = conv1d_model()
    x, y = _data(model, n=64)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(16).filter(lambda a, b: True)  # unknown cardinality
    qmodel = ptq_keras.ternarize(model, sparsity=0.5)
    _compile(qmodel)
    qmodel.fit(dataset, epochs=4, verbose=0)
    steps = int(next(fitting.quantizer_states(qmodel))[2]["step"].numpy())
    (freeze,) = _freeze_steps(qmodel)
    assert steps >= 16 and freeze == pytest.approx(steps / 2, abs=2)


def test_a_model_never_fit_can_be_resolved_by_hand_and_none_never_freezes():
    qmodel = ptq_keras.ternarize(conv1d_model(), sparsity=0.5)
    assert ptq_keras.resolve_freeze(qmodel, 100, verbose=False) == {"c1": 50, "out": 50}
    assert ptq_keras.resolve_freeze(qmodel, 100, verbose=False) == {}  # already resolved
    never = ptq_keras.ternarize(conv1d_model(), sparsity=0.5, freeze_at=None)
    x, y = _data(never)
    _compile(never)
    never.fit(x, y, epochs=2, batch_size=16, verbose=0)
    assert _freeze_steps(never) == [-1]


def test_freeze_survives_save_and_load(tmp_path):
    model = conv1d_model()
    x, y = _data(model)
    qmodel = ptq_keras.ternarize(model, sparsity=0.5)
    _compile(qmodel)
    qmodel.fit(x, y, epochs=2, batch_size=16, verbose=0)
    path = str(tmp_path / "q.h5")
    qmodel.save(path)
    again = ptq_keras.load_model(path)
    assert _freeze_steps(again) == [4]
    again.fit(x, y, epochs=1, batch_size=16, verbose=0)  # training continues, frozen
    for a, b in zip(_masks(qmodel), _masks(again)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match=r"\.keras"):
        again.save(str(tmp_path / "q.keras"))


@pytest.mark.parametrize("bad, error", [(1.5, ValueError), (0.0, ValueError), ("half", TypeError), (True, TypeError)])
def test_bad_freeze_at_explains(bad, error):
    with pytest.raises(error, match="freeze_at"):
        ptq_keras.ternarize(conv1d_model(), sparsity=0.5, freeze_at=bad)


def test_a_tfmot_schedule_with_rare_reselection_is_adjusted_with_a_warning():
    schedule = ptq_keras.PolynomialDecay(0.0, 0.7, 0, 1000)  # tfmot's default frequency=100
    with pytest.warns(UserWarning, match="frequency=100.*every step"):
        qmodel = ptq_keras.ternarize(conv1d_model(), sparsity=schedule)
    quantizer = next(fitting.quantizer_states(qmodel))[1]
    assert quantizer.schedule.get_config()["config"]["frequency"] == 1
    assert quantizer.schedule.get_config()["config"]["end_step"] == 1000
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        masked = ptq_keras.ternarize(conv1d_model(), sparsity=schedule, ste="masked")  # kept as asked
    assert next(fitting.quantizer_states(masked))[1].schedule.get_config()["config"]["frequency"] == 100


def test_a_ramp_still_running_at_the_freeze_is_compressed_to_end_before_it(tmp_path):
    model = conv1d_model()
    x, y = _data(model, n=64)
    qmodel = ptq_keras.ternarize(model, sparsity=ptq_keras.PolynomialDecay(0.0, 0.7, 0, 16, frequency=1), min_kept=0)
    _compile(qmodel)
    with pytest.warns(UserWarning, match="ends at step 16.*compressed"):
        qmodel.fit(x, y, epochs=4, batch_size=16, verbose=0)  # 16 steps: the freeze is at 8, the ramp ends at 4
    assert _freeze_steps(qmodel) == [8]
    report = ptq_keras.summary(qmodel, print_fn=None)
    assert all(r.target_sparsity == pytest.approx(0.7) for r in report.layers if r.ternary)  # target reached
    path = str(tmp_path / "q.h5")
    qmodel.save(path)
    quantizer = next(fitting.quantizer_states(ptq_keras.load_model(path)))[1]
    assert quantizer.schedule.get_config()["config"]["end_step"] == 4


def test_a_ramp_that_ends_before_the_freeze_is_kept():
    model = conv1d_model()
    x, y = _data(model, n=64)
    qmodel = ptq_keras.ternarize(model, sparsity=ptq_keras.PolynomialDecay(0.0, 0.7, 0, 4, frequency=1))
    _compile(qmodel)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        qmodel.fit(x, y, epochs=4, batch_size=16, verbose=0)
    assert _freeze_steps(qmodel) == [8]
    assert next(fitting.quantizer_states(qmodel))[1].schedule.get_config()["config"]["end_step"] == 4


# ----------------------------------------------------------------------------- distillation
def test_soft_target_loss_matches_the_formula():
    rng = np.random.default_rng(0)
    t, s = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
    temperature = 3.0

    def softmax(z):
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    p, q = softmax(t / temperature), softmax(s / temperature)
    expected = temperature**2 * np.mean(np.sum(p * np.log(p / q), axis=1))
    got = float(soft_target_loss(tf.constant(t, tf.float32), tf.constant(s, tf.float32), temperature))
    assert got == pytest.approx(expected, rel=1e-4)
    same = soft_target_loss(tf.constant(t, tf.float32), tf.constant(t, tf.float32), 2.0)
    assert float(same) == pytest.approx(0, abs=1e-6)


def test_distill_with_alpha_one_ignores_labels_and_follows_the_teacher():
    teacher = small_cnn()
    x, y = _data(teacher, n=64)
    results = []
    for labels in (y, (y + 3) % 10):
        keras.utils.set_random_seed(0)
        student = ptq_keras.ternarize(teacher, sparsity=0.5)
        model = ptq_keras.distill(student, teacher, alpha=1.0, temperature=2.0)
        _compile(model, keras.optimizers.SGD(0.1))
        model.fit(x, labels, epochs=1, batch_size=16, verbose=0, shuffle=False)
        results.append(ptq_keras.strip(student).get_weights())
    assert not np.allclose(results[0][0], teacher.get_weights()[0], atol=1e-4)  # it trained
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, atol=1e-6)  # labels had no effect


def test_distill_reports_the_soft_loss_of_the_batch():
    teacher = small_cnn()
    x, y = _data(teacher, n=16)
    student = ptq_keras.ternarize(teacher, sparsity=0.5)
    model = ptq_keras.distill(student, teacher, alpha=0.5, temperature=4.0)
    _compile(model, keras.optimizers.SGD(0.0))  # no update: the student's logits are those before the step
    history = model.fit(x, y, epochs=1, batch_size=16, verbose=0)
    # the student in training mode (BatchNorm on batch statistics), the teacher in inference mode
    expected = float(soft_target_loss(teacher(x, training=False), student(x, training=True), 4.0))
    assert history.history["distill_loss"][0] == pytest.approx(expected, rel=1e-3)
    assert expected > 0.01  # ternary and float outputs differ


def test_distill_trains_and_strip_summary_save_export_work(tmp_path, fashion_mnist):
    from ptq_keras import tflite

    x_train, y_train, _, _ = fashion_mnist
    x, y = x_train[:1024], y_train[:1024]
    teacher = small_cnn()
    _compile(teacher)
    teacher.fit(x, y, epochs=2, batch_size=64, verbose=0)
    model = ptq_keras.distill(ptq_keras.ternarize(teacher, sparsity=0.7), teacher)
    _compile(model)
    history = model.fit(x, y, epochs=2, batch_size=64, verbose=0)
    assert history.history["distill_loss"][-1] < history.history["distill_loss"][0]
    assert ptq_keras.is_ternarized(model)
    report = ptq_keras.summary(model, print_fn=None)
    from ptq_keras.core.ternary import max_sparsity

    targets = {layer.name: min(0.7, max_sparsity(layer.kernel.shape, 1, 4))  # conv1: 3x3 on one channel, capped
               for layer in teacher.layers if hasattr(layer, "kernel")}  # fmt: skip
    assert all(r.sparsity == pytest.approx(targets[r.name], abs=0.04) for r in report.layers if r.ternary)
    plain = ptq_keras.strip(model, batchnorm_data=x)
    assert not ptq_keras.is_ternarized(plain)
    path = str(tmp_path / "student.h5")
    model.save(path)
    again = ptq_keras.load_model(path)
    np.testing.assert_allclose(again.predict(x[:32], verbose=0), model.student.predict(x[:32], verbose=0), atol=1e-5)
    result = tflite.export(model, x[:128], str(tmp_path / "out"), targets=("int8", "micro"))
    parity = tflite.verify(model, result.files["micro"], x[:256], num_samples=256, min_top1=0.8)
    assert parity.ok, str(parity)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [({"temperature": 0}, "temperature"), ({"alpha": 1.5}, "alpha"), ({"alpha": "x"}, "alpha")],
)
def test_distill_bad_arguments_explain(kwargs, pattern):
    teacher = conv1d_model()
    with pytest.raises(ValueError, match=pattern):
        ptq_keras.distill(ptq_keras.ternarize(teacher, sparsity=0.5), teacher, **kwargs)


def test_distill_needs_a_ternarized_student_and_a_float_teacher():
    teacher = conv1d_model()
    student = ptq_keras.ternarize(teacher, sparsity=0.5)
    with pytest.raises(ValueError, match="ternarized student first"):
        ptq_keras.distill(teacher, teacher)
    with pytest.raises(ValueError, match="plain"):
        ptq_keras.distill(student, student)


def test_after_a_ramp_the_support_is_reselected_every_step_until_the_freeze():
    model = conv1d_model()
    x, y = _data(model, n=128)
    qmodel = ptq_keras.ternarize(
        model, sparsity=ptq_keras.PolynomialDecay(0.0, 0.5, 0, 2, frequency=1), freeze_at=12, decay=0.0
    )
    _compile(qmodel, keras.optimizers.SGD(1.0))
    masks = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            masks.append(_masks(qmodel))

    qmodel.fit(x, y, epochs=1, batch_size=8, verbose=0, shuffle=False, callbacks=[Record()])  # steps 0..15
    changed = [
        step for step in range(4, 12) if any(not np.array_equal(a, b) for a, b in zip(masks[step - 1], masks[step]))
    ]
    assert changed, "the support stayed fixed between the end of the ramp (step 2) and the freeze (step 12)"
    for step in range(13, 16):  # frozen
        for a, b in zip(masks[12], masks[step]):
            np.testing.assert_array_equal(a, b)
