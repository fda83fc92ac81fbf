"""Straight-through estimators for the ternary projection, as ``tf.custom_gradient`` functions.

The forward pass returns the projection ``W_q``; the backward pass returns, for upstream gradient ``g``:

- ``"identity"``: ``g``
- ``"masked"``: ``g * M`` (pruned latent weights stop moving; the "refined" finalizing phase)
- ``"clipped"``: ``g * 1[|W| <= clip * alpha]``
- ``"psg"``: ``g * lambda_s * |W - W_q|`` (position-based scaled gradient, Kim et al. NeurIPS 2020: weights near
  a grid point move slowly, so they stick to it)

plus the discrepancy ("weight decay") term ``decay * (W - W_q)`` that pulls pruned latents to 0 and kept ones
to ``+-alpha``, and the growing-regularization term ``greg * W * (1 - M)`` (GReg, Wang et al. ICLR 2021: an L2
penalty on the weights about to be pruned only). ``on_gradient(upstream)`` is called with ``dL/dW_q`` in the
backward pass (the Taylor-score statistic); its result (an op) runs before the gradient is returned.
"""

from __future__ import annotations

from .compat import tf

STE_MODES = ("identity", "masked", "clipped", "psg")


def ternary_ste(
    w, w_q, mask, *, mode: str, clip_bound=None, decay=0.0, frozen=False, psg_strength=150.0, greg=0.0,
    on_gradient=None,
):  # fmt: skip
    """Return ``w_q`` in the forward pass with the gradient of ``mode`` towards ``w``.

    ``mask`` is the support (same shape as ``w``); ``clip_bound`` the per-weight bound for ``"clipped"``;
    ``psg_strength`` the ``lambda_s`` of ``"psg"``; ``greg`` the strength of the penalty on pruned weights;
    ``frozen`` (a bool tensor) switches ``"identity"``, ``"clipped"`` and ``"psg"`` to ``"masked"``.
    """
    if mode not in STE_MODES:
        raise ValueError(f"ste={mode!r} is not one of {STE_MODES}.")
    w = tf.convert_to_tensor(w)
    w_q = tf.stop_gradient(w_q)
    mask = tf.stop_gradient(tf.cast(mask, w.dtype))
    decay = tf.cast(decay, w.dtype)
    greg = tf.cast(greg, w.dtype)

    if mode == "masked":
        pass_through = mask
    elif mode == "clipped":
        pass_through = tf.cast(tf.abs(w) <= clip_bound, w.dtype)
    elif mode == "psg":
        pass_through = tf.cast(psg_strength, w.dtype) * tf.abs(w - w_q)
    else:
        pass_through = tf.ones_like(w)
    pass_through = tf.where(tf.cast(frozen, tf.bool), mask, pass_through)

    @tf.custom_gradient
    def _ste(latent):
        def grad(upstream):
            out = upstream * pass_through + decay * (latent - w_q) + greg * latent * (1.0 - mask)
            if on_gradient is not None:
                with tf.control_dependencies([on_gradient(upstream)]):
                    out = tf.identity(out)
            return out

        return tf.identity(w_q), grad

    return _ste(w)
