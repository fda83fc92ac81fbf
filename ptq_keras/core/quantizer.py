"""The ternary quantizer of one kernel: its options, its state (step, mask, sparsity, freeze step, Taylor score)
and the projection with its straight-through gradient, in ``keras.ops`` (tf_keras, Keras 3 on TensorFlow or JAX).

The frontends create its variables from :meth:`TernaryQuantizer.variable_specs` (tf_keras through tfmot's
``Quantizer.build``, Keras 3 through its wrapper layer) and call it with them.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
from keras import ops

from . import options as options_module
from . import schedules, ste, ternary
from .options import CRITERIA, DEFAULTS, REGULARIZERS

__all__ = ["CRITERIA", "DEFAULTS", "REGULARIZERS", "KernelQuantizers", "TernaryQuantizer", "VariableSpec"]


@dataclass(frozen=True)
class VariableSpec:
    """One non-trainable variable of a quantizer: ``aggregation`` is how ``tf.distribute`` combines replicas
    (``"only_first_replica"``: every replica computes the same value; ``"mean"``: averaged)."""

    name: str
    shape: tuple
    dtype: str
    initial: float  # a constant
    aggregation: str
    autocast: bool = False


def _after(effects, value):
    """``value``, computed after ``effects`` (variable updates) in TensorFlow graphs. JAX traces run in program
    order (Keras 3 records the updates), so there it is ``value`` as it is."""
    tf = sys.modules.get("tensorflow")  # effects are TensorFlow ops only where TensorFlow runs
    if tf is not None and any(tf.is_tensor(e) or isinstance(e, tf.Operation) for e in effects if e is not None):
        with tf.control_dependencies([e for e in effects if e is not None]):
            return tf.identity(value)
    return value


class TernaryQuantizer:
    """Sparse ternary projection of a kernel: ``W_q = alpha * sign(W) * M``.

    Variables (non-trainable, saved with the model): ``step`` (training steps seen), ``mask`` (the support ``M``)
    and ``sparsity`` (the scheduled sparsity when the mask was last chosen). In training the mask is re-chosen when
    the schedule says so (and at step 0), until the freeze step; from the freeze step on the STE is ``"masked"``.
    Outside training the stored mask is used. The scale always comes from the current latent weights.
    """

    def __init__(self, channel_dims: int = 1, **options):
        self.channel_dims = int(channel_dims)
        self.options = options_module.with_defaults(options, "TernaryQuantizer")
        sparsity = self.options["sparsity"]
        if isinstance(sparsity, dict):
            sparsity = schedules.deserialize(sparsity)
        self.schedule = schedules.to_schedule(sparsity, self.options["frequency"])
        self.freeze_fraction = schedules.freeze_fraction(self.options["freeze_at"])
        self.freeze_step = schedules.initial_freeze_step(self.options["freeze_at"], self.schedule)

    def variable_specs(self, tensor_shape, name: str) -> list[VariableSpec]:
        """The quantizer's variables for a kernel of ``tensor_shape`` (``name`` prefixes theirs), by role:
        ``step`` (training steps seen), ``mask`` (the support), ``sparsity`` (scheduled when the mask was last
        chosen), ``freeze_step`` (-1: never, or for a fractional ``freeze_at`` not yet resolved: the first ``fit``
        writes it, see ptq_keras.fitting) and, for ``criterion="taylor"``, ``score``.

        Under tf.distribute every replica computes the same step, mask and sparsity from the same mirrored
        weights (``only_first_replica``); the Taylor score comes from each replica's own gradients and is averaged
        (``mean``), so every replica selects the support of the global batch."""
        shape, first = tuple(tensor_shape), "only_first_replica"
        specs = {
            "step": VariableSpec(f"{name}_ptq_step", (), "int64", 0, first),
            "mask": VariableSpec(f"{name}_ptq_mask", shape, "float32", 1, first),  # float32 under mixed precision
            "sparsity": VariableSpec(f"{name}_ptq_sparsity", (), "float32", 0, first),
            "freeze_step": VariableSpec(f"{name}_ptq_freeze_step", (), "int64", self.freeze_step, first),
        }
        if self.options["criterion"] == "taylor":
            specs["score"] = VariableSpec(f"{name}_ptq_taylor_score", shape, "float32", 0, "mean")
        return specs

    def __call__(self, inputs, training, weights, **kwargs):
        # Written in keras.ops: the tf_keras path (TensorFlow) and Keras 3 (TensorFlow or JAX) run this same code.
        # Under mixed precision the layer reads its kernel in float16; the ternary math runs in float32 (exact
        # top-k, scales, masks), and the result goes back in the layer's compute dtype.
        compute_dtype = getattr(self, "compute_dtype", "float32")
        w = ops.cast(ops.convert_to_tensor(inputs), "float32")
        freeze = ops.copy(weights["freeze_step"])
        if training:
            mask, current_step, step_update = self._select(w, weights, freeze)
        else:
            mask, current_step, step_update = ops.copy(weights["mask"]), ops.copy(weights["step"]), None
        frozen = ops.logical_and(freeze >= 0, current_step >= freeze)
        w_q = self.project(w, mask)
        clip_bound = self.options["clip"] * self._alpha(w, mask) if self.options["ste"] == "clipped" else None
        decay = self.options["decay"]
        if callable(decay):
            decay = decay(current_step)
        greg = ops.where(frozen, 0.0, self.greg_strength(current_step)) if self.options["regularizer"] else 0.0
        on_gradient = None
        if training and "score" in weights:
            on_gradient = self._taylor_update(w, weights["score"], current_step)
        out = ste.ternary_ste(
            w, w_q, mask, mode=self.options["ste"], clip_bound=clip_bound, decay=decay, frozen=frozen,
            psg_strength=self.options["psg_strength"], greg=greg, on_gradient=on_gradient,
        )  # fmt: skip
        if step_update is not None:
            out = _after([step_update], out)
        return ops.cast(out, compute_dtype)

    def _select(self, w, weights, freeze):
        """One training step's support: re-chosen when the schedule says so (and at step 0, after a ramp every step,
        and at the freeze step itself: the last selection), never after the freeze. Writes the mask, the sparsity
        and the step; returns ``(mask, this step, the step counter's update)``. (``soft_decay``, SRFP, is not
        applied here: ``fit`` multiplies the pruned latents once per epoch, ptq_keras.fitting.decay_pruned.)"""
        step, mask_var, sparsity_var = weights["step"], weights["mask"], weights["sparsity"]
        freezes = freeze >= 0
        now = ops.copy(step)
        should_update, target = schedules.evaluate(self.schedule, now)
        target = ops.minimum(ops.cast(target, "float32"), self.max_sparsity(w.shape))
        update = ops.logical_or(now == 0, should_update)
        if schedules.end_step(self.schedule) >= 0:
            # After a ramp, keep re-selecting every step until the freeze: a support left fixed under a
            # pass-through STE lets pruned latents drift, then reshuffles at once.
            update = ops.logical_or(update, now > schedules.end_step(self.schedule))
        update = ops.logical_or(update, ops.logical_and(freezes, now == freeze))
        update = ops.logical_and(update, ops.logical_or(ops.logical_not(freezes), now <= freeze))
        scores = self._scores(w, weights, now)
        mask = ops.cond(update, lambda: self.support(scores, target), lambda: ops.copy(mask_var))
        new_sparsity = ops.where(update, ops.cast(target, "float32"), ops.copy(sparsity_var))
        current_step = _after([mask_var.assign(mask), sparsity_var.assign(new_sparsity)], now)
        return ops.copy(mask), current_step, _after([current_step], step.assign_add(1))

    def _taylor_update(self, w, score_var, current_step):
        """``criterion="taylor"``: the backward-pass hook that folds ``|w * dL/dW_q|``, over its mean on the layer
        (every step weighs the same, whatever the gradient's magnitude or the loss's scale), into the running
        score (``taylor_decay`` per step; the first step sets it; a step with no gradient leaves it)."""
        keep = self.options["taylor_decay"]

        def on_gradient(upstream):
            fresh = ops.abs(w * ops.cast(upstream, "float32"))
            mean = ops.mean(fresh)
            fresh = fresh / ops.maximum(mean, 1e-30)
            started = ops.cast(current_step > 0, "float32")
            rate = ops.where(mean > 0, keep * started, 1.0)
            return score_var.assign(rate * ops.copy(score_var) + (1.0 - rate) * fresh)

        return on_gradient

    def get_config(self):
        options = dict(self.options)
        options["sparsity"] = schedules.serialize(self.schedule)
        return {"channel_dims": self.channel_dims, **options}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __eq__(self, other):
        return isinstance(other, TernaryQuantizer) and self.get_config() == other.get_config()

    def __hash__(self):
        return hash(repr(sorted(self.get_config().items())))

    def __ne__(self, other):
        return not self.__eq__(other)

    # -- the math, through ptq_keras.core.ternary
    def greg_strength(self, step):
        """GReg's penalty at ``step``: ``min(ceiling, delta * floor(step / interval))``."""
        o = self.options
        grown = o["greg_delta"] * ops.cast(ops.floor_divide(ops.cast(step, "int64"), o["greg_interval"]), "float32")
        return ops.minimum(grown, o["greg_ceiling"])

    def _scores(self, w, weights, step):
        """What the support is chosen on: ``w`` (by magnitude), or the Taylor score (``|w|`` until a gradient
        has been seen)."""
        if "score" not in weights:
            return w
        return ops.where(step > 0, ops.copy(weights["score"]), ops.abs(w))

    def max_sparsity(self, shape) -> float:
        """The highest sparsity this kernel is pruned to (``min_kept`` weights per output channel kept)."""
        return ternary.max_sparsity(tuple(shape), self.channel_dims, self.options["min_kept"])

    def support(self, w, sparsity):
        """Support mask (float32, shape of ``w``) for ``sparsity``, the scheduled target already capped by
        ``max_sparsity``."""
        w2d = ternary.as_groups_ops(w, self.channel_dims)
        dead = None
        if self.options["channel_sparsity"] > 0:
            # Dead channels follow the schedule: their share grows with the scheduled (capped) sparsity.
            final = min(schedules.final_sparsity(self.schedule), self.max_sparsity(w.shape))
            progress = ops.minimum(ops.cast(sparsity, "float32") / final, 1.0) if final > 0 else 1.0
            count = ternary.dead_count_ops(self.options["channel_sparsity"] * progress, int(w2d.shape[1]))
            dead = ternary.dead_channels_ops(w2d, count)
        mask = ternary.support_ops(
            w2d,
            threshold=self.options["threshold"],
            sparsity=sparsity,
            selection=self.options["selection"],
            normalize=self.options["normalize"],
            dead=dead,
        )
        return ops.reshape(ops.cast(mask, "float32"), w.shape)

    def _alpha(self, w, mask):
        """Per-weight scale (shape of ``w``)."""
        w2d = ternary.as_groups_ops(w, self.channel_dims)
        alpha = ternary.scale_ops(w2d, ternary.as_groups_ops(mask, self.channel_dims), self.options["granularity"])
        return ops.reshape(ops.broadcast_to(alpha[None, :], w2d.shape), w.shape)

    def project(self, w, mask):
        w2d = ternary.as_groups_ops(w, self.channel_dims)
        m2d = ternary.as_groups_ops(mask, self.channel_dims)
        return ops.reshape(ternary.project_ops(w2d, m2d, self.options["granularity"]), w.shape)

    def project_numpy(self, w: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """The exact ternary kernel for latent ``w`` and support ``mask`` (what ``strip`` writes)."""
        w2d = ternary.as_groups(np.asarray(w, np.float32), self.channel_dims)
        m2d = ternary.as_groups(np.asarray(mask) > 0.5, self.channel_dims)
        return ternary.project_np(w2d, m2d, self.options["granularity"]).reshape(np.shape(w))


class KernelQuantizers:
    """The kernels of one layer that train as ternary weights, ``[(attribute, channel_dims), ...]``, their options,
    and one quantizer per kernel (of ``quantizer_class``, made on first use). Saved as ``{"attributes",
    "options"}`` in the wrapper's config (both frontends)."""

    quantizer_class = TernaryQuantizer

    def __init__(self, attributes, options=None):
        self.attributes = [(str(a), int(d)) for a, d in attributes]
        self.options = dict(options or {})
        self._quantizers = None

    def _get_quantizers(self):
        if self._quantizers is None:
            self._quantizers = [self.quantizer_class(dims, **self.options) for _, dims in self.attributes]
        return self._quantizers

    def get_config(self):
        stored = dict(self.options)
        if "sparsity" in stored and not isinstance(stored["sparsity"], (int, float, dict)):
            stored["sparsity"] = stored["sparsity"].get_config()
        return {"attributes": [list(a) for a in self.attributes], "options": stored}

    @classmethod
    def from_config(cls, config):
        return cls(**config)
