"""Each straight-through estimator's gradient equals its formula."""

from __future__ import annotations

import numpy as np
import pytest

from ptq_keras.compat import tf
from ptq_keras.core import ste, ternary


def _setup(seed=0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(12, 3)).astype(np.float32)
    mask = ternary.support_np(w, sparsity=0.5)
    w_q = ternary.project_np(w, mask)
    upstream = rng.normal(size=w.shape).astype(np.float32)
    return w, mask, w_q, upstream


def _grad(w, w_q, mask, upstream, **kw):
    wt = tf.Variable(w)
    with tf.GradientTape() as tape:
        out = ste.ternary_ste(wt, tf.constant(w_q), tf.constant(mask), **kw)
        loss = tf.reduce_sum(out * upstream)
    np.testing.assert_allclose(out.numpy(), w_q)  # forward pass is the projection
    return tape.gradient(loss, wt).numpy()


@pytest.mark.parametrize("decay", [0.0, 0.3])
def test_identity_gradient(decay):
    w, mask, w_q, g = _setup()
    got = _grad(w, w_q, mask, g, mode="identity", decay=decay)
    np.testing.assert_allclose(got, g + decay * (w - w_q), rtol=1e-6)


@pytest.mark.parametrize("decay", [0.0, 0.3])
def test_masked_gradient(decay):
    w, mask, w_q, g = _setup(1)
    got = _grad(w, w_q, mask, g, mode="masked", decay=decay)
    np.testing.assert_allclose(got, g * mask + decay * (w - w_q), rtol=1e-6)
    assert np.all(got[~mask] == pytest.approx(decay * w[~mask]))


def test_clipped_gradient():
    w, mask, w_q, g = _setup(2)
    bound = np.float32(0.8)
    got = _grad(w, w_q, mask, g, mode="clipped", clip_bound=bound)
    np.testing.assert_allclose(got, g * (np.abs(w) <= bound))
    assert (np.abs(w) > bound).any() and (np.abs(w) <= bound).any()


def test_frozen_switches_identity_to_masked():
    w, mask, w_q, g = _setup(3)
    got = _grad(w, w_q, mask, g, mode="identity", frozen=tf.constant(True))
    np.testing.assert_allclose(got, g * mask)


def test_unknown_mode_is_rejected():
    w, mask, w_q, _ = _setup()
    with pytest.raises(ValueError, match="ste='straight'"):
        ste.ternary_ste(w, w_q, mask, mode="straight")
