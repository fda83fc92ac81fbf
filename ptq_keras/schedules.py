"""Sparsity schedules. tfmot ``PruningSchedule`` objects are used as they are; a float means a constant target.

A schedule maps the quantizer's own step counter to ``(update_mask, sparsity)``. The counter lives in the
quantizer (tfmot's wrapper step is never advanced), so plain ``model.fit`` moves the schedule forward.
"""

from __future__ import annotations

import numbers

from .compat import tfmot

PruningSchedule = tfmot.sparsity.keras.PruningSchedule
ConstantSparsity = tfmot.sparsity.keras.ConstantSparsity
PolynomialDecay = tfmot.sparsity.keras.PolynomialDecay

_SCHEDULES = {"ConstantSparsity": ConstantSparsity, "PolynomialDecay": PolynomialDecay}

__all__ = ["ConstantSparsity", "PolynomialDecay", "to_schedule", "final_sparsity", "end_step", "serialize",
           "deserialize"]


def to_schedule(sparsity, frequency: int = 1) -> PruningSchedule:
    """A float becomes ``ConstantSparsity(sparsity, begin_step=0, frequency=frequency)``; schedules pass."""
    if isinstance(sparsity, PruningSchedule):
        return sparsity
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):
        raise TypeError(
            f"sparsity must be a float in [0, 1) or a tfmot PruningSchedule "
            f"(e.g. ptq_keras.PolynomialDecay(...)), got {sparsity!r}."
        )
    if not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(
            f"sparsity={sparsity!r} is outside [0, 1): it is the fraction of weights set to zero, e.g. 0.7."
        )
    return ConstantSparsity(float(sparsity), begin_step=0, frequency=frequency)


def final_sparsity(schedule: PruningSchedule) -> float:
    """The sparsity the schedule ends at (its target)."""
    for attr in ("final_sparsity", "target_sparsity"):
        if hasattr(schedule, attr):
            return float(getattr(schedule, attr))
    _, sparsity = schedule(10**9)
    return float(sparsity)


def end_step(schedule: PruningSchedule) -> int:
    """The step where the schedule stops changing the mask, or -1 if it never stops."""
    return int(getattr(schedule, "end_step", -1))


def serialize(schedule: PruningSchedule) -> dict:
    return schedule.get_config()


def deserialize(config: dict) -> PruningSchedule:
    name = config["class_name"]
    if name not in _SCHEDULES:
        raise ValueError(f"Unknown sparsity schedule {name!r}; known: {sorted(_SCHEDULES)}.")
    return _SCHEDULES[name].from_config(config["config"])
