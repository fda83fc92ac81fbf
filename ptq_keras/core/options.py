"""The options of one ternarized kernel: their defaults, their choices, and the one place that validates them
(``ternarize``, its ``overrides``, the quantizer and the training script all call :func:`validate` or
:func:`with_defaults`)."""

from __future__ import annotations

import numbers
from collections.abc import Mapping

from . import schedules, ste, ternary

# Options of one quantized kernel, with their defaults. ``ternarize`` validates them; the quantizer stores them.
DEFAULTS = {
    "sparsity": 0.7,
    "threshold": "sparsity",
    "granularity": "channel",
    "selection": "tensor",  # layer-wide top-k, every channel kept alive (measured: benchmarks/results/ablation.md)
    "normalize": False,
    "ste": "psg",  # position-based scaled gradient; measured better than "identity" on both models, 0.7 and 0.85
    "clip": 2.0,
    "decay": 1e-3,
    "freeze_at": 0.5,
    "frequency": 1,
    # A layer keeps at least this many weights per output channel on average: its sparsity is capped at
    # 1 - min_kept / fan-in (stems, depthwise 3x3 filters; measured: benchmarks/results/min_kept_*.md)
    "min_kept": 4,
    # Related methods (docs/METHODS.md)
    # Support by |w|, or "taylor": a running mean of |w * dL/dW_q| (Yu et al. 2020), each step's score divided by
    # its mean over the layer (every step weighs the same; scores comparable across steps and loss scales)
    "criterion": "magnitude",
    "taylor_decay": 0.99,  # the running mean's decay per step (0.99: about the last 100 steps)
    "psg_strength": 150.0,  # lambda_s of ste="psg" (Kim et al. 2020)
    "regularizer": None,  # or "greg": growing L2 penalty on the weights about to be pruned (Wang et al. 2021)
    "greg_delta": 1e-4,  # GReg: the penalty grows by delta ...
    "greg_interval": 5,  # ... every interval steps ...
    "greg_ceiling": 1.0,  # ... up to this ceiling (the paper's code defaults)
    # SRFP (Cai et al. 2020): pruned latents are multiplied by soft_decay once per epoch (at the end of each epoch
    # of fit, ptq_keras.fitting.decay_pruned) until the support freezes (1: SFP, no decay)
    "soft_decay": 1.0,
    "channel_sparsity": 0.0,  # 0-bit channels: this fraction of output channels (smallest norm) is zeroed whole
}
CRITERIA = ("magnitude", "taylor")
REGULARIZERS = (None, "greg")

def with_defaults(options: Mapping, where: str) -> dict:
    """``options`` with the defaults filled in; ``TypeError`` naming an unknown option."""
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise TypeError(f"{where}: unknown option(s) {unknown}; known options: {sorted(DEFAULTS)}.")
    return {**DEFAULTS, **options}


CHOICES = {
    "threshold": ternary.THRESHOLDS,
    "granularity": ternary.GRANULARITIES,
    "selection": ternary.GRANULARITIES,
    "ste": ste.STE_MODES,
    "criterion": CRITERIA,
    "regularizer": REGULARIZERS,
}


def validate(options: Mapping, where: str) -> dict:
    """Check every per-layer option; return them with defaults filled in (a schedule of tfmot's as this
    package's own). ``where`` starts every error message (e.g. ``"ternarize"``, ``"overrides['fc1']"``)."""
    merged = with_defaults(options, where)
    for name, choices in CHOICES.items():
        if merged[name] not in choices:
            raise ValueError(f"{where}: {name}={merged[name]!r} is not one of {list(choices)}.")
    try:
        schedule = schedules.to_schedule(merged["sparsity"], 1)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{where}: {exc}") from None
    if schedules.is_schedule(merged["sparsity"]):
        merged["sparsity"] = schedule
    if not isinstance(merged["normalize"], bool):
        raise TypeError(f"{where}: normalize must be True or False, got {merged['normalize']!r}.")
    for name, (accepts, wanted) in NUMBERS.items():
        value = merged[name]
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not accepts(value):
            raise ValueError(f"{where}: {name} must be {wanted}, got {value!r}.")
    if not isinstance(merged["greg_interval"], numbers.Integral) or merged["greg_interval"] < 1:
        raise ValueError(f"{where}: greg_interval must be an integer >= 1, got {merged['greg_interval']!r}.")
    if merged["criterion"] == "taylor" and merged["threshold"] != "sparsity":
        raise ValueError(
            f"{where}: criterion='taylor' ranks weights for the exact top-k; use it with threshold='sparsity', "
            f"not {merged['threshold']!r}."
        )
    decay = merged["decay"]
    if not callable(decay) and (not isinstance(decay, numbers.Real) or decay < 0):
        raise ValueError(f"{where}: decay must be a number >= 0 (or a callable of the step), got {decay!r}.")
    merged["freeze_at"] = checked_freeze_at(merged["freeze_at"], where)
    if schedules.is_schedule(merged["sparsity"]):
        merged["sparsity"] = schedules.checked_frequency(merged["sparsity"], merged["ste"], where)
    if not isinstance(merged["frequency"], numbers.Integral) or merged["frequency"] < 1:
        raise ValueError(f"{where}: frequency must be an integer >= 1, got {merged['frequency']!r}.")
    return merged


# Numeric options: name -> (accepts the value, what the error message asks for).
NUMBERS = {
    "clip": (lambda v: v > 0, "a positive number"),
    "psg_strength": (lambda v: v > 0, "a positive number"),
    "greg_ceiling": (lambda v: v > 0, "a positive number"),
    "greg_delta": (lambda v: v >= 0, "a number >= 0"),
    "taylor_decay": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "soft_decay": (lambda v: 0 < v <= 1, "in (0, 1] (1: pruned weights keep their values)"),
    "channel_sparsity": (lambda v: 0 <= v < 1, "a fraction in [0, 1) of output channels to zero whole"),
    "min_kept": (lambda v: v >= 0, "a number >= 0 of weights kept per output channel on average (0: no cap)"),
}


def checked_freeze_at(freeze_at, where: str):
    """``None``, an int step >= 0, or a float fraction of training in (0, 1]."""
    if freeze_at is None:
        return None
    if isinstance(freeze_at, bool) or not isinstance(freeze_at, numbers.Real):
        raise TypeError(
            f"{where}: freeze_at must be a fraction of training in (0, 1] (e.g. 0.5), a step number (int), or None, "
            f"got {freeze_at!r}."
        )
    if isinstance(freeze_at, numbers.Integral):
        if freeze_at < 0:
            raise ValueError(f"{where}: freeze_at={freeze_at!r}: a step number must be >= 0.")
        return int(freeze_at)
    if not 0.0 < float(freeze_at) <= 1.0:
        raise ValueError(
            f"{where}: freeze_at={freeze_at!r}: a float is a fraction of the training steps of the first fit() and "
            "must be in (0, 1]; pass an int for a step number."
        )
    return float(freeze_at)


def stored(options: Mapping) -> dict:
    """Options as stored in a layer's config (schedules serialized)."""
    out = dict(options)
    if schedules.is_schedule(out["sparsity"]):
        out["sparsity"] = schedules.serialize(out["sparsity"])
    return out
