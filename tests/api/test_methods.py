"""The related methods as options of ternarize: Taylor-score selection, GReg, PSG and soft pruning (SRFP)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import small_cnn

import ptq_keras
from ptq_keras import fitting, keras
from ptq_keras.compat import tf
from ptq_keras.core import ste, ternary
from ptq_keras.core.quantizer import TernaryQuantizer


def _setup(seed=0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(12, 3)).astype(np.float32)
    mask = ternary.support_np(w, sparsity=0.5)
    return w, mask, ternary.project_np(w, mask), rng.normal(size=w.shape).astype(np.float32)


def _grad(w, w_q, mask, upstream, **kw):
    wt = tf.Variable(w)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(ste.ternary_ste(wt, tf.constant(w_q), tf.constant(mask), **kw) * upstream)
    return tape.gradient(loss, wt).numpy()


def test_psg_gradient_is_scaled_by_the_distance_to_the_grid():
    w, mask, w_q, g = _setup()
    got = _grad(w, w_q, mask, g, mode="psg", psg_strength=150.0, decay=0.1)
    np.testing.assert_allclose(got, g * 150.0 * np.abs(w - w_q) + 0.1 * (w - w_q), rtol=1e-5)
    frozen = _grad(w, w_q, mask, g, mode="psg", frozen=tf.constant(True))
    np.testing.assert_allclose(frozen, g * mask)


def test_greg_penalizes_only_the_pruned_weights():
    w, mask, w_q, g = _setup(1)
    got = _grad(w, w_q, mask, g, mode="identity", greg=0.3)
    np.testing.assert_allclose(got, g + 0.3 * w * (~mask), rtol=1e-6)
    np.testing.assert_array_equal(got[mask], g[mask])


def test_greg_strength_grows_by_delta_every_interval_up_to_the_ceiling():
    q = TernaryQuantizer(1, regularizer="greg", greg_delta=0.1, greg_interval=5, greg_ceiling=0.25)
    got = [float(q.greg_strength(tf.constant(t, tf.int64))) for t in (0, 4, 5, 9, 10, 14, 15, 100)]
    np.testing.assert_allclose(got, [0, 0, 0.1, 0.1, 0.2, 0.2, 0.25, 0.25], atol=1e-7)


def _dense_model(n_in=6, n_out=3, seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((n_in,)), keras.layers.Dense(n_out, use_bias=False, name="d")])


def _state(qmodel):
    ((_, quantizer, qvars),) = fitting.quantizer_states(qmodel)
    return quantizer, qvars


def test_taylor_score_equals_the_hand_computed_one_and_drives_the_support():
    model = _dense_model()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 6)).astype(np.float32)
    t = rng.normal(size=(8, 3)).astype(np.float32)
    q = ptq_keras.ternarize(model, sparsity=0.5, criterion="taylor", decay=0.0, freeze_at=None, selection="channel",
                            min_kept=0)  # fmt: skip
    assert q.get_layer("ptq_d").quantize_config.options["taylor_decay"] == 0.99  # about 100 steps by default
    q.compile(keras.optimizers.SGD(0.0), "mse")  # no weight update: the step's gradient is easy to write down
    quantizer, qvars = _state(q)
    w = q.get_layer("ptq_d").weights[0].numpy()
    q.fit(x, t, batch_size=8, epochs=1, verbose=0, shuffle=False)
    mask = ternary.support_np(w, sparsity=0.5)  # step 0: magnitude
    w_q = ternary.project_np(w, mask)
    dl_dwq = 2.0 / (8 * 3) * x.T @ (x @ w_q - t)  # mean squared error over batch and outputs
    expected = np.abs(w * dl_dwq)
    expected /= expected.mean()  # each step's score over its mean on the layer; the first step sets the mean
    np.testing.assert_allclose(qvars["score"].numpy(), expected, rtol=1e-4, atol=1e-6)
    q.fit(x, t, batch_size=8, epochs=1, verbose=0, shuffle=False)  # step 1 selects on the score
    np.testing.assert_array_equal(qvars["mask"].numpy() > 0.5, ternary.support_np(expected, sparsity=0.5))
    assert not np.array_equal(ternary.support_np(expected, sparsity=0.5), mask)  # the criterion changed the support


def _taylor_run(scale, x, t, steps_scales):
    """Scores after one fit over batches whose loss is ``scale * steps_scales[i] * mse`` (one support throughout:
    frequency=100 re-selects it at step 0 only)."""
    q = ptq_keras.ternarize(_dense_model(), sparsity=0.5, criterion="taylor", taylor_decay=0.5, decay=0.0,
                            freeze_at=None, min_kept=0, frequency=100, selection="channel")  # fmt: skip
    q.compile(keras.optimizers.SGD(0.0), "mse")
    weights = np.repeat(np.asarray(steps_scales, np.float32) * scale, len(x) // len(steps_scales))
    q.fit(x, t, sample_weight=weights, batch_size=len(x) // len(steps_scales), epochs=1, verbose=0, shuffle=False)
    _, qvars = _state(q)
    return qvars["score"].numpy(), qvars["mask"].numpy()


def test_taylor_score_is_normalized_per_step_so_the_loss_scale_does_not_matter():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(24, 6)).astype(np.float32)
    t = rng.normal(size=(24, 3)).astype(np.float32)
    score, mask = _taylor_run(1.0, x, t, [1.0, 1.0, 1.0])
    score10, mask10 = _taylor_run(10.0, x, t, [1.0, 1.0, 1.0])
    np.testing.assert_allclose(score10, score, rtol=1e-4)  # the loss x10: the same score and the same support
    np.testing.assert_array_equal(mask10, mask)
    assert score.mean() == pytest.approx(1.0, rel=1e-4)  # a mean of per-step scores of mean 1
    # Every step weighs the same: a batch whose gradient is 1000x larger does not take the running mean over.
    loud, _ = _taylor_run(1.0, x, t, [1.0, 1.0, 1000.0])
    fresh = []
    for i in range(3):
        xb, tb = x[8 * i : 8 * (i + 1)], t[8 * i : 8 * (i + 1)]
        w = _dense_model().get_layer("d").kernel.numpy()
        w_q = ternary.project_np(w, ternary.support_np(w, sparsity=0.5))  # lr=0, one support: w_q never moves
        s = np.abs(w * (xb.T @ (xb @ w_q - tb)))
        fresh.append(s / s.mean())
    expected = 0.25 * fresh[0] + 0.25 * fresh[1] + 0.5 * fresh[2]  # taylor_decay=0.5; the first step sets it
    np.testing.assert_allclose(loud, expected, rtol=1e-3)
    np.testing.assert_allclose(score, expected, rtol=1e-3)


def test_soft_decay_fades_pruned_latents_once_per_epoch_until_the_support_freezes():
    x = np.ones((4, 8), np.float32)

    def run(freeze_at, epochs):
        q = ptq_keras.ternarize(_dense_model(8, 4), sparsity=0.5, soft_decay=0.5, decay=0.0, freeze_at=freeze_at)
        q.compile(keras.optimizers.SGD(0.0), "mse")  # no weight update: only the decay moves the latents
        w0 = q.get_layer("ptq_d").weights[0].numpy().copy()
        q.fit(x, np.zeros((4, 4)), batch_size=1, epochs=epochs, verbose=0)  # 4 steps per epoch
        _, qvars = _state(q)
        mask = qvars["mask"].numpy() > 0.5
        return w0, q.get_layer("ptq_d").weights[0].numpy(), mask

    w0, w, mask = run(None, 2)  # never frozen: one decay per epoch, not one per step (8 steps)
    np.testing.assert_allclose(w[mask], w0[mask])
    np.testing.assert_allclose(w[~mask], w0[~mask] * 0.5**2, rtol=1e-6)
    w0, w, mask = run(5, 3)  # frozen at step 5: epoch 1 (steps 0..3) decays; epochs 2 and 3 run past the freeze
    np.testing.assert_allclose(w[mask], w0[mask])
    np.testing.assert_allclose(w[~mask], w0[~mask] * 0.5, rtol=1e-6)


def test_decay_pruned_in_a_custom_training_loop():
    q = ptq_keras.ternarize(_dense_model(8, 4), sparsity=0.5, soft_decay=0.8, decay=0.0, freeze_at=6)
    optimizer = keras.optimizers.SGD(0.0)
    x = np.ones((4, 8), np.float32)
    w0 = q.get_layer("ptq_d").weights[0].numpy().copy()
    _, qvars = _state(q)
    decayed = []
    for _ in range(3):  # three epochs of two steps
        for _ in range(2):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(q(x, training=True)))
            optimizer.apply_gradients(zip(tape.gradient(loss, q.trainable_variables), q.trainable_variables))
        decayed.append(ptq_keras.decay_pruned(q))
    assert decayed == [1, 1, 1]  # steps 2, 4, 6: the freeze step (6) has not run yet
    assert ptq_keras.decay_pruned(q) == 1
    q(x, training=True)  # step 6 runs: the support is final
    assert ptq_keras.decay_pruned(q) == 0
    mask = qvars["mask"].numpy() > 0.5
    w = q.get_layer("ptq_d").weights[0].numpy()
    np.testing.assert_allclose(w[mask], w0[mask])
    np.testing.assert_allclose(w[~mask], w0[~mask] * 0.8**4, rtol=1e-5)
    plain = ptq_keras.ternarize(_dense_model(8, 4))  # soft_decay=1: nothing to decay
    assert ptq_keras.decay_pruned(plain) == 0


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        ({"criterion": "hessian"}, ValueError, "criterion='hessian'"),
        ({"criterion": "taylor", "threshold": "twn"}, ValueError, "criterion='taylor'"),
        ({"regularizer": "l1"}, ValueError, "regularizer='l1'"),
        ({"ste": "psg", "psg_strength": 0}, ValueError, "psg_strength"),
        ({"soft_decay": 0.0}, ValueError, "soft_decay"),
        ({"soft_decay": 1.5}, ValueError, "soft_decay"),
        ({"greg_interval": 0}, ValueError, "greg_interval"),
        ({"taylor_decay": 1.0}, ValueError, "taylor_decay"),
        ({"overrides": {"d": {"soft_decay": -1}}}, ValueError, r"overrides\['d'\]: soft_decay"),
    ],
)
def test_bad_method_options_explain(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        ptq_keras.ternarize(_dense_model(), **kwargs)


METHODS = {
    "taylor": {"criterion": "taylor"},
    "greg": {"regularizer": "greg", "greg_delta": 1e-2},
    "psg": {"ste": "psg"},
    "srfp": {"soft_decay": 0.9},
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_method_trains_exports_bit_exact_and_survives_h5(method, fashion_mnist, tmp_path):
    from ptq_keras import tflite

    x_train, y_train, x_test, _ = fashion_mnist
    x, y = x_train[:1024], y_train[:1024]
    q = ptq_keras.ternarize(small_cnn(), sparsity=0.7, overrides={"logits": {"sparsity": 0.5}}, **METHODS[method])
    q.compile(keras.optimizers.Adam(2e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = q.fit(x, y, epochs=2, batch_size=64, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    plain = ptq_keras.strip(q, batchnorm_data=x)
    for layer in plain.layers:
        if hasattr(layer, "kernel"):
            k = layer.kernel.numpy().reshape(-1, layer.kernel.shape[-1])
            target = min(0.5 if layer.name == "logits" else 0.7, ternary.max_sparsity(k.shape, 1, 4))  # min_kept
            assert np.count_nonzero(k) == ternary.keep_count(target, k.size)
            assert all(len(np.unique(np.abs(k[:, c][k[:, c] != 0]))) == 1 for c in range(k.shape[1])), layer.name
    result = tflite.export(plain, x[:128], str(tmp_path / "out"), targets=("int8", "micro"))
    parity = tflite.verify(plain, result.files["micro"], x_test[:200], num_samples=200, min_top1=0.9)
    assert parity.ok, str(parity)
    path = str(tmp_path / "q.h5")
    q.save(path)
    again = ptq_keras.load_model(path)
    assert again.get_layer("ptq_conv1").quantize_config.options["soft_decay"] == METHODS[method].get("soft_decay", 1.0)
    np.testing.assert_allclose(again.predict(x[:16], verbose=0), q.predict(x[:16], verbose=0), atol=1e-5)
    again.fit(x[:256], y[:256], epochs=1, batch_size=64, verbose=0)  # training continues
    steps = {int(v["step"].numpy()) for _, _, v in fitting.quantizer_states(again)}
    assert steps == {36}
