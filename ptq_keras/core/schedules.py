"""Sparsity schedules: ``ConstantSparsity`` and ``PolynomialDecay`` with tfmot's constructors, formulas and saved
configs, computed in ``keras.ops`` (every Keras 3 backend; no tfmot import). tfmot's own schedules of those two
kinds are converted to them; another schedule object (``schedule(step) -> (update, sparsity)`` and
``get_config()``, e.g. a tfmot ``PruningSchedule`` subclass) is called as it is. A float means a constant target.

A schedule maps the quantizer's own step counter to ``(update_mask, sparsity)``. The counter lives in the
quantizer (tfmot's wrapper step is never advanced), so plain ``model.fit`` moves the schedule forward.
"""

from __future__ import annotations

import numbers
import warnings


class PruningSchedule:
    """Base of the schedules: ``schedule(step) -> (re-select the support at step, scheduled sparsity)``."""

    def __call__(self, step):
        return evaluate(self, step)

    def get_config(self) -> dict:
        return {"class_name": type(self).__name__, "config": dict(self._config())}

    @classmethod
    def from_config(cls, config: dict):
        return cls(**config)

    def __eq__(self, other):
        return type(other) is type(self) and other.get_config() == self.get_config()

    def __hash__(self):
        return hash(repr(sorted(self._config().items())))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self._config().items())})"

    def _config(self) -> dict:
        raise NotImplementedError


def _check_sparsity(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name}={value!r} must be a float in [0, 1).")
    return float(value)


def _check_steps(begin_step, end_step, frequency, end_may_be_open: bool) -> None:
    if begin_step < 0:
        raise ValueError(f"begin_step={begin_step} must be >= 0.")
    if frequency <= 0:
        raise ValueError(f"frequency={frequency} must be > 0 (steps between support re-selections).")
    if end_step != -1 or not end_may_be_open:
        if end_step < 0:
            raise ValueError(f"end_step={end_step} must be >= 0" + (" or -1 (never)." if end_may_be_open else "."))
        if end_step < begin_step:
            raise ValueError(f"end_step={end_step} must be >= begin_step={begin_step}.")


class ConstantSparsity(PruningSchedule):
    """The target sparsity from ``begin_step`` on, re-selected every ``frequency`` steps (until ``end_step``)."""

    def __init__(self, target_sparsity, begin_step, end_step=-1, frequency=100):
        self.target_sparsity = _check_sparsity(target_sparsity, "target_sparsity")
        self.begin_step, self.end_step, self.frequency = int(begin_step), int(end_step), int(frequency)
        _check_steps(self.begin_step, self.end_step, self.frequency, end_may_be_open=True)

    def _config(self) -> dict:
        return {"target_sparsity": self.target_sparsity, "begin_step": self.begin_step, "end_step": self.end_step,
                "frequency": self.frequency}  # fmt: skip


class PolynomialDecay(PruningSchedule):
    """Sparsity from ``initial_sparsity`` to ``final_sparsity`` between ``begin_step`` and ``end_step``:
    ``final + (initial - final) * (1 - progress) ** power``, re-selected every ``frequency`` steps."""

    def __init__(self, initial_sparsity, final_sparsity, begin_step, end_step, power=3, frequency=100):
        self.initial_sparsity = _check_sparsity(initial_sparsity, "initial_sparsity")
        self.final_sparsity = _check_sparsity(final_sparsity, "final_sparsity")
        self.begin_step, self.end_step, self.frequency = int(begin_step), int(end_step), int(frequency)
        self.power = power
        _check_steps(self.begin_step, self.end_step, self.frequency, end_may_be_open=False)

    def _config(self) -> dict:
        return {"initial_sparsity": self.initial_sparsity, "final_sparsity": self.final_sparsity,
                "begin_step": self.begin_step, "end_step": self.end_step, "power": self.power,
                "frequency": self.frequency}  # fmt: skip


_SCHEDULES = {"ConstantSparsity": ConstantSparsity, "PolynomialDecay": PolynomialDecay}

__all__ = ["ConstantSparsity", "PolynomialDecay", "PruningSchedule", "is_schedule", "to_schedule", "final_sparsity",
           "end_step", "serialize", "deserialize", "freeze_fraction", "initial_freeze_step", "with_frequency"]


def is_schedule(value) -> bool:
    """A schedule object: ours, or another with ``__call__`` and ``get_config`` (a tfmot ``PruningSchedule``)."""
    return isinstance(value, PruningSchedule) or (callable(value) and hasattr(value, "get_config")
                                                 and not isinstance(value, type))  # fmt: skip


def to_schedule(sparsity, frequency: int = 1) -> PruningSchedule:
    """A float becomes ``ConstantSparsity(sparsity, begin_step=0, frequency=frequency)``; schedules pass (tfmot's
    ``ConstantSparsity`` / ``PolynomialDecay`` as the same schedule of this module)."""
    if isinstance(sparsity, PruningSchedule):
        return sparsity
    if is_schedule(sparsity):
        kind = _SCHEDULES.get(type(sparsity).__name__)
        return kind.from_config(sparsity.get_config()["config"]) if kind else sparsity
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):
        raise TypeError(
            f"sparsity must be a float in [0, 1) or a PruningSchedule "
            f"(e.g. ptq_keras.PolynomialDecay(...)), got {sparsity!r}."
        )
    if not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(
            f"sparsity={sparsity!r} is outside [0, 1): it is the fraction of weights set to zero, e.g. 0.7."
        )
    return ConstantSparsity(float(sparsity), begin_step=0, frequency=frequency)


def evaluate(schedule: PruningSchedule, step):
    """``(re-select the support at step, scheduled sparsity)``.

    ``ConstantSparsity`` and ``PolynomialDecay`` are computed here in ``keras.ops`` with tfmot's formulas (so they
    run on every Keras 3 backend; tested equal to tfmot's own); another schedule object is called (TensorFlow).
    """
    ours = isinstance(schedule, (ConstantSparsity, PolynomialDecay))
    if not ours or type(schedule).__call__ is not PruningSchedule.__call__:
        return schedule(step)
    from keras import ops

    step = ops.cast(step, "int64")
    begin, end, every = int(schedule.begin_step), int(schedule.end_step), int(schedule.frequency)
    in_range = step >= begin
    if end >= 0:
        in_range = ops.logical_and(in_range, step <= end)
    update = ops.logical_and(in_range, ops.mod(step - begin, every) == 0)
    if isinstance(schedule, ConstantSparsity):
        return update, ops.cast(schedule.target_sparsity, "float32")
    progress = ops.cast(step - begin, "float32") / float(end - begin)
    progress = ops.minimum(1.0, ops.maximum(0.0, progress))
    drop = float(schedule.initial_sparsity) - float(schedule.final_sparsity)
    sparsity = drop * ops.power(1.0 - progress, float(schedule.power)) + float(schedule.final_sparsity)
    return update, ops.cast(sparsity, "float32")


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


def frequency(schedule: PruningSchedule) -> int:
    return int(getattr(schedule, "frequency", 1))


def with_frequency(schedule: PruningSchedule, every: int) -> PruningSchedule:
    """The same schedule re-selecting every ``every`` steps."""
    config = schedule.get_config()
    config["config"] = {**config["config"], "frequency": int(every)}
    return type(schedule).from_config(config["config"])


def checked_frequency(schedule: PruningSchedule, ste: str, where: str) -> PruningSchedule:
    """A schedule that re-selects every step, with a warning when the user's did not.

    With a pass-through STE (``identity``, ``clipped``) the pruned latents keep moving between re-selections, and a
    support re-chosen only every N steps reshuffles at once: tfmot's ``PolynomialDecay`` default ``frequency=100``
    measured 33.7% against 89% on Fashion-MNIST. Re-selecting every step costs little (an exact top-k).
    """
    every = frequency(schedule)
    if every <= 1 or ste == "masked":
        return schedule
    warnings.warn(
        f"{where}: the sparsity schedule {type(schedule).__name__} re-selects the support every {every} steps "
        f"(tfmot's default frequency=100); with ste={ste!r} the pruned weights keep training in between and the "
        "support reshuffles at once, which collapses accuracy. ptq_keras re-selects it every step instead "
        "(frequency=1). Pass ste='masked' to keep your frequency.",
        UserWarning,
        stacklevel=4,
    )
    return with_frequency(schedule, 1)


def freeze_fraction(freeze_at) -> float | None:
    """The fraction of training of a fractional ``freeze_at`` (a float in (0, 1]); ``None`` for steps or never."""
    if isinstance(freeze_at, float):
        return freeze_at
    return None


def initial_freeze_step(freeze_at, schedule: PruningSchedule) -> int:
    """The freeze step known before training: an integer ``freeze_at``; for ``None`` the schedule's end (-1: never);
    for a fraction -1, until the first ``fit`` resolves it (:func:`resolve_freeze_step`)."""
    if freeze_at is None:
        return end_step(schedule)
    if isinstance(freeze_at, float):
        return -1
    return int(freeze_at)


def resolve_freeze_step(fraction: float, schedule: PruningSchedule, start: int, total_steps: int) -> int:
    """The step where a fractional freeze happens for a ``fit`` of ``total_steps`` steps starting at ``start``:
    ``start + round(fraction * total_steps)``, never before a sparsity schedule has reached its target."""
    return max(fraction_step(fraction, start, total_steps), end_step(schedule))


def fraction_step(fraction: float, start: int, total_steps: int) -> int:
    return start + int(round(fraction * total_steps))


def ending_at(schedule: PruningSchedule, end: int) -> PruningSchedule:
    """The same ramp compressed in time so that it ends at step ``end`` (its begin step scaled alike)."""
    config = dict(schedule.get_config()["config"])
    old_end = int(config["end_step"])
    config["begin_step"] = int(round(int(config.get("begin_step", 0)) * end / max(old_end, 1)))
    config["end_step"] = int(end)
    return type(schedule).from_config(config)
