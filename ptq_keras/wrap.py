"""``ternarize``, ``strip`` and friends: turn a tf_keras or Keras 3 model into a PTQ training model and back.

This is the frontend-neutral training API: it validates, plans which kernels train as ternary weights (with which
options), and asks the model's frontend (:mod:`ptq_keras.frontends`) to wrap or unwrap its layers.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from . import activations as act
from . import fitting, frontends
from .compat import check_keras_model, check_tensorflow_backend, is_keras3, keras3
from .core import log, schedules, ternary
from .core import options as core_options
from .core.layers import NAMES_TEXT, kernel_attributes
from .frontends import is_batchnorm, is_ternary_wrapper

PRECISIONS = ("ternary", "mixed")


def custom_objects() -> dict:
    """The objects needed to deserialize a ternarized tf_keras model (besides tfmot's own)."""
    from .frontends.tf_keras import wrap as tf_keras_wrap

    return tf_keras_wrap.custom_objects()


def custom_object_scope():
    """Context manager for ``keras.models.load_model`` of a ternarized tf_keras ``.h5`` / SavedModel."""
    from .frontends.tf_keras import wrap as tf_keras_wrap

    return tf_keras_wrap.custom_object_scope()


_validate_options = core_options.validate
_stored_options = core_options.stored


def _check_graph_model(model) -> None:
    check_keras_model(model)
    if not frontends.of(model).is_graph_model(model):
        raise TypeError(
            f"Model {model.name!r} is a subclassed keras.Model; ptq_keras needs a Sequential or Functional model "
            "(it rebuilds the graph layer by layer). Rebuild it with the functional API."
        )
    if not model.built:
        raise ValueError(f"Model {model.name!r} is not built; call model.build(input_shape) or give it an Input first.")


@dataclass
class _Plan:
    """What ``ternarize`` wraps: the model (after any split of its SeparableConv2D layers), the validated options
    (``base``, and per layer), the user's ``overrides`` (by the model's names), the layers to ternarize and
    ``partial`` (``{name: attributes}`` for layers of which only those kernels are ternarized)."""

    model: object
    base: dict
    per_layer: dict
    overrides: dict
    targets: set
    partial: dict = field(default_factory=dict)

    def options_of(self, name: str) -> dict:
        return self.per_layer.get(name, self.base)

    def rename(self, model, aliases: dict) -> None:
        """The model became ``model``, in which each layer named in ``aliases`` is the layers it lists."""
        def renamed(mapping):
            return {new: value for name, value in mapping.items() for new in aliases.get(name, [name])}

        self.model = model
        self.targets = {new for name in self.targets for new in aliases.get(name, [name])}
        for name in self.partial:  # its depthwise half (the first of the two) stays float
            self.targets.discard(aliases[name][0])
        self.partial = {}
        self.per_layer, self.overrides = renamed(self.per_layer), renamed(self.overrides)


def ternarize(
    model,
    *,
    keep_float: Iterable[str] = (),
    overrides: Mapping[str, Mapping] | None = None,
    activations: str | None = None,
    precision: str = "ternary",
    flash_budget: int | None = None,
    ram_budget: int | None = None,
    budget_data=None,
    **options,
) -> object:
    """Return a new model whose quantizable kernels train as sparse ternary weights.

    ``model`` is a tf_keras model (the result is a tf_keras model) or a Keras 3 model on the TensorFlow backend
    (the result is a Keras 3 model whose ternarized layers are
    :class:`ptq_keras.frontends.keras3.layers.TernaryWrapper`,
    saved and loaded in the ``.keras`` format; ``flash_budget`` / ``ram_budget`` need Keras 3's TensorFlow
    backend).

    Quantizable layers: Dense, Conv2D, Conv1D, DepthwiseConv2D, SeparableConv2D. The user's model is not modified.

    Args:
      model: a built Sequential or Functional tf_keras model.
      keep_float: names of layers left in float.
      overrides: ``{layer name: {option: value}}`` per-layer options.
      flash_budget: bytes the ``micro`` file (TFLM, ``encoding="auto"``) may take: the per-layer sparsities are
        chosen to fit it, sparsifying where the measured output error grows least (:mod:`ptq_keras.budget`; the
        choice is in ``qmodel.ptq_allocation`` and in each layer's options). Needs ``budget_data`` (a few hundred
        model inputs); excludes ``sparsity``; layers with a ``sparsity`` in ``overrides`` keep it.
      ram_budget: bytes of TFLM arena the ``micro`` file must run in (decode buffers included). Checked before
        training on the model projected to its sparsities (with ``flash_budget``, every size measured already
        fits it, so weights the RAM budget keeps as plain int8 are paid in flash); an impossible budget is an
        error naming the smallest arena reached. Export with the same ``ram_budget`` (``export``, ``ptq-convert
        --ram_budget``). Needs ``budget_data``.
      precision: ``"ternary"`` (default: every quantizable kernel not in ``keep_float``) or ``"mixed"``: the
        depthwise kernels (every DepthwiseConv2D, the depthwise half of every SeparableConv2D) and the stem (the
        first quantizable layer, when it is a Conv1D or Conv2D) stay in float, so the exported files hold them as
        int8 (target ``micro`` leaves them plain int8); every other kernel is ternary (a tf_keras SeparableConv2D
        becomes its two halves, ``<name>_depthwise`` and ``<name>_pointwise``). Such kernels have few
        weights per output channel (9 for a 3x3 depthwise filter) and are a small share of a depthwise-separable
        model's weights, but ternarizing them costs the most accuracy (docs/results.md: the defaults and the
        related methods, over seeds).
      activations: ``None`` (activations stay float in training; the int8 export calibrates them) or ``"int8"``
        (8-bit activation fake-quantization where the int8 converter quantizes, with ranges learned in training
        and used by the export; see :mod:`ptq_keras.activations`).
      sparsity: a float in [0, 1) (a constant target) or a tfmot ``PruningSchedule`` (e.g. ``PolynomialDecay``).
      threshold: support selection, ``"sparsity"`` (exact top-k), ``"l2"`` (exact L2 projection) or ``"twn"``.
      granularity: scale per ``"channel"`` or per ``"tensor"``.
      selection: support chosen per ``"channel"`` or over the whole ``"tensor"`` (the layer).
      normalize: select on ``|w| / ||w_c||_2`` (per-channel L2 normalization).
      ste: the straight-through estimator: ``"psg"`` (default; the gradient scaled by
        ``psg_strength * |W - W_q|``, so weights near their ternary value stick to it), ``"identity"``,
        ``"masked"`` or ``"clipped"``.
      clip: for ``ste="clipped"``, gradients pass where ``|w| <= clip * alpha``.
      decay: strength ``lambda`` of the discrepancy term ``lambda * (W - W_q)`` added to the gradient
        (a number, or a callable of the step).
      freeze_at: when the support freezes and the STE becomes ``"masked"``: a float in (0, 1] is a fraction of
        the training steps of the first ``fit`` (default 0.5: the second half of training fine-tunes a fixed
        support; never before a sparsity schedule ends); an int is a step number; ``None`` freezes at the
        schedule's ``end_step`` (never, for a constant target).
      frequency: for a float ``sparsity``, re-select the support every ``frequency`` steps.
      min_kept: every layer keeps at least this many weights per output channel on average (default 4): a layer
        whose fan-in (weights per output channel: 9 for a 3x3 depthwise filter or a 3x3 stem on one channel) is
        small is pruned to at most ``1 - min_kept / fan_in`` rather than ``sparsity`` (``ternarize`` names those
        layers). Such layers hold few of a model's weights, so this costs few bytes; ``min_kept=0`` prunes every
        layer to ``sparsity``.
    """
    _check_graph_model(model)
    if is_ternarized(model):
        raise ValueError(
            f"Model {model.name!r} is already ternarized. Train it as it is, or ternarize "
            "ptq_keras.strip(model) to start again from its ternary weights."
        )
    _check_arguments(activations, precision, flash_budget, ram_budget)
    plan = _plan(model, list(keep_float), dict(overrides or {}), options)
    if precision == "mixed":
        _apply_mixed_precision(plan)
    _check_targets(plan, keep_float, precision)
    _keep_outputs_whole(plan)
    allocation = _budgets(plan, options, flash_budget, ram_budget, budget_data)
    _report_capped(plan.model, sorted(plan.targets), plan.options_of, plan.partial)
    if activations == "int8":
        plan.rename(*frontends.of(plan.model).insert(plan.model))
    if is_keras3(plan.model) and keras3().backend.backend() != "tensorflow":
        _check_off_tensorflow([plan.base, *plan.per_layer.values()])
    qmodel = frontends.of(plan.model).ternarize(
        plan.model, plan.targets, lambda name: _stored_options(plan.options_of(name)), plan.partial
    )
    attach(qmodel)
    qmodel.ptq_allocation = allocation
    return qmodel


def _check_arguments(activations, precision, flash_budget, ram_budget) -> None:
    if activations not in act.ACTIVATIONS:
        raise ValueError(f"ternarize: activations={activations!r} is not one of {list(act.ACTIVATIONS)}.")
    if precision not in PRECISIONS:
        raise ValueError(f"ternarize: precision={precision!r} is not one of {list(PRECISIONS)}.")
    if precision != "ternary" and (flash_budget is not None or ram_budget is not None):
        raise ValueError(
            f"ternarize: precision={precision!r} cannot be combined with flash_budget / ram_budget yet (the budget "
            "chooses sparsities for ternary kernels only); pass one of the two."
        )


def _plan(model, keep_float: list, overrides: dict, options: dict) -> _Plan:
    """The validated options, per layer, and the layers to ternarize (every quantizable one not in
    ``keep_float``)."""
    base = _validate_options(options, "ternarize")
    names = {layer.name for layer in model.layers}
    for name in keep_float:
        if name not in names:
            raise ValueError(f"keep_float names layer {name!r}, which is not in the model; layers: {sorted(names)}.")
    per_layer = {}
    for name, layer_options in overrides.items():
        if name not in names:
            raise ValueError(f"overrides names layer {name!r}, which is not in the model; layers: {sorted(names)}.")
        if not isinstance(layer_options, Mapping):
            raise TypeError(f"overrides[{name!r}] must be a dict of options, got {layer_options!r}.")
        per_layer[name] = _validate_options({**options, **layer_options}, f"overrides[{name!r}]")
    targets = {layer.name for layer in model.layers if kernel_attributes(layer) and layer.name not in keep_float}
    return _Plan(model, base, per_layer, overrides, targets)


def _apply_mixed_precision(plan: _Plan) -> None:
    """``precision="mixed"``: the depthwise kernels and the stem leave the targets (:func:`_mixed_precision`)."""
    frontend = frontends.of(plan.model)
    if not frontend.PARTIAL_KERNELS and any(
        type(plan.model.get_layer(n)).__name__ == "SeparableConv2D" for n in plan.targets
    ):
        plan.rename(*frontend.split_separables(plan.model))  # as with activations="int8"
    kept, plan.partial = _mixed_precision(plan.model, plan.targets)
    plan.targets -= kept


def _check_targets(plan: _Plan, keep_float, precision: str) -> None:
    if not plan.targets:
        raise ValueError(
            f"Model {plan.model.name!r} has no layer to ternarize: ptq_keras quantizes {NAMES_TEXT} layers"
            + (f" (all of them are in keep_float={list(keep_float)})" if keep_float else "")
            + (" (precision='mixed' keeps its depthwise kernels and stem in float)" if precision == "mixed" else "")
            + "."
        )


def _keep_outputs_whole(plan: _Plan) -> None:
    """Zeroing output channels of a layer that produces a model output would make those outputs (e.g. classes)
    constant: ``channel_sparsity`` applies there only when ``overrides`` ask for it by name."""
    output_layers = {_producer(t).name for t in plan.model.outputs} & plan.targets
    skipped = sorted(
        n
        for n in output_layers
        if plan.options_of(n)["channel_sparsity"] > 0 and "channel_sparsity" not in plan.overrides.get(n, {})
    )
    for name in skipped:
        plan.per_layer[name] = {**plan.options_of(name), "channel_sparsity": 0.0}
    if skipped:
        log.info(f"channel_sparsity is not applied to {skipped}: their output channels are the model's outputs (set it "
                 "in overrides for such a layer to force it).")  # fmt: skip


def _budgets(plan: _Plan, options: dict, flash_budget, ram_budget, budget_data):
    """``flash_budget``: the sparsity of every layer not fixed by ``overrides`` (written into the plan), and the
    allocation; ``ram_budget`` alone: the check that the file can run in it. ``None`` without budgets."""
    if flash_budget is None and ram_budget is None:
        if budget_data is not None:
            raise ValueError("ternarize: budget_data is only used with flash_budget= or ram_budget=.")
        return None
    if is_keras3(plan.model):
        check_tensorflow_backend("flash_budget / ram_budget (which convert the model to measure it)")
    if flash_budget is not None and "sparsity" in options:
        raise ValueError(
            "ternarize: pass either sparsity= or flash_budget= (which chooses the sparsity of every layer), not both."
        )
    if budget_data is None:
        raise ValueError(
            f"ternarize: {'flash_budget' if flash_budget is not None else 'ram_budget'} needs budget_data= (a few "
            "hundred model inputs, e.g. x_train[:256]) to "
            + ("measure how much each layer's output suffers at each sparsity." if flash_budget is not None
               else "calibrate the int8 file whose TFLM arena is measured.")
        )  # fmt: skip
    from . import budget

    if flash_budget is None:
        layers = {name: plan.options_of(name) for name in sorted(plan.targets)}
        return budget.check_ram(plan.model, ram_budget, budget_data, layers, log=log.info)
    free = {n: plan.options_of(n) for n in sorted(plan.targets) if "sparsity" not in plan.overrides.get(n, {})}
    allocation = budget.allocate(plan.model, flash_budget, budget_data, free, log=log.info, ram_budget=ram_budget)
    for name, sparsity in allocation.sparsities.items():
        plan.per_layer[name] = _validate_options({**plan.options_of(name), "sparsity": sparsity},
                                                 f"flash_budget ({name})")  # fmt: skip
    return allocation


def _mixed_precision(model, targets: set) -> tuple[set, dict]:
    """``precision="mixed"``: the layers of ``targets`` left in float (each DepthwiseConv2D, and the stem: the
    first of them when it is a Conv1D or Conv2D) and ``{SeparableConv2D name: (its pointwise kernel,)}``. Says
    what it keeps and what share of the quantizable weights that is."""
    layers = [layer for layer in model.layers if layer.name in targets]
    kept, partial, names = set(), {}, []
    for i, layer in enumerate(layers):
        kind = type(layer).__name__
        if kind == "DepthwiseConv2D" or (i == 0 and kind in ("Conv1D", "Conv2D")):
            kept.add(layer.name)
            names.append(layer.name)
        elif kind == "SeparableConv2D":
            partial[layer.name] = tuple(a for a in kernel_attributes(layer) if a[0] != "depthwise_kernel")
            names.append(f"{layer.name}.depthwise_kernel")
    total = sum(int(np.prod(getattr(layer, a).shape)) for layer in layers for a, _ in kernel_attributes(layer))
    float_weights = sum(
        int(np.prod(getattr(layer, a).shape))
        for layer in layers
        for a, _ in kernel_attributes(layer)
        if layer.name in kept or (layer.name in partial and a == "depthwise_kernel")
    )
    if names:
        log.info(f"precision='mixed' keeps {len(names)} kernel(s) in float, int8 in the exported files "
                 f"({float_weights:,} weights, {float_weights / max(total, 1):.1%} of the quantizable weights): "
                 f"{', '.join(names)}.")  # fmt: skip
    else:
        log.info("precision='mixed' found no depthwise kernel and no Conv1D/Conv2D stem: every kernel is ternary.")
    return kept, partial


def _report_capped(model, targets, options_of, partial) -> None:
    """Say which layers ``min_kept`` holds under their target sparsity (few weights per output channel)."""
    capped = []
    for name in targets:
        options = options_of(name)
        if options["threshold"] != "sparsity":
            continue
        final = schedules.final_sparsity(schedules.to_schedule(options["sparsity"], 1))
        layer = model.get_layer(name)
        kernels = kernel_attributes(layer)
        for attr, dims in partial.get(name, kernels):
            cap = ternary.max_sparsity(tuple(getattr(layer, attr).shape), dims, options["min_kept"])
            if cap < final:  # a SeparableConv2D names which of its two kernels
                capped.append(f"{name}{'.' + attr if len(kernels) > 1 else ''} {cap:.2f}")
    if capped:
        log.info(
            f"{len(capped)} kernel(s) with few weights per output channel keep min_kept weights per channel on "
            f"average, below the target sparsity: {', '.join(capped)} (min_kept=0 turns this off)."
        )


def _check_off_tensorflow(option_sets) -> None:
    """Options that need TensorFlow (state written in the backward pass, or a schedule that is TensorFlow code):
    refused on Keras 3's other backends. (``soft_decay`` runs eagerly between epochs, on any backend.)"""
    for options in option_sets:
        if options["criterion"] == "taylor":
            raise NotImplementedError(
                "ternarize: criterion='taylor' keeps its score in the backward pass, which needs Keras 3's "
                "TensorFlow backend (KERAS_BACKEND=tensorflow)."
            )
        sparsity = options["sparsity"]
        if schedules.is_schedule(sparsity) and type(sparsity) not in (
            schedules.ConstantSparsity, schedules.PolynomialDecay
        ):  # fmt: skip
            raise NotImplementedError(
                f"ternarize: the schedule {type(sparsity).__name__} is TensorFlow code; off TensorFlow use a float, "
                "ptq_keras.ConstantSparsity or ptq_keras.PolynomialDecay."
            )


def _producer(tensor):
    """The layer that produced a model's output tensor (tf_keras or Keras 3)."""
    history = tensor._keras_history
    return getattr(history, "layer", None) or history.operation


def attach(model):
    """Give a ternarized model (or a distill wrapper) ptq_keras' ``fit`` and ``save``: ``fit`` resolves fractional
    ``freeze_at`` options from its own number of steps; ``save`` refuses ``.keras`` with an explanation.
    :func:`ternarize`, :func:`load_model` and ``distill`` call it; call it on a model loaded another way."""
    frontends.of(student_of(model)).guard_save(model)  # tf_keras: .keras refused; Keras 3 saves its wrapper
    original_fit = model.fit
    signature = inspect.signature(original_fit)

    def fit(self, *args, **kwargs):
        bound = signature.bind_partial(*args, **kwargs)
        return original_fit(**fitting.with_resolver(self, dict(bound.arguments)))

    fit.__doc__ = original_fit.__doc__
    model.fit = types.MethodType(fit, model)
    return model


def load_model(filepath, *, compile: bool = True, **kwargs):
    """Load a ternarized model with ptq_keras' ``fit`` and ``save`` attached (see :func:`attach`): a ``.keras``
    file as a Keras 3 model, an ``.h5`` / SavedModel as a tf_keras one (inside :func:`custom_object_scope`).
    Plain models load as they are."""
    model = frontends.load(filepath, compile=compile, **kwargs)
    if is_ternarized(model):
        attach(model)
    return model


student_of = frontends.student_of
is_ternarized = frontends.is_ternarized
ternary_kernels = frontends.ternary_kernels
_ternary_wrapper = is_ternary_wrapper


def strip(model, *, batchnorm_data=None, batchnorm_steps: int | None = 200) -> object:
    """Plain model (tf_keras or Keras 3, as given) of the original architecture whose ternarized kernels are exactly
    ternary.

    Each channel of a ternarized kernel holds only ``{-alpha_c, 0, +alpha_c}`` (the support ``M`` chosen in
    training, ``alpha_c`` the L2-optimal scale of the current latent weights). Other weights are copied.
    With ``batchnorm_data`` (training inputs: an array or a dataset), the BatchNormalization statistics are then
    re-estimated for the final ternary weights (:func:`recalibrate_batchnorm`, ``batchnorm_steps`` batches).
    """
    check_keras_model(model)
    model = student_of(model)
    if not is_ternarized(model):
        raise ValueError(
            f"Model {model.name!r} has no ternarized layer: strip() takes the model returned by "
            "ptq_keras.ternarize (or loaded from one inside ptq_keras.custom_object_scope())."
        )
    plain = frontends.plain_copy(model)
    if batchnorm_data is not None:
        recalibrate_batchnorm(plain, batchnorm_data, steps=batchnorm_steps)
        act.link(plain)
    return plain


def recalibrate_batchnorm(model, data, *, steps: int | None = 100, verbose: bool = True):
    """Re-estimate BatchNormalization moving statistics of a (stripped) model on ``data``; weights unchanged.

    The moving mean and variance become the average of the per-batch statistics over ``steps`` batches of ``data``
    (a ``tf.data.Dataset`` of batches or of ``(x, y)`` batches, or a numpy array, batched by 128). Stale statistics
    from training on a changing support cost several points of accuracy on ternary models.
    """
    check_keras_model(model)
    if is_ternarized(model):
        raise ValueError(
            "recalibrate_batchnorm takes a plain model: call ptq_keras.strip(qmodel) first (running a ternarized "
            "model in training mode would advance its sparsity schedule)."
        )
    bns = [layer for layer in fitting.all_layers(model) if is_batchnorm(layer)]
    aqs = [layer for layer in fitting.all_layers(model) if act.is_activation_quantizer(layer)]
    if not bns:
        return model
    if isinstance(data, np.ndarray):
        data = [data[i : i + 128] for i in range(0, len(data), 128)]
    momenta = [bn.momentum for bn in bns]
    aq_state = [(aq.ema_decay, aq.static) for aq in aqs]
    for bn in bns:
        bn.moving_mean.assign(np.zeros(bn.moving_mean.shape, "float32"))
        bn.moving_variance.assign(np.zeros(bn.moving_variance.shape, "float32"))
    for aq in aqs:
        # The activation ranges depend on the BatchNorm statistics: re-estimate them in the same passes.
        aq.static = False
        aq.calibrated.assign(0.0)
    seen = 0
    try:
        for batch in data:
            if steps is not None and seen >= steps:
                break
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            for layer in bns:
                layer.momentum = seen / (seen + 1.0)  # running average of batch statistics
            for layer in aqs:
                layer.ema_decay = seen / (seen + 1.0)
            model(x, training=True)
            seen += 1
    finally:
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum
        for aq, (decay, static) in zip(aqs, aq_state):
            aq.ema_decay, aq.static = decay, static or seen > 0
    if seen == 0:
        raise ValueError("recalibrate_batchnorm: the data gave no batch.")
    if aqs:
        act.link(model)  # the ranges moved: the int8 kernels' parameters with them
    if verbose:
        extra = f" and {len(aqs)} activation range(s)" if aqs else ""
        log.info(f"re-estimated {len(bns)} BatchNormalization layer(s){extra} over {seen} batches.")
    return model
