"""Per-layer report of a ternarized (or stripped) model, with the size accountings of the method.

Sizes, in bits, for a ternary kernel of ``n`` weights, ``C`` channels and ``nnz`` non-zeros, plus its float scales:

- ``dense 2-bit``: ``2 n + 32 C`` (every weight as a 2-bit code)
- ``nnz 2-bit``: ``2 nnz + 32 C`` (the paper-style figure: no cost for the positions of the zeros)
- ``entropy``: ``n H(p_-, p_0, p_+) + 32 C`` (Shannon bound of the ternary symbols)

Float weights (biases, BatchNorm, float layers) count 32 bits in every accounting. Ratios are against fp32.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field

import numpy as np

from .compat import check_keras_model
from .core.layers import kernel_attributes
from .core.ternary import as_groups
from .wrap import _ternary_wrapper, student_of, ternary_kernels

ACCOUNTINGS = ("fp32", "dense_2bit", "nnz_2bit", "entropy")


@dataclass
class LayerReport:
    """One layer's row of :func:`summary`: its kernels' kind, sparsity, scales and size in each accounting."""

    name: str
    type: str
    params: int
    ternary: bool
    sparsity: float | None = None  # achieved fraction of zeros in the ternary kernels
    target_sparsity: float | None = None
    scale_min: float | None = None
    scale_mean: float | None = None
    scale_max: float | None = None
    bits: dict = field(default_factory=dict)  # accounting -> bits
    channels: int = 0  # output channels of its kernels (each gets an int32 bias and a float scale in TFLite)
    code_bits: float = 0.0  # its kernels' weights alone: entropy of the ternary codes, 8 bits per other weight


@dataclass
class ModelReport:
    """What :func:`summary` returns: a row per layer with weights, the totals and ratios per accounting
    (``ACCOUNTINGS``: fp32, dense 2-bit, non-zeros 2-bit, entropy bound) and the estimated parts of a TFLite file;
    ``to_text()`` is the table."""

    layers: list[LayerReport]
    totals_bytes: dict  # accounting -> bytes
    ratios: dict  # accounting -> fp32 bytes / bytes
    file_parts: dict = field(default_factory=dict)  # estimated parts of a TFLite file of the model (bytes)

    def as_dict(self) -> dict:
        return asdict(self)

    def to_text(self) -> str:
        header = (
            f"{'layer':<28}{'type':<18}{'params':>9}  {'kind':<8}{'sparsity':>9}{'target':>8}"
            f"{'scale min/mean/max':>28}{'dense2b KB':>11}{'nnz2b KB':>10}{'entropy KB':>11}"
        )
        lines = [header, "-" * len(header)]
        for r in self.layers:
            kind = "ternary" if r.ternary else "float"
            sp = f"{r.sparsity:9.3f}" if r.sparsity is not None else f"{'':9}"
            tg = f"{r.target_sparsity:8.3f}" if r.target_sparsity is not None else f"{'':8}"
            sc = (
                f"{r.scale_min:9.2e}/{r.scale_mean:8.2e}/{r.scale_max:8.2e}"
                if r.scale_min is not None
                else f"{'':28}"
            )
            kb = [r.bits[a] / 8192 for a in ACCOUNTINGS[1:]]
            lines.append(
                f"{r.name[:27]:<28}{r.type[:17]:<18}{r.params:>9}  {kind:<8}{sp}{tg}{sc:>28}"
                f"{kb[0]:11.2f}{kb[1]:10.2f}{kb[2]:11.2f}"
            )
        lines.append("-" * len(header))
        t = self.totals_bytes
        lines.append(
            f"total: fp32 {t['fp32'] / 1024:.1f} KB | dense 2-bit {t['dense_2bit'] / 1024:.1f} KB "
            f"({self.ratios['dense_2bit']:.1f}x) | nnz 2-bit {t['nnz_2bit'] / 1024:.1f} KB "
            f"({self.ratios['nnz_2bit']:.1f}x) | entropy bound {t['entropy'] / 1024:.1f} KB "
            f"({self.ratios['entropy']:.1f}x)"
        )
        if self.file_parts:
            p = self.file_parts
            lines.append(
                f"micro file parts, estimated: weights >= {p['weights']:,} B (entropy of the codes), biases "
                f"{p['biases']:,} B, scales {p['scales']:,} B (int32 and float32 per output channel), plus structure "
                "(tensors, ops: ptq_keras.tflite.inspect of the exported file gives every part)"
            )
        return "\n".join(lines)


def _entropy_bits(codes: np.ndarray) -> float:
    n = codes.size
    if n == 0:
        return 0.0
    _, counts = np.unique(codes, return_counts=True)
    p = counts / n
    return float(-n * np.sum(p * np.log2(p)))


def _kernel_bits(kernel: np.ndarray, channel_dims: int) -> tuple[dict, np.ndarray]:
    """Bits of one exactly ternary kernel under each accounting, and its per-channel scales."""
    k2d = as_groups(kernel, channel_dims)
    scales = np.max(np.abs(k2d), axis=0)
    codes = np.sign(k2d).astype(np.int8)
    n, channels = k2d.shape
    scale_bits = 32 * channels
    bits = {
        "fp32": 32.0 * kernel.size,
        "dense_2bit": 2.0 * n * channels + scale_bits,
        "nnz_2bit": 2.0 * int(np.count_nonzero(codes)) + scale_bits,
        "entropy": _entropy_bits(codes) + scale_bits,
    }
    return bits, scales


def _is_ternary(kernel: np.ndarray, channel_dims: int) -> bool:
    """At most {-a, 0, +a} in every channel."""
    k2d = as_groups(kernel, channel_dims)
    scales = np.max(np.abs(k2d), axis=0, keepdims=True)
    return bool(np.all((k2d == 0) | (np.abs(k2d) == scales)))


def summary(model, print_fn=print) -> ModelReport:
    """Print a per-layer table (type, params, ternary or float, sparsity, scales, sizes) and return it.

    Works on the model returned by :func:`ptq_keras.ternarize` and on a stripped model (whose kernels are detected
    as ternary when every channel holds at most ``{-a, 0, +a}``). ``print_fn=None`` prints nothing.
    """
    check_keras_model(model)
    model = student_of(model)
    rows = []
    for layer in model.layers:
        weights = [w.numpy() for w in layer.weights]
        if not weights:
            continue
        row = _layer_report(layer)
        rows.append(row)
    totals = {a: sum(r.bits[a] for r in rows) / 8 for a in ACCOUNTINGS}
    ratios = {a: totals["fp32"] / totals[a] if totals[a] else float("inf") for a in ACCOUNTINGS}
    channels = sum(r.channels for r in rows)
    weights = int(np.ceil(sum(r.code_bits for r in rows) / 8))
    parts = {"weights": weights, "biases": 4 * channels, "scales": 4 * channels}
    report = ModelReport(rows, totals, ratios, parts)
    if print_fn is not None:
        print_fn(report.to_text())
    return report


def _is_tfmot_wrapper(layer) -> bool:
    """Any tfmot QuantizeWrapper (a tf_keras model annotated by tfmot itself); tfmot is loaded if one exists."""
    tfmot = sys.modules.get("tensorflow_model_optimization")
    return tfmot is not None and isinstance(layer, tfmot.quantization.keras.QuantizeWrapper)


def _layer_report(layer) -> LayerReport:
    wrapped = _ternary_wrapper(layer) or _is_tfmot_wrapper(layer)
    inner = layer.layer if wrapped else layer
    kernels = {}  # attribute -> (exact ternary kernel, channel_dims, target sparsity)
    if _ternary_wrapper(layer):
        dims = dict(layer.quantize_config.attributes)
        for attr, latent, mask, quantizer, qvars in ternary_kernels(layer):
            kernels[attr] = (quantizer.project_numpy(latent, mask), dims[attr], float(qvars["sparsity"].numpy()))
        others = [
            w for w in inner.weights if w.name.split("/")[-1].split(":")[0] not in kernels
        ]
    else:
        for attr, dims in kernel_attributes(inner):
            value = getattr(inner, attr).numpy()
            if _is_ternary(value, dims):
                kernels[attr] = (value, dims, None)
        others = [w for w in inner.weights if w.name.split("/")[-1].split(":")[0] not in kernels]
    bits = {a: 0.0 for a in ACCOUNTINGS}
    scales, zeros, total, targets = [], 0, 0, []
    channels, code_bits = 0, 0.0
    for attr, dims in ([] if kernels else kernel_attributes(inner)):  # a float kernel: int8 in the file
        value = getattr(inner, attr).numpy()
        channels += as_groups(value, dims).shape[1]
        code_bits += 8.0 * value.size
    for kernel, dims, target in kernels.values():
        kbits, kscales = _kernel_bits(kernel, dims)
        channels += len(kscales)
        code_bits += kbits["entropy"] - 32.0 * len(kscales)
        for a in ACCOUNTINGS:
            bits[a] += kbits[a]
        scales.append(kscales)
        zeros += int(np.sum(kernel == 0))
        total += kernel.size
        if target is not None:
            targets.append(target)
    other_params = int(sum(np.prod(w.shape) for w in others))
    for a in ACCOUNTINGS:
        bits[a] += 32.0 * other_params
    row = LayerReport(
        name=inner.name,
        type=type(inner).__name__,
        params=total + other_params,
        ternary=bool(kernels),
        bits=bits,
        channels=channels,
        code_bits=code_bits,
    )
    if kernels:
        all_scales = np.concatenate(scales)
        row.sparsity = zeros / total
        row.target_sparsity = float(np.mean(targets)) if targets else None
        row.scale_min, row.scale_mean, row.scale_max = (
            float(all_scales.min()),
            float(all_scales.mean()),
            float(all_scales.max()),
        )
    return row
