"""Per-target size, memory and speed report of an export, and ``inspect`` (the per-tensor table of a file).

Fields of one target (``TargetReport``):

* ``file_bytes``; ``ratio_fp32_tflite`` = fp32 .tflite bytes / file bytes; ``ratio_fp32_params`` = 4 x the
  Keras parameter count / file bytes.
* ``weights`` (elements of the FULLY_CONNECTED / CONV_2D / DEPTHWISE_CONV_2D weight tensors),
  ``weight_payload_bytes`` (their stored bytes; for ``micro`` encoded data plus ancillary tables) and
  ``bits_per_weight`` = 8 x payload / weights.
* ``arena_bytes``: the smallest TFLM tensor arena (``micro.measure_arena``), None where TFLM cannot run the file;
  ``decoded_weight_bytes``: the unpacked weight copies TFLM keeps in that arena (TFLM_DECODE outputs, INT4);
  ``micro`` also ``arena_bytes_alt_decompression``: the arena when the TFLM_DECODE outputs go to a separate
  ``alt_decompression_bytes`` memory (``alt_decompression_memory_size`` of the interpreter, firmware likewise).
* ``invoke_ratio``: per runtime, best invoke time of this file / that of the int8 file on the same interpreter.
* ``encodings``: ``decode.describe`` rows (``micro`` only).
* ``max_decode_bytes``, ``split`` and ``arena_bytes_unsplit`` (``micro`` with ``max_decode_bytes``): the bound, one
  row per split layer (name, op, weight bytes, parts, largest part) and the arena of the same file unsplit.
* ``dead_channels``, ``macs`` and ``macs_unreduced`` (``micro`` with all-zero output channels, e.g. from
  ``channel_sparsity``): one row per layer (name, op, channels, dead, removed; ``channels``) and the weight-op
  multiply-accumulates with and without the removal.
* ``ram_budget``, ``keep_int8`` and ``ram_fit`` (``micro`` with ``ram_budget``): the budget, the weight tensors
  left as plain int8, and every (max_decode_bytes, keep_int8, arena bytes) tried.
* ``ethos_u`` (``ethos-u`` only): Vela's figures (``ethosu.VelaFigures``); weights, payload and bits per weight are
  Vela's encoded weights. ``ExportReport.ethos_u_plain_int8``: the same figures for the plain int8 file of the
  float model (``export(..., float_model=)``), compiled with the same options.
"""

from __future__ import annotations

import datetime
import json
import os
from dataclasses import asdict, dataclass, field

import numpy as np

from . import flatbuffer, groups, micro, slim
from .verify import invoke_ratio, runtimes_for

__all__ = ["TargetReport", "ExportReport", "TensorTable", "build", "inspect", "weight_payload"]

S = flatbuffer.schema
_WEIGHT_OPS = flatbuffer.WEIGHT_OPS


_name = flatbuffer.tensor_name  # "" when names were stripped


def _nbytes(model, tensor) -> int:
    data = model.buffers[tensor.buffer].data if tensor.buffer < len(model.buffers) else None
    return 0 if data is None else len(data)


def _parts_text(parts: dict) -> str:
    """``slim.breakdown`` parts as one line: "weights 3,456, biases 2,384, ..." (the file total left out)."""
    return ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in parts.items() if k != "file_bytes")


def _round16(n: int) -> int:
    return (int(n) + 15) // 16 * 16


def weight_payload(tflite: bytes) -> dict:
    """Weight elements, stored payload bytes, zero fraction and packed types of the weight-op weights."""
    model = flatbuffer.read(tflite, "tflite")
    elements = payload = zeros = decoded = 0
    types: set[str] = set()
    for graph in model.subgraphs:
        producers = {int(o): op for op in graph.operators or [] for o in op.outputs}
        seen = set()
        for op in graph.operators or []:
            if flatbuffer.builtin_name(model, op.opcodeIndex) not in _WEIGHT_OPS or len(op.inputs) < 2:
                continue
            index = int(op.inputs[1])
            weight = graph.tensors[index]
            producer = producers.get(index)
            grouped = groups.chain(model, graph, index, producers) if producer is not None else None
            if grouped is not None:
                stored = [graph.tensors[grouped[k]] for k in ("encoded", "ancillary", "table")]
                key = grouped["encoded"]
                kind = "TFLM_DECODE"
            elif producer is not None and flatbuffer.builtin_name(model, producer.opcodeIndex) == "TFLM_DECODE":
                k = list(producer.outputs).index(index)
                stored = [graph.tensors[int(producer.inputs[2 * k])], graph.tensors[int(producer.inputs[2 * k + 1])]]
                key = int(producer.inputs[2 * k])
                kind = "TFLM_DECODE"
            elif _nbytes(model, weight):
                stored, key, kind = [weight], index, flatbuffer.tensor_type_name(weight.type)
            else:
                continue
            if key in seen:
                continue
            seen.add(key)
            count = int(np.prod([int(d) for d in weight.shape]))
            elements += count
            payload += sum(_nbytes(model, t) for t in stored)
            types.add(kind)
            if kind in ("TFLM_DECODE", "INT4"):
                decoded += count
            if kind == "INT8":
                zeros += int(np.count_nonzero(flatbuffer.buffer_array(model, weight) == 0))
    return {
        "weights": elements,
        "weight_payload_bytes": payload,
        "bits_per_weight": 8.0 * payload / elements if elements else 0.0,
        "weight_types": sorted(types),
        "decoded_weight_bytes": decoded,
        "int8_zero_fraction": zeros / elements if elements and types == {"INT8"} else None,
    }


@dataclass
class TargetReport:
    target: str
    file_bytes: int
    ratio_fp32_tflite: float
    ratio_fp32_params: float
    weights: int
    weight_payload_bytes: int
    bits_per_weight: float
    weight_types: list
    runtimes: list
    arena_bytes: int | None = None
    decoded_weight_bytes: int | None = None
    arena_bytes_alt_decompression: int | None = None
    alt_decompression_bytes: int | None = None
    invoke_ratio: dict = field(default_factory=dict)
    encodings: list = field(default_factory=list)
    ethos_u: dict | None = None
    max_decode_bytes: int | None = None
    split: list = field(default_factory=list)
    arena_bytes_unsplit: int | None = None
    dead_channels: list = field(default_factory=list)
    macs: int | None = None
    macs_unreduced: int | None = None
    ram_budget: int | None = None
    keep_int8: int = 0
    ram_fit: list = field(default_factory=list)
    parts: dict = field(default_factory=dict)  # where the file's bytes go (slim.breakdown)


@dataclass
class ExportReport:
    """Sizes, arenas and speed of every exported target; ``summary()`` text, ``to_dict()`` / ``to_json()``."""

    model: str
    fp32_params: int
    fp32_param_bytes: int
    fp32_tflite_bytes: int
    weight_sparsity: float | None
    targets: dict
    created: str = ""
    files: dict = field(default_factory=dict)
    ethos_u_plain_int8: dict | None = None

    def to_dict(self) -> dict:
        out = asdict(self)
        out["targets"] = {k: asdict(v) for k, v in self.targets.items()}
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=float) + "\n"

    def summary(self) -> str:
        sparsity = "" if self.weight_sparsity is None else f", weight sparsity {self.weight_sparsity:.1%}"
        lines = [
            f"model {self.model!r}: {self.fp32_params:,} parameters ({self.fp32_param_bytes:,} B fp32), "
            f"fp32 .tflite {self.fp32_tflite_bytes:,} B{sparsity}",
            f"{'target':<7} {'bytes':>10} {'x fp32 file':>11} {'x fp32 par':>10} {'bits/w':>7} {'arena B':>9} "
            f"{'decoded B':>9}  {'invoke vs int8':<28} weights",
        ]
        lines += [_table_row(t) for t in self.targets.values()]
        for t in self.targets.values():
            lines += _detail_lines(t, self.ethos_u_plain_int8)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def _table_row(t: TargetReport) -> str:
    arena = "-" if t.arena_bytes is None else f"{t.arena_bytes:,}"
    decoded = "-" if t.decoded_weight_bytes is None else f"{t.decoded_weight_bytes:,}"
    speed = ", ".join(f"{k} {v:.2f}x" for k, v in t.invoke_ratio.items()) or "-"
    return (
        f"{t.target:<7} {t.file_bytes:>10,} {t.ratio_fp32_tflite:>10.2f}x {t.ratio_fp32_params:>9.2f}x "
        f"{t.bits_per_weight:>7.2f} {arena:>9} {decoded:>9}  {speed:<28} {'+'.join(t.weight_types)}"
    )


def _detail_lines(t: TargetReport, plain_int8: dict | None) -> list[str]:
    """The lines below the table of one target: where its bytes go, then what applies of the rest."""
    lines = [f"  {t.target}: bytes: {_parts_text(t.parts)}"] if t.parts else []
    if t.arena_bytes_alt_decompression is not None:
        lines.append(
            f"  {t.target}: arena {t.arena_bytes_alt_decompression:,} B when the decoded weights go to a "
            f"separate {t.alt_decompression_bytes:,} B (alt_decompression_memory_size)"
        )
    for row in t.encodings:
        lines.append(
            f"  {t.target}: {row['name'] or '(unnamed)'} {row['encoding']} {row['bits_per_weight']:.2f} "
            f"bits/w (entropy bound {row['entropy_bound_bits']:.2f}), decode scratch "
            f"{row['decode_scratch_bytes']:,} B"
        )
    return lines + _micro_lines(t) + _ethos_u_lines(t, plain_int8)


def _micro_lines(t: TargetReport) -> list[str]:
    """Split layers, dead channels and the RAM budget (target ``micro``)."""
    lines = []
    if t.split:
        largest = max(row["largest_part_bytes"] for row in t.split)
        before = "" if t.arena_bytes_unsplit is None else f"; arena {t.arena_bytes_unsplit:,} B unsplit"
        after = "" if t.arena_bytes is None else f" -> {t.arena_bytes:,} B"
        lines.append(
            f"  {t.target}: max_decode_bytes={t.max_decode_bytes:,}: {len(t.split)} layer(s) split into "
            f"{sum(row['parts'] for row in t.split)} parts (largest {largest:,} B){before}{after}"
        )
    if t.dead_channels:
        removed = sum(r["removed"] for r in t.dead_channels)
        dead = sum(r["dead"] for r in t.dead_channels)
        lines.append(
            f"  {t.target}: {dead} dead output channel(s) in {len(t.dead_channels)} layer(s), {removed} "
            f"removed (the rest kept as zeros): MACs {t.macs_unreduced:,} -> {t.macs:,} "
            f"({t.macs / max(t.macs_unreduced, 1):.2f}x)"
        )
    if t.ram_budget is not None:
        bound = "no split" if t.max_decode_bytes is None else f"max_decode_bytes={t.max_decode_bytes:,}"
        lines.append(
            f"  {t.target}: ram_budget={t.ram_budget:,} B met with {bound}, {t.keep_int8} weight tensor(s) "
            f"kept int8: arena {t.ram_fit[-1][2]:,} B ({len(t.ram_fit)} candidate(s) measured)"
        )
    return lines


def _ethos_u_lines(t: TargetReport, plain: dict | None) -> list[str]:
    """Vela's figures and, given them, the comparison with the plain int8 model (target ``ethos-u``)."""
    if t.ethos_u is None:
        return []
    lines = [f"  {t.target}: {_vela_line(t.ethos_u)}"]
    if plain is not None:
        ratio = t.ethos_u["encoded_weight_bytes"] / max(plain["encoded_weight_bytes"], 1)
        speed = plain["inference_time_s"] / max(t.ethos_u["inference_time_s"], 1e-12)
        lines.append(
            f"  {t.target}: plain int8 model of the same architecture: {_vela_line(plain)}; ternary "
            f"encoded weights {ratio:.3f}x, {speed:.2f}x faster"
        )
    return lines


def _vela_line(figures: dict) -> str:
    from .ethosu import VelaFigures

    return VelaFigures(**figures).line()


def build(
    plain,
    fp32_tflite: bytes,
    buffers: dict,
    *,
    measure: bool = True,
    int8_reference: bytes | None = None,
    vela: dict | None = None,
    encoded_names: list | None = None,
):
    """The report of ``buffers`` (target -> bytes) for the plain Keras model ``plain``; ``vela``: Vela's figures
    of the ``ethos-u`` target (key ``ethos-u``) and of the float model's plain int8 file (key ``plain_int8``);
    ``encoded_names``: the ``micro`` file's ``decode.encoded_names`` before its names were dropped."""
    vela = vela or {}
    params = int(plain.count_params())
    reference = buffers.get("int8", int8_reference)
    targets = {}
    sparsity = None
    for target, buf in buffers.items():
        payload = weight_payload(buf)
        if payload["int8_zero_fraction"] is not None:
            sparsity = payload["int8_zero_fraction"]
        rep = _target_report(target, buf, payload, len(fp32_tflite), params)
        figures = vela.get(target) if target == "ethos-u" else None
        if figures is not None:
            _add_vela_figures(rep, figures)
        if target == "micro":
            from . import decode

            rep.encodings = decode.describe(buf, encoded_names)
        if measure:
            _measure(rep, buf, reference)
        targets[target] = rep
    return ExportReport(
        model=str(plain.name),
        fp32_params=params,
        fp32_param_bytes=4 * params,
        fp32_tflite_bytes=len(fp32_tflite),
        weight_sparsity=sparsity,
        targets=targets,
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        ethos_u_plain_int8=vela["plain_int8"].to_dict() if "plain_int8" in vela else None,
    )


def _target_report(target: str, buf: bytes, payload: dict, fp32_bytes: int, params: int) -> TargetReport:
    """The sizes of one target's file (``payload``: its ``weight_payload``)."""
    runtimes = list(runtimes_for(buf))
    rep = TargetReport(
        target=target,
        file_bytes=len(buf),
        ratio_fp32_tflite=fp32_bytes / len(buf),
        ratio_fp32_params=4 * params / len(buf),
        weights=payload["weights"],
        weight_payload_bytes=payload["weight_payload_bytes"],
        bits_per_weight=payload["bits_per_weight"],
        weight_types=payload["weight_types"],
        runtimes=runtimes,
    )
    if "tflm" in runtimes:
        rep.decoded_weight_bytes = payload["decoded_weight_bytes"]
    rep.parts = {k: v for k, v in slim.breakdown(buf).items() if k != "file_bytes"}
    return rep


def _add_vela_figures(rep: TargetReport, figures) -> None:
    """Target ``ethos-u``: Vela's figures, and its encoded weights as the weights of the report."""
    rep.ethos_u = figures.to_dict()
    rep.weights = figures.weights
    rep.weight_payload_bytes = figures.encoded_weight_bytes
    rep.bits_per_weight = figures.bits_per_weight
    rep.weight_types = ["ethos-u"]


def _measure(rep: TargetReport, buf: bytes, reference: bytes | None) -> None:
    """The TFLM arenas (with and without a separate decompression memory) and the invoke ratios against the
    int8 ``reference`` on every runtime both files run on."""
    if "tflm" in rep.runtimes:
        rep.arena_bytes = micro.measure_arena(buf)
        if rep.encodings:
            alt = sum(_round16(row["decode_scratch_bytes"]) for row in rep.encodings)
            rep.arena_bytes_alt_decompression = micro.measure_arena(buf, alt)
            rep.alt_decompression_bytes = alt
    if reference is not None:
        for runtime in rep.runtimes:
            if runtime in runtimes_for(reference):
                rep.invoke_ratio[runtime] = invoke_ratio(buf, reference, runtime)


# ----------------------------------------------------------------------------- inspect
@dataclass
class TensorTable:
    """Per-tensor rows of a .tflite: index, name, type, shape, bytes (constant data), channels (scales),
    axis, role (input / output / constant / activation), and the ops (``ops``)."""

    file: str
    file_bytes: int
    rows: list
    ops: list
    parts: dict = field(default_factory=dict)  # where the bytes go (slim.breakdown)

    def to_dict(self) -> dict:
        return {"file": self.file, "file_bytes": self.file_bytes, "ops": self.ops, "tensors": self.rows,
                "parts": self.parts}  # fmt: skip

    def __str__(self) -> str:
        lines = [
            f"{self.file}: {self.file_bytes:,} bytes, {len(self.rows)} tensors, ops: {', '.join(self.ops)}",
            f"bytes: {_parts_text(self.parts)}",
            f"{'#':>3} {'type':<8} {'shape':<18} {'bytes':>9} {'scales':>6} {'axis':>4} {'role':<10} name",
        ]
        for r in self.rows:
            lines.append(
                f"{r['index']:>3} {r['type']:<8} {str(r['shape']):<18} {r['bytes']:>9,} {r['scales']:>6} "
                f"{r['axis']:>4} {r['role']:<10} {r['name']}"
            )
        return "\n".join(lines)


def inspect(tflite) -> TensorTable:
    """The tensor table of a .tflite (path or bytes); a clear ``FlatbufferError`` for anything else."""
    label = os.fspath(tflite) if isinstance(tflite, (str, os.PathLike)) else "<bytes>"
    buf = flatbuffer.load(tflite, "inspect")
    model = flatbuffer.read(buf, label)
    rows, ops = [], []
    for s, graph in enumerate(model.subgraphs):
        inputs = {int(i) for i in (graph.inputs if graph.inputs is not None else [])}
        outputs = {int(i) for i in (graph.outputs if graph.outputs is not None else [])}
        ops += [flatbuffer.builtin_name(model, op.opcodeIndex) for op in graph.operators or []]
        for i, t in enumerate(graph.tensors):
            q = t.quantization
            scales = 0 if q is None or q.scale is None else len(q.scale)
            nbytes = _nbytes(model, t)
            role = "input" if i in inputs else "output" if i in outputs else "constant" if nbytes else "activation"
            rows.append(
                {
                    "subgraph": s,
                    "index": i,
                    "name": _name(t),
                    "type": flatbuffer.tensor_type_name(t.type),
                    "shape": [int(d) for d in t.shape] if t.shape is not None else [],
                    "bytes": nbytes,
                    "scales": scales,
                    "axis": int(q.quantizedDimension) if scales > 1 else 0,
                    "role": role,
                }
            )
    try:
        parts = slim.breakdown(buf)
    except (TypeError, IndexError, AttributeError) as exc:  # an operator without inputs or outputs, a bad index
        message = f"{label}: damaged file, operators that do not fit its tensors ({exc})"
        raise flatbuffer.FlatbufferError(message) from exc
    return TensorTable(label, len(buf), rows, ops, parts)
