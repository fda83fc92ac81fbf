"""``ternarize(model, flash_budget=N, budget_data=x)``: per-layer sparsities that fit a flash budget.

Users think in bytes of flash, not in sparsities. :func:`allocate` chooses one sparsity per ternarized layer from
``CANDIDATES`` so that the ``micro`` file (TFLM, ``encoding="auto"``) is at most ``flash_budget`` bytes, spending
zeros where they cost least:

* **Size**: each layer's encoded bytes at each candidate come from the real encoders
  (``ptq_keras.tflite.decode``, what ``encoding="auto"`` picks) run on the layer's own float kernel projected to
  that sparsity, in the file's layout; the rest of the file (biases, scales, graph) from one real conversion of the
  model, calibrated on ``budget_data``, with biases and BatchNormalization parameters still at their initial
  constants given per-channel values as training will (the converter folds and shares constant tensors, so an
  untrained model's file is smaller than the trained one's). The chosen allocation is converted once more and
  checked against the budget (tightened and chosen again when the estimate was short).
* **Sensitivity**: for each layer and candidate, the float model with only that layer's kernels projected to that
  sparsity runs on ``budget_data``; the cost is the output's squared error relative to the float output's energy.
* **Allocation**: every layer starts at the least sparse candidate; while the estimated file is over budget, the
  layer whose next candidate saves the most bytes per unit of added cost moves up (a greedy knapsack); then the
  bytes left (less a 1% margin) go back to the layers where they lower the cost most.

An impossible budget (over budget even with every layer at the sparsest candidate) raises ``ValueError`` with the
smallest reachable size. The chosen sparsities go into the layers' options (per-layer ``sparsity``: ``summary``
shows them, ``save`` keeps them) and ``qmodel.ptq_allocation`` describes the choice.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

import numpy as np

from .compat import is_keras3, keras, keras3
from .core import ternary
from .core.layers import kernel_attributes
from .core.options import DEFAULTS
from .frontends import is_batchnorm

__all__ = ["CANDIDATES", "Allocation", "allocate"]

CANDIDATES = (0.3, 0.5, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
MAX_SAMPLES = 256
MARGIN = 0.01  # of the budget, left free when bytes are given back (training moves the support a little)
_MAX_ROUNDS = 4


@dataclass
class Allocation:
    """The chosen per-layer sparsities and what the choice was based on."""

    flash_budget: int | None
    sparsities: dict
    estimated_bytes: int
    file_bytes: int
    layer_bytes: dict = field(default_factory=dict)  # layer -> {sparsity: encoded bytes}
    sensitivity: dict = field(default_factory=dict)  # layer -> {sparsity: relative output error}
    overhead_bytes: int = 0
    ram_budget: int | None = None  # TFLM arena bytes; every conversion here fitted it (``convert(ram_budget=)``)
    arena_bytes: int | None = None  # of the final micro file, with ``ram_budget``
    # layer -> {kernel attribute: sparsity} for kernels ``min_kept`` holds below the layer's chosen sparsity
    # (training prunes them to that cap; their bytes above are measured there)
    capped: dict = field(default_factory=dict)

    def table(self) -> str:
        if self.flash_budget is None:
            return (f"ram budget {self.ram_budget:,} B: micro file {self.file_bytes:,} B runs in a "
                    f"{self.arena_bytes:,} B TFLM arena (export with ram_budget={self.ram_budget})")  # fmt: skip
        lines = [f"flash budget {self.flash_budget:,} B: micro file {self.file_bytes:,} B (estimate "
                 f"{self.estimated_bytes:,} B, of which {self.overhead_bytes:,} B outside the weights)"]  # fmt: skip
        if self.ram_budget is not None:
            lines[0] += f", TFLM arena {self.arena_bytes:,} B (ram budget {self.ram_budget:,} B)"
        for name, s in self.sparsities.items():
            held = ", ".join(f"{attr} {cap:.2f}" for attr, cap in self.capped.get(name, {}).items())
            lines.append(
                f"  {name:<24} sparsity {s:.2f}  {self.layer_bytes[name][s]:>10,} B  "
                f"output error {self.sensitivity[name][s]:.2e}" + (f"  (min_kept holds {held})" if held else "")
            )
        return "\n".join(lines)


def _tflite_layout(kernel: np.ndarray, dims: int) -> tuple[np.ndarray, int]:
    """The kernel (its last ``dims`` axes the channels) as the int8 file stores it, and its channel axis there."""
    if dims == 2:  # depthwise (kh, kw, in, mult) -> (1, kh, kw, in * mult), channels last
        return kernel.reshape(1, *kernel.shape[:2], -1), 3
    if kernel.ndim == 2:  # Dense (in, out) -> (out, in)
        return kernel.T, 0
    return np.moveaxis(kernel, -1, 0), 0  # convolutions: (..., in, out) -> (out, ..., in)


def _project(kernel: np.ndarray, dims: int, sparsity: float, options: dict) -> np.ndarray:
    """The kernel as the quantizer projects it at ``sparsity`` (capped as ``min_kept`` caps it in training)."""
    cap = _cap(kernel.shape, dims, options)
    return ternary.ternarize_np(
        kernel,
        dims,
        threshold="sparsity",
        sparsity=min(float(sparsity), cap),
        selection=options.get("selection", "tensor"),
        granularity=options.get("granularity", "channel"),
        normalize=options.get("normalize", False),
        channel_sparsity=options.get("channel_sparsity", 0.0),
    )


def _cap(shape, dims: int, options: dict) -> float:
    """The highest sparsity a kernel of ``shape`` trains to with these layer options (``min_kept``)."""
    return ternary.max_sparsity(shape, dims, options.get("min_kept", DEFAULTS["min_kept"]))


def _capped(kernels: dict, choice: dict, layers: dict) -> dict:
    """{layer: {attr: cap}} for the kernels ``min_kept`` keeps below the layer's chosen sparsity."""
    out = {}
    for name, parts in kernels.items():
        caps = {attr: _cap(w.shape, dims, layers[name]) for attr, dims, w in parts}
        held = {attr: cap for attr, cap in caps.items() if cap < choice[name]}
        if held:
            out[name] = held
    return out


def _encoded_bytes(projected: np.ndarray, dims: int, max_decode_bytes: int | None = None) -> int:
    """Encoded bytes of one projected kernel as ``encoding="auto"`` stores it; a kernel larger than
    ``max_decode_bytes`` is encoded part by part, as the export splits it along its output channels."""
    from .tflite import decode, encoders, split

    stored, axis = _tflite_layout(projected, dims)
    codes = (np.sign(stored) * 127).astype(np.int8)
    channels = stored.shape[axis]
    parts = [(0, channels)]
    if max_decode_bytes is not None and codes.size > max_decode_bytes:
        parts = split.parts_of(channels, codes.size // channels, max_decode_bytes)
    total = 0
    for first, stop in parts:
        part = np.take(codes, np.arange(first, stop), axis=axis)
        count = stop - first
        layout = encoders.ChannelLayout(count, axis, (0,) * count) if count > 1 else encoders.ChannelLayout(1, 0, (0,))
        total += decode.auto_bytes(part, layout)
    return total


def _plain_copy(model, kernels: dict):
    """A copy of ``model`` (tf_keras or Keras 3) with ``kernels`` ({(layer, attr): array}) in place of its own."""
    copy = (keras3() if is_keras3(model) else keras).models.clone_model(model)
    copy.set_weights(model.get_weights())
    for (name, attr), value in kernels.items():
        getattr(copy.get_layer(name), attr).assign(value)
    return copy


_BATCHNORM_PARAMS = ("gamma", "beta", "moving_mean", "moving_variance")


def _as_trained(model) -> dict:
    """Values, for sizing the file only, of the biases and BatchNormalization parameters of ``model`` that are
    still at their initial constant: training makes each of them differ per channel. The converter folds or
    shares constant tensors (one buffer and shorter fused tensor names for equal biases, a BatchNormalization
    without offset adds no bias), so an untrained model's file is smaller than the trained model's."""
    rng = np.random.default_rng(0)
    values = {}
    for layer in model.layers:
        for attr in _BATCHNORM_PARAMS if is_batchnorm(layer) else ("bias",):
            variable = getattr(layer, attr, None)
            if variable is None or not hasattr(variable, "numpy"):
                continue
            value = np.asarray(variable.numpy(), np.float32)
            if value.size and np.all(value == value.flat[0]):
                scale = 0.05 * abs(float(value.flat[0])) or 1e-3
                values[(layer.name, attr)] = value + scale * rng.uniform(0.5, 1.0, value.shape).astype(np.float32)
    return values


def _output(model, x) -> np.ndarray:
    out = model(x, training=False)
    if isinstance(out, (list, tuple)):
        out = out[0]
    return np.asarray(out, np.float64)


def _micro_bytes(model, kernels: dict, data, ram_budget: int | None = None) -> tuple[int, int, bytes]:
    """(file bytes, encoded weight payload bytes, the file) of the ``micro`` file (auto) of ``model`` with
    ``kernels``; with ``ram_budget``, the file fitted into that TFLM arena (split weights, or weights kept int8)."""
    from .tflite import convert, decode

    buf = convert(_plain_copy(model, kernels), data, target="micro", encoding="auto", ram_budget=ram_budget)
    return len(buf), sum(row["payload_bytes"] for row in decode.describe(buf)), buf


def _check_bytes(value, name: str, example: str) -> None:
    """The export's own check of a byte count (one place for the rule and its message); ``None`` is refused here."""
    from .tflite.convert import byte_count

    if value is None or byte_count(value, name, f"e.g. {example}") is None:
        raise ValueError(f"{name} must be a positive number of bytes (e.g. {example}), got None.")


def _inputs(data) -> np.ndarray:
    x = np.asarray(data, np.float32)[:MAX_SAMPLES]
    if x.ndim < 2 or len(x) == 0:
        raise ValueError("budget_data must be an array of model inputs (first axis the sample), e.g. x_train[:256].")
    return x


def check_ram(model, ram_budget, data, layers: dict, log=print) -> Allocation:
    """Check, before training, that ``model`` with ``layers`` ({name: options}, each with its ``sparsity``)
    ternarized gives a ``micro`` file that runs in ``ram_budget`` bytes of TFLM arena (``convert(ram_budget=)``
    splits weights or keeps them plain int8 as needed); an impossible budget is the converter's error naming the
    smallest arena reached."""
    _check_bytes(ram_budget, "ram_budget", "65_536")
    x = _inputs(data)
    kernels = {}
    for name, options in layers.items():
        layer = model.get_layer(name)
        sparsity = options["sparsity"]
        if not isinstance(sparsity, numbers.Real):
            sparsity = getattr(sparsity, "final_sparsity", getattr(sparsity, "target_sparsity", 0.0))  # a schedule
        for attr, dims in kernel_attributes(layer):
            kernels[(name, attr)] = _project(np.asarray(getattr(layer, attr).numpy(), np.float32), dims,
                                             float(sparsity), options)  # fmt: skip
    from .tflite import micro

    buf = _micro_bytes(model, kernels, x, int(ram_budget))[2]
    result = Allocation(None, {}, len(buf), len(buf), ram_budget=int(ram_budget), arena_bytes=micro.measure_arena(buf))
    log(result.table())
    return result


def allocate(model, flash_budget, data, layers: dict, candidates=CANDIDATES, log=print,
             ram_budget: int | None = None) -> Allocation:  # fmt: skip
    """Per-layer sparsities for ``layers`` ({layer name: its options}) of the float ``model`` so that the micro
    file fits ``flash_budget`` bytes (module docstring), and with ``ram_budget`` runs in that many bytes of TFLM
    arena (every conversion fitted to it, so weights kept plain int8 for RAM are paid in flash). ``data``: model
    inputs (a few hundred are used)."""
    _check_bytes(flash_budget, "flash_budget", "40_000")
    if ram_budget is not None:
        _check_bytes(ram_budget, "ram_budget", "65_536")
    x = _inputs(data)
    candidates = sorted(set(float(c) for c in candidates))
    kernels = {}
    for name in layers:
        layer = model.get_layer(name)
        kernels[name] = [(attr, dims, np.asarray(getattr(layer, attr).numpy(), np.float32))
                         for attr, dims in kernel_attributes(layer)]  # fmt: skip
    log(f"flash budget {int(flash_budget):,} B: measuring {len(layers)} layer(s) at {len(candidates)} sparsities ...")
    layer_bytes, sensitivity = _measure(model, kernels, layers, candidates, x, ram_budget)
    biases = _as_trained(model)

    def kernels_at(choice: dict) -> dict:
        projected = {(name, attr): _project(w, dims, choice[name], layers[name])
                     for name, parts in kernels.items() for attr, dims, w in parts}  # fmt: skip
        return {**projected, **biases}

    # What is not weights: one real conversion at the middle candidate.
    middle = {name: candidates[len(candidates) // 2] for name in layers}
    file_bytes, payload, _ = _micro_bytes(model, kernels_at(middle), x, ram_budget)
    overhead = file_bytes - payload
    smallest = overhead + sum(min(b.values()) for b in layer_bytes.values())
    if smallest > flash_budget:
        raise ValueError(
            f"flash_budget={int(flash_budget):,} B cannot be met: the smallest micro file these layers reach is about "
            f"{smallest:,} B (every layer at sparsity {candidates[-1]:g}; {overhead:,} B of it are biases, scales "
            "and graph"
            + (f", and weights the converter keeps plain int8 so that the TFLM arena fits ram_budget={ram_budget:,} B"
               if ram_budget is not None else "")
            + "). Raise the budget, keep fewer layers in float, or use a smaller model."
        )  # fmt: skip
    choice, estimate, file_bytes, final = _fit(
        lambda choice: _micro_bytes(model, kernels_at(choice), x, ram_budget), layer_bytes, sensitivity,
        candidates, int(flash_budget), overhead, smallest,
    )  # fmt: skip
    if file_bytes > flash_budget:
        raise ValueError(
            f"flash_budget={int(flash_budget):,} B: the closest allocation found gives a {file_bytes:,} B micro file; "
            f"raise the budget a little (the smallest estimate is {smallest:,} B)."
        )
    result = Allocation(int(flash_budget), choice, estimate, file_bytes, layer_bytes, sensitivity, overhead,
                        capped=_capped(kernels, choice, layers))  # fmt: skip
    if ram_budget is not None:
        from .tflite import micro

        result.ram_budget, result.arena_bytes = int(ram_budget), micro.measure_arena(final)
    log(result.table())
    return result


def _measure(model, kernels: dict, layers: dict, candidates: list, x, ram_budget) -> tuple[dict, dict]:
    """``({layer: {sparsity: encoded bytes}}, {layer: {sparsity: relative output error}})``: each layer projected
    alone at each candidate (its bytes as the export's default split, ``max_decode_bytes="auto"``, encodes them;
    a ``ram_budget`` chooses its own bound)."""
    reference = _output(model, x)
    energy = float(np.mean(reference**2)) or 1.0
    bound = None
    if ram_budget is None:
        from .tflite import convert
        from .tflite.convert import auto_decode_bytes

        bound = auto_decode_bytes(convert(model, x, target="int8"))
    layer_bytes, sensitivity = {}, {}
    for name, parts in kernels.items():
        layer_bytes[name], sensitivity[name] = {}, {}
        for s in candidates:
            projected = {(name, attr): _project(w, dims, s, layers[name]) for attr, dims, w in parts}
            layer_bytes[name][s] = sum(_encoded_bytes(projected[(name, attr)], dims, bound) for attr, dims, _ in parts)
            error = np.mean((_output(_plain_copy(model, projected), x) - reference) ** 2) / energy
            sensitivity[name][s] = float(error)
    return layer_bytes, sensitivity


def _fit(convert_at, layer_bytes, sensitivity, candidates, flash_budget: int, overhead: int, smallest: int):
    """The greedy choice re-run with a tighter weight budget until the real file (``convert_at(choice)``: bytes,
    payload, file) fits: ``(choice, estimated bytes, file bytes, file)``."""
    target = flash_budget
    for _ in range(_MAX_ROUNDS):
        choice = _greedy(layer_bytes, sensitivity, candidates, target - overhead, int(MARGIN * flash_budget))
        estimate = overhead + sum(layer_bytes[n][s] for n, s in choice.items())
        file_bytes, _, final = convert_at(choice)
        if file_bytes <= flash_budget or estimate <= smallest:
            break
        target -= file_bytes - flash_budget  # the estimate was short: tighten and choose again
    return choice, estimate, file_bytes, final


def _greedy(layer_bytes: dict, sensitivity: dict, candidates: list, weight_budget: int, margin: int = 0) -> dict:
    choice = {name: candidates[0] for name in layer_bytes}

    def total() -> int:
        return sum(layer_bytes[n][s] for n, s in choice.items())

    while total() > weight_budget:
        best, best_ratio = None, -1.0
        for name, s in choice.items():
            k = candidates.index(s)
            if k + 1 == len(candidates):
                continue
            nxt = candidates[k + 1]
            saved = layer_bytes[name][s] - layer_bytes[name][nxt]
            cost = max(sensitivity[name][nxt] - sensitivity[name][s], 0.0)
            ratio = saved / (cost + 1e-12)
            if saved > 0 and ratio > best_ratio:
                best, best_ratio = name, ratio
        if best is None:
            break
        choice[best] = candidates[candidates.index(choice[best]) + 1]
    # Steps are coarse: give bytes back where they buy the most, keeping a margin for training to move the support.
    refill_budget = weight_budget - margin
    while True:
        best, best_ratio = None, 0.0
        for name, s in choice.items():
            k = candidates.index(s)
            if k == 0:
                continue
            prev = candidates[k - 1]
            added = layer_bytes[name][prev] - layer_bytes[name][s]
            gain = sensitivity[name][s] - sensitivity[name][prev]
            if gain > 0 and total() + max(added, 0) <= refill_budget and gain / max(added, 1) > best_ratio:
                best, best_ratio = name, gain / max(added, 1)
        if best is None:
            return choice
        choice[best] = candidates[candidates.index(choice[best]) - 1]
