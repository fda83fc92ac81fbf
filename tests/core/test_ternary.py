"""The projection math: numpy reference == TensorFlow twin, exact sparsity, L2 optimality, TWN, channel axes."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ptq_keras.compat import tf
from ptq_keras.core import schedules, ternary

# No subnormals, also after normalization: TensorFlow's CPU kernels flush them to zero, numpy does not (real weights
# are never that small).
finite = st.floats(-4.0, 4.0, allow_nan=False, allow_subnormal=False, width=32).filter(
    lambda v: v == 0 or abs(v) > 1e-30
)
matrices = hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=12), elements=finite)


def _tf_support(w2d, **kw):
    return ternary.support_ops(tf.constant(w2d), **kw).numpy()


@settings(max_examples=60, deadline=None)
@given(
    w=matrices,
    sparsity=st.floats(0.0, 0.99),
    threshold=st.sampled_from(ternary.THRESHOLDS),
    selection=st.sampled_from(ternary.GRANULARITIES),
    normalize=st.booleans(),
)
def test_numpy_and_tensorflow_supports_are_equal(w, sparsity, threshold, selection, normalize):
    kw = dict(threshold=threshold, sparsity=np.float32(sparsity), selection=selection, normalize=normalize)
    np.testing.assert_array_equal(ternary.support_np(w, **kw), _tf_support(w, **kw))


@settings(max_examples=40, deadline=None)
@given(w=matrices, granularity=st.sampled_from(ternary.GRANULARITIES), sparsity=st.floats(0.0, 0.95))
def test_numpy_and_tensorflow_projections_are_equal(w, granularity, sparsity):
    mask = ternary.support_np(w, sparsity=np.float32(sparsity))
    expected = ternary.project_np(w, mask, granularity)
    got = ternary.project_ops(tf.constant(w), tf.constant(mask), granularity).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 300), channels=st.integers(1, 6), sparsity=st.floats(0.0, 0.99), seed=st.integers(0, 99))
def test_sparsity_threshold_keeps_exactly_k_per_channel(n, channels, sparsity, seed):
    w = np.random.default_rng(seed).normal(size=(n, channels)).astype(np.float32)
    mask = ternary.support_np(w, sparsity=sparsity)
    k = ternary.keep_count(sparsity, n)
    assert k == max(1, min(n, int(np.floor((1 - np.float32(sparsity)) * n + 0.5))))
    np.testing.assert_array_equal(mask.sum(axis=0), [k] * channels)
    # the kept ones are the largest
    for c in range(channels):
        kept, dropped = np.abs(w[mask[:, c], c]), np.abs(w[~mask[:, c], c])
        if dropped.size:
            assert kept.min() >= dropped.max()


def test_tensor_selection_hits_layer_sparsity_where_small_channels_cannot():
    w = np.random.default_rng(0).normal(size=(9, 32)).astype(np.float32)  # a 3x3x1 filter bank
    per_channel = ternary.support_np(w, sparsity=0.7, selection="channel")
    per_tensor = ternary.support_np(w, sparsity=0.7, selection="tensor")
    assert 1 - per_channel.mean() == pytest.approx(6 / 9)  # 9 weights: multiples of 1/9 only
    assert 1 - per_tensor.mean() == pytest.approx(0.7, abs=0.5 / w.size)


def test_ties_go_to_the_lower_index():
    w = np.array([[1.0], [1.0], [1.0], [0.5]], np.float32)
    np.testing.assert_array_equal(ternary.support_np(w, sparsity=0.5)[:, 0], [True, True, False, False])
    np.testing.assert_array_equal(_tf_support(w, sparsity=0.5)[:, 0], [True, True, False, False])


def _brute_force_l2(v):
    """Best sign-and-support ternary approximation alpha * t of v, by enumeration."""
    best = (np.inf, None)
    for t in itertools.product((-1, 0, 1), repeat=v.size):
        t = np.array(t, np.float64)
        if not t.any():
            continue
        alpha = max(0.0, float(v @ t) / float(t @ t))
        err = float(np.sum((v - alpha * t) ** 2))
        if err < best[0] - 1e-12:
            best = (err, alpha * t)
    return best


@settings(max_examples=40, deadline=None)
@given(v=hnp.arrays(np.float64, st.integers(1, 7), elements=st.floats(-3, 3, allow_nan=False)))
def test_l2_threshold_is_the_exact_projection(v):
    w = v.astype(np.float32)[:, None]
    mask = ternary.support_np(w, threshold="l2")
    projected = ternary.project_np(w, mask)[:, 0].astype(np.float64)
    err = float(np.sum((w[:, 0] - projected) ** 2))
    best_err, _ = _brute_force_l2(w[:, 0].astype(np.float64))
    assert err <= best_err + 1e-5 * (1 + best_err)


@settings(max_examples=30, deadline=None)
@given(v=hnp.arrays(np.float32, st.integers(2, 40), elements=st.floats(-3, 3, allow_nan=False, width=32)))
def test_scale_is_l2_optimal_for_its_support(v):
    w = v[:, None]
    mask = ternary.support_np(w, sparsity=0.5)
    alpha = ternary.scale_np(w, mask)[0]
    t = (np.sign(w) * mask)[:, 0]

    def err(a):
        return float(np.sum((w[:, 0] - a * t) ** 2))

    assert err(alpha) <= min(err(alpha * 1.01), err(alpha * 0.99)) + 1e-9


def test_twn_threshold_is_point_seven_mean_abs():
    w = np.array([[0.1], [-0.2], [0.9], [-1.2], [0.05]], np.float32)
    delta = 0.7 * np.abs(w).mean()
    np.testing.assert_array_equal(ternary.support_np(w, threshold="twn")[:, 0], np.abs(w[:, 0]) > delta)


def test_depthwise_channel_axis_is_in_times_multiplier():
    rng = np.random.default_rng(1)
    kernel = rng.normal(size=(3, 3, 4, 2)).astype(np.float32)  # (kh, kw, in, mult): 8 output channels
    q = ternary.ternarize_np(kernel, channel_dims=2, sparsity=0.5)
    per_channel = q.reshape(9, 8)
    for c in range(8):
        values = np.unique(np.abs(per_channel[:, c]))
        assert len(values[values > 0]) == 1  # one scale per (in, mult) pair
        assert np.count_nonzero(per_channel[:, c]) == ternary.keep_count(0.5, 9)
    # channel c = in * mult + m, as TFLite lays out depthwise weights
    np.testing.assert_array_equal(per_channel[:, 3], q[:, :, 1, 1].reshape(-1))


def test_normalization_balances_channels_in_tensor_selection():
    rng = np.random.default_rng(2)
    w = rng.normal(size=(50, 4)).astype(np.float32) * np.array([100.0, 1.0, 1.0, 0.01], np.float32)
    raw = ternary.support_np(w, sparsity=0.5, selection="tensor")
    normalized = ternary.support_np(w, sparsity=0.5, selection="tensor", normalize=True)
    assert raw[:, 3].sum() == 1  # without normalization only the small channel's largest weight survives
    assert normalized.sum(axis=0).min() >= 15


def test_tensor_granularity_gives_one_scale():
    w = np.random.default_rng(3).normal(size=(10, 5)).astype(np.float32)
    q = ternary.project_np(w, ternary.support_np(w, sparsity=0.3), "tensor")
    assert len(np.unique(np.abs(q[q != 0]))) == 1


def test_tensor_selection_keeps_every_channel_alive():
    rng = np.random.default_rng(3)
    w = rng.normal(size=(50, 6)).astype(np.float32)
    w[:, 2] *= 1e-3  # a channel of tiny weights: a plain layer-wide top-k would empty it
    mask = ternary.support_np(w, sparsity=0.9, selection="tensor")
    assert mask.sum() == ternary.keep_count(0.9, w.size)
    assert mask.sum(axis=0).min() >= 1 and mask[:, 2].sum() == 1
    assert mask[np.argmax(np.abs(w[:, 2])), 2]
    got = ternary.support_ops(tf.constant(w), sparsity=0.9, selection="tensor").numpy()
    np.testing.assert_array_equal(got, mask)


@settings(max_examples=60, deadline=None)
@given(
    w=matrices,
    sparsity=st.floats(0.0, 0.99),
    channel_sparsity=st.floats(0.0, 0.99),
    threshold=st.sampled_from(ternary.THRESHOLDS),
    selection=st.sampled_from(ternary.GRANULARITIES),
)
def test_dead_channels_numpy_and_tensorflow_agree(w, sparsity, channel_sparsity, threshold, selection):
    """0-bit channels: the same dead set and support in both twins; dead columns empty, the rest as before."""
    count = ternary.dead_count(np.float32(channel_sparsity), w.shape[1])
    assert count == int(ternary.dead_count_ops(np.float32(channel_sparsity), w.shape[1]))
    dead = ternary.dead_channels_np(w, count)
    np.testing.assert_array_equal(dead, ternary.dead_channels_ops(tf.constant(w), count).numpy())
    assert dead.sum() == count < w.shape[1]
    kw = dict(threshold=threshold, sparsity=np.float32(sparsity), selection=selection)
    mask = ternary.support_np(w, dead=dead, **kw)
    np.testing.assert_array_equal(mask, _tf_support(w, dead=tf.constant(dead), **kw))
    assert not mask[:, dead].any()
    if threshold == "sparsity" and selection == "channel":  # live channels unchanged by their neighbours' death
        np.testing.assert_array_equal(mask[:, ~dead], ternary.support_np(w[:, ~dead], **kw))


def test_dead_channels_are_the_smallest_norms_and_sparsity_counts_live_weights():
    w = np.array([[3.0, 0.1, 2.0, 0.2], [3.0, 0.1, -2.0, 0.3]], np.float32)
    dead = ternary.dead_channels_np(w, ternary.dead_count(0.5, 4))
    np.testing.assert_array_equal(dead, [False, True, False, True])
    mask = ternary.support_np(w, sparsity=0.5, selection="tensor", dead=dead)
    assert mask.sum() == 2 and mask[:, [0, 2]].any(axis=0).all()  # half of the 4 live weights, both channels alive
    assert ternary.dead_count(0.99, 4) == 3  # one channel always stays


@pytest.mark.parametrize(
    "schedule",
    [
        schedules.ConstantSparsity(0.7, 0, frequency=3),
        schedules.ConstantSparsity(0.5, begin_step=5, end_step=20, frequency=2),
        schedules.PolynomialDecay(0.1, 0.8, 3, 40, power=3, frequency=4),
        schedules.PolynomialDecay(0.0, 0.7, 0, 10, power=2, frequency=100),
    ],
)
def test_schedule_evaluated_in_keras_ops_equals_tfmot(schedule):
    for step in range(60):
        want_update, want = schedule(tf.constant(step, tf.int64))
        got_update, got = schedules.evaluate(schedule, tf.constant(step, tf.int64))
        assert bool(want_update) == bool(got_update), step
        assert np.float32(want) == np.float32(got), step
