"""Training-time resolution of fractional schedules: ``freeze_at=0.5`` means "half of the first ``fit``".

A user calls ``fit`` and never computes steps: the model returned by :func:`ptq_keras.ternarize` (and by
:func:`ptq_keras.distill` and :func:`ptq_keras.load_model`) adds :class:`ResolveFreeze` to the callbacks of each
``fit``. At the start of training it reads the number of steps Keras will run (``epochs * steps``, less
``initial_epoch``) and writes, in every ternary quantizer whose freeze step is still unresolved, the step where
the support freezes. When the number of steps per epoch is unknown (a dataset of unknown cardinality), it counts
the steps of the first epoch and resolves then. Custom training loops call :func:`resolve_freeze` themselves.

Soft pruning (``soft_decay < 1``, SRFP) is per epoch as well: :class:`DecayPruned`, added to each ``fit`` the same
way, multiplies the pruned latent weights by ``soft_decay`` at the end of every epoch until the support freezes.
Custom training loops call :func:`decay_pruned` once per epoch.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np

from .compat import is_keras3
from .core import log, schedules
from .frontends import is_ternary_wrapper


def all_layers(model) -> Iterator:
    """The layers of ``model``, nested models flattened (a distill wrapper: its student's)."""
    student = getattr(model, "student", None)
    if student is not None:  # a ptq_keras.distill wrapper
        yield from all_layers(student)
        return
    for layer in getattr(model, "layers", ()):
        if getattr(layer, "layers", None) is not None and hasattr(layer, "compile"):  # a nested model
            yield from all_layers(layer)
        else:
            yield layer


def quantizer_states(model) -> Iterator[tuple[str, object, dict]]:
    """``(layer name, TernaryQuantizer, its variables)`` for every ternary kernel of ``model``."""
    for layer in all_layers(model):
        if is_ternary_wrapper(layer):
            for _, quantizer, qvars in layer._weight_vars:
                yield layer.layer.name, quantizer, qvars


def pending(model) -> list[tuple[str, object, dict]]:
    """The quantizers whose fractional ``freeze_at`` has not been turned into a step yet."""
    return [
        (name, q, v)
        for name, q, v in quantizer_states(model)
        if q.freeze_fraction is not None and int(v["freeze_step"].numpy()) < 0
    ]


def resolve_freeze(model, total_steps: int, *, verbose: bool = True) -> dict[str, int]:
    """Turn every unresolved fractional ``freeze_at`` of ``model`` into a step, for a training run of
    ``total_steps`` steps that starts now. Returns ``{layer name: freeze step}`` of what it resolved.

    A sparsity schedule that would still be ramping at that step is compressed in time (with a warning) to end
    halfway between the start and the freeze: the support then explores at the final sparsity before it freezes.
    ``fit`` calls this by itself (before it traces its training step); call it from a custom training loop before
    the first step.
    """
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be a positive int (the training steps to come), got {total_steps!r}.")
    resolved, compressed = {}, {}
    for name, quantizer, qvars in pending(model):
        start = int(qvars["step"].numpy())
        step = schedules.fraction_step(quantizer.freeze_fraction, start, total_steps)
        end = schedules.end_step(quantizer.schedule)
        if end > step:
            # The ramp ends halfway to the freeze: the support explores at the final sparsity before it freezes.
            compressed[name] = end
            ramp_end = start + (step - start) // 2
            _set_schedule(model, name, quantizer, schedules.ending_at(quantizer.schedule, ramp_end))
        qvars["freeze_step"].assign(step)
        resolved[name] = step
    if compressed:
        ends = sorted(set(compressed.values()))
        warnings.warn(
            f"ptq_keras: the sparsity schedule of {len(compressed)} layer(s) ends at step {ends[-1]}, after the "
            f"support freezes (freeze_at={quantizer.freeze_fraction} of {total_steps} steps, step "
            f"{max(resolved.values())}): it is compressed to end halfway to the freeze, so that the support "
            "explores at the final sparsity, then freezes and fine-tunes. Pass freeze_at=None to keep the schedule "
            "as it is (it then freezes at its end_step).",
            UserWarning,
            stacklevel=3,
        )
    if verbose and resolved:
        steps = sorted(set(resolved.values()))
        where = steps[0] if len(steps) == 1 else f"{steps[0]}..{steps[-1]}"
        log.info(
            f"the ternary support of {len(resolved)} layer(s) freezes at step {where} "
            f"(of {total_steps} training steps; then the STE is 'masked')."
        )
    return resolved


def _set_schedule(model, name, quantizer, schedule) -> None:
    """Replace a quantizer's schedule, also in its layer's saved config."""
    quantizer.schedule = schedule
    quantizer.options["sparsity"] = schedule
    for layer in all_layers(model):
        if getattr(getattr(layer, "layer", None), "name", None) == name:
            layer.quantize_config.options["sparsity"] = schedules.serialize(schedule)


class ResolveFreeze:
    """Resolves fractional ``freeze_at`` options at the start of ``fit`` (or after its first epoch when Keras does
    not know the number of steps per epoch). Added to every ``fit`` of a ternarized model by ptq_keras (as a
    callback of the model's Keras: :func:`callback`)."""

    def __init__(self, model, initial_epoch: int = 0, verbose: bool = True):
        super().__init__()
        self._target = model
        self._initial_epoch = int(initial_epoch)
        self._verbose = verbose
        self._start = None

    def _epochs(self) -> int:
        return max(1, int(self.params.get("epochs") or 1) - self._initial_epoch)

    def on_train_begin(self, logs=None):
        todo = pending(self._target)
        if not todo:
            return
        steps = self.params.get("steps")
        if steps:
            resolve_freeze(self._target, int(steps) * self._epochs(), verbose=self._verbose)
        else:
            self._start = int(todo[0][2]["step"].numpy())

    def on_epoch_end(self, epoch, logs=None):
        if self._start is None:
            return
        todo = pending(self._target)
        self._start, start = None, self._start
        if not todo:
            return
        per_epoch = max(1, int(todo[0][2]["step"].numpy()) - start)
        total = per_epoch * self._epochs()
        # Steps already run count towards the fraction; a freeze point already passed freezes at the next step.
        for _, quantizer, qvars in todo:
            now = int(qvars["step"].numpy())
            step = schedules.resolve_freeze_step(quantizer.freeze_fraction, quantizer.schedule, start, total)
            qvars["freeze_step"].assign(max(step, now))
        if self._verbose:
            log.info(f"{per_epoch} steps per epoch; the ternary support freezes at step "
                     f"{max(int(v['freeze_step'].numpy()) for _, _, v in todo)}.")  # fmt: skip


def _soft_kernels(model) -> Iterator[tuple[object, object, dict]]:
    """``(latent kernel variable, quantizer, its variables)`` for every ternary kernel with ``soft_decay < 1``."""
    for layer in all_layers(model):
        if is_ternary_wrapper(layer):
            # tfmot's QuantizeWrapper and keras3_layers.TernaryWrapper both hold (latent, quantizer, variables).
            for latent, quantizer, qvars in layer._weight_vars:
                if quantizer.options["soft_decay"] < 1.0:
                    yield latent, quantizer, qvars


def decay_pruned(model) -> int:
    """SRFP (Cai et al. 2020): multiply the pruned latent weights of ``model`` by their layer's ``soft_decay``,
    ``kernel := kernel * (mask + soft_decay * (1 - mask))``, in every ternary kernel whose support can still change
    (never frozen, or its freeze step not yet run). Returns the number of kernels decayed.

    ``fit`` calls this at the end of every epoch (:class:`DecayPruned`); a custom training loop calls it once per
    epoch. Kernels with ``soft_decay=1`` (the default: SFP, no decay) are left as they are.
    """
    count = 0
    for latent, quantizer, qvars in _soft_kernels(model):
        freeze, step = int(qvars["freeze_step"].numpy()), int(qvars["step"].numpy())
        if 0 <= freeze < step:  # the freeze step has run: the support is final
            continue
        mask = np.asarray(qvars["mask"].numpy(), np.float32)
        factor = mask + np.float32(quantizer.options["soft_decay"]) * (1.0 - mask)
        value = np.asarray(latent.numpy(), np.float32)
        latent.assign((value * factor).astype(value.dtype))
        count += 1
    return count


class DecayPruned:
    """Calls :func:`decay_pruned` at the end of every training epoch (SRFP's per-epoch decay of the pruned
    weights). Added to every ``fit`` of a ternarized model with ``soft_decay < 1`` by ptq_keras (as a callback of
    the model's Keras: :func:`callback`)."""

    def __init__(self, model):
        super().__init__()
        self._target = model

    def on_epoch_end(self, epoch, logs=None):
        decay_pruned(self._target)


_CALLBACKS: dict = {}


def callback(kind: type, model, *args, **kwargs):
    """An instance of ``kind`` (:class:`ResolveFreeze`, :class:`DecayPruned`) that is a callback of ``model``'s
    Keras (tf_keras and Keras 3 each take their own ``Callback`` subclasses)."""
    if is_keras3(model):
        from .compat import keras3

        base = keras3().callbacks.Callback
    else:
        from .compat import keras

        base = keras.callbacks.Callback
    key = (kind, base)
    if key not in _CALLBACKS:
        _CALLBACKS[key] = type(kind.__name__, (kind, base), {"__module__": __name__, "__doc__": kind.__doc__})
    return _CALLBACKS[key](model, *args, **kwargs)


def with_resolver(model, fit_kwargs: dict) -> dict:
    """``fit`` keyword arguments with a :class:`ResolveFreeze` callback (when something is pending) and a
    :class:`DecayPruned` callback (when a kernel has ``soft_decay < 1``) added."""
    callbacks = list(fit_kwargs.get("callbacks") or [])
    added = False
    if pending(model) and not any(isinstance(c, ResolveFreeze) for c in callbacks):
        verbose = fit_kwargs.get("verbose", "auto") != 0
        callbacks.append(callback(ResolveFreeze, model, fit_kwargs.get("initial_epoch", 0), verbose=verbose))
        added = True
    # After ResolveFreeze: its on_epoch_end may resolve the freeze step this callback reads.
    if any(True for _ in _soft_kernels(model)) and not any(isinstance(c, DecayPruned) for c in callbacks):
        callbacks.append(callback(DecayPruned, model))
        added = True
    return {**fit_kwargs, "callbacks": callbacks} if added else fit_kwargs
