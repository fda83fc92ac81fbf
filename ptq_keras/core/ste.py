"""Straight-through estimators for the ternary projection, as ``keras.ops.custom_gradient`` functions.

The forward pass returns the projection ``W_q``; the backward pass returns, for upstream gradient ``g``:

- ``"identity"``: ``g``
- ``"masked"``: ``g * M`` (pruned latent weights stop moving; the "refined" finalizing phase)
- ``"clipped"``: ``g * 1[|W| <= clip * alpha]``
- ``"psg"``: ``g * lambda_s * |W - W_q|`` (position-based scaled gradient, Kim et al. NeurIPS 2020: weights near
  a grid point move slowly, so they stick to it)

plus the discrepancy ("weight decay") term ``decay * (W - W_q)`` that pulls pruned latents to 0 and kept ones
to ``+-alpha``, and the growing-regularization term ``greg * W * (1 - M)`` (GReg, Wang et al. ICLR 2021: an L2
penalty on the weights about to be pruned only). ``on_gradient(upstream)`` is called with ``dL/dW_q`` in the
backward pass (the Taylor-score statistic; TensorFlow only); its result (an op) runs before the gradient is
returned.

Written in ``keras.ops``: TensorFlow tensors in tf_keras and under Keras 3's TensorFlow backend, JAX arrays under
its JAX backend.
"""

from __future__ import annotations

from keras import ops

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
    w = ops.convert_to_tensor(w)
    dtype = w.dtype
    w_q = ops.stop_gradient(w_q)
    mask = ops.stop_gradient(ops.cast(mask, dtype))
    decay = ops.cast(decay, dtype)
    greg = ops.cast(greg, dtype)

    if mode == "masked":
        pass_through = mask
    elif mode == "clipped":
        pass_through = ops.cast(ops.abs(w) <= clip_bound, dtype)
    elif mode == "psg":
        pass_through = ops.cast(psg_strength, dtype) * ops.abs(w - w_q)
    else:
        pass_through = ops.ones_like(w)
    pass_through = ops.where(ops.cast(frozen, "bool"), mask, pass_through)

    # Everything the gradient reads is an argument (JAX's custom gradients cannot close over traced values); the
    # other arguments get zero gradients (they are stop_gradient'ed above).
    @ops.custom_gradient
    def _ste(latent, w_q, pass_through, mask, decay, greg):
        def grad(*args, upstream=None):
            if upstream is None:  # TensorFlow passes it by position, JAX by name
                (upstream,) = args
            out = upstream * pass_through + decay * (latent - w_q) + greg * latent * (1.0 - mask)
            if on_gradient is not None:
                import tensorflow as tf

                with tf.control_dependencies([on_gradient(upstream)]):
                    out = tf.identity(out)
            rest = (w_q, pass_through, mask, decay, greg)
            return (out, *(ops.zeros_like(x) for x in rest))

        return ops.copy(w_q), grad

    return _ste(w, w_q, pass_through, mask, decay, greg)
