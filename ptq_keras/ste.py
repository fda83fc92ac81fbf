"""Straight-through estimators for the ternary projection, as ``tf.custom_gradient`` functions.

The forward pass returns the projection ``W_q``; the backward pass returns, for upstream gradient ``g``:

- ``"identity"``: ``g``
- ``"masked"``: ``g * M`` (pruned latent weights stop moving; the "refined" finalizing phase)
- ``"clipped"``: ``g * 1[|W| <= clip * alpha]``

plus the discrepancy ("weight decay") term ``decay * (W - W_q)`` that pulls pruned latents to 0 and kept ones
to ``+-alpha``.
"""

from __future__ import annotations

from .compat import tf

STE_MODES = ("identity", "masked", "clipped")


def ternary_ste(w, w_q, mask, *, mode: str, clip_bound=None, decay=0.0, frozen=False):
    """Return ``w_q`` in the forward pass with the gradient of ``mode`` towards ``w``.

    ``mask`` is the support (same shape as ``w``); ``clip_bound`` the per-weight bound for ``"clipped"``;
    ``frozen`` (a bool tensor) switches ``"identity"`` and ``"clipped"`` to ``"masked"``.
    """
    if mode not in STE_MODES:
        raise ValueError(f"ste={mode!r} is not one of {STE_MODES}.")
    w = tf.convert_to_tensor(w)
    w_q = tf.stop_gradient(w_q)
    mask = tf.stop_gradient(tf.cast(mask, w.dtype))
    decay = tf.cast(decay, w.dtype)

    if mode == "masked":
        pass_through = mask
    elif mode == "clipped":
        pass_through = tf.cast(tf.abs(w) <= clip_bound, w.dtype)
    else:
        pass_through = tf.ones_like(w)
    pass_through = tf.where(tf.cast(frozen, tf.bool), mask, pass_through)

    @tf.custom_gradient
    def _ste(latent):
        def grad(upstream):
            return upstream * pass_through + decay * (latent - w_q)

        return tf.identity(w_q), grad

    return _ste(w)
