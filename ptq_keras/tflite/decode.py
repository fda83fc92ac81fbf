"""Entropy-coded weights on stock TensorFlow Lite Micro: rewrite an int8 .tflite to use ``TFLM_DECODE``.

``compress`` replaces the constant int8 weight tensor (input 1) of every FULLY_CONNECTED, CONV_2D and
DEPTHWISE_CONV_2D with an encoded UINT8 tensor plus an ancillary UINT8 tensor, and inserts one
``TFLM_DECODE`` custom op before each consumer; the consumer reads the decoded copy (same shape, type and
quantization as the original, no buffer). ``describe`` lists what a compressed file holds.

The decode op is in TFLM's default op resolver; the runtime never validates encoded data, so the
encoders (``ptq_keras.tflite.encoders``) are checked against the real runtime in the tests.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np

from . import encoders, flatbuffer, groups
from .encoders import ChannelLayout, Encoded

__all__ = [
    "DECODE_OP",
    "ENCODINGS",
    "DECODE_NS_PER_WEIGHT",
    "INT8_NS_PER_MAC",
    "auto_bytes",
    "compress",
    "describe",
    "encoding_for",
]

DECODE_OP = "TFLM_DECODE"
ENCODINGS = ("auto", *encoders.ENCODERS, groups.ENCODING)
_UINT8 = flatbuffer.schema.TensorType.UINT8
# Cost model of ``encoding="auto"`` with a latency budget: decode time per weight and int8 time per MAC,
# from benchmarks/encodings.py on x86 (FC 1024x1024: int8 0.57 ns/MAC; LUT 1.7-1.9x, PRUNE 3-12x,
# HUFFMAN 7-20x the int8 invoke). Only the ratios matter; a microcontroller shifts them all alike.
DECODE_NS_PER_WEIGHT = {"lut": 0.45, "prune": 4.0, "huffman": 8.0, groups.ENCODING: 3.0}
INT8_NS_PER_MAC = 0.57
# ``auto`` takes huffman_group only when it is at least this much smaller than the best other encoding.
GROUP_MIN_SAVING = 0.10
# What one encoded tensor costs in a slimmed ``micro`` file besides its payload: the TFLM_DECODE op, the decoded
# tensor and the ancillary tensor with its buffer (0-46 B measured on ds_cnn and small_cnn, after slimming shares
# tables; tests/test_decode_models.py measures it on an exported file). ``auto`` leaves a tensor plain int8 where
# its smallest encoding plus this is no smaller than the plain bytes (an int8 kernel that is not ternary: its
# encoding is larger than itself); a plain tensor also needs no decode buffer and no decode time.
DECODE_OVERHEAD_BYTES = 16
# Among equally small encodings, prefer the faster decode.
_SPEED_ORDER = ("lut", "prune", groups.ENCODING, "huffman")


@dataclass
class _Weight:
    """One constant int8 weight tensor and the multiply-accumulates of the weight ops that read it."""

    subgraph: int
    tensor: int
    macs: int


def compress(int8_tflite: bytes, *, encoding: str = "lut", latency_budget: float | None = None) -> bytes:
    """Encode every constant INT8 weight (input 1) of FULLY_CONNECTED / CONV_2D / DEPTHWISE_CONV_2D.

    ``encoding``: ``"lut"`` (2-bit index, fastest decode), ``"huffman"``, ``"prune"``, ``"huffman_group"``
    (Huffman over groups of four weights rebuilt by CAST/GATHER/RESHAPE, ``groups``; below one bit per weight),
    or ``"auto"`` (per tensor the smallest payload, never larger than LUT; ``huffman_group`` only where it saves
    at least ``GROUP_MIN_SAVING`` of the tensor's bytes, since its op chain also costs arena).
    ``latency_budget`` (only with ``"auto"``): the estimated decode time a layer may add, as a fraction of its
    int8 compute time (0.25 = +25%);
    layers over budget take the fastest encoding that fits, else LUT. Fully connected layers use each
    weight once per invoke, so they end up LUT; convolutions reuse each weight per output pixel.
    Returns 16-byte aligned .tflite bytes.
    """
    check_options(encoding, latency_budget)
    model = flatbuffer.read(int8_tflite, "int8_tflite")
    compress_model(model, encoding=encoding, latency_budget=latency_budget)
    return flatbuffer.write(model)


def check_options(encoding: str, latency_budget: float | None) -> None:
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r}; choose one of {list(ENCODINGS)}.")
    if latency_budget is not None:
        if encoding != "auto":
            raise ValueError(f"latency_budget applies to encoding='auto' only, not {encoding!r}.")
        if not isinstance(latency_budget, (int, float)) or latency_budget < 0:
            raise ValueError(f"latency_budget must be a number >= 0 (e.g. 0.25 for +25%), got {latency_budget!r}.")


def compress_model(
    model: flatbuffer.schema.ModelT,
    *,
    encoding: str = "lut",
    latency_budget: float | None = None,
    keep_int8: int = 0,
    keep_unencodable: bool = False,
) -> list[str]:
    """``compress`` on a parsed model, in place (the export path parses once and serializes once). Returns the
    names of the weight tensors left plain int8 besides ``keep_int8`` (``auto``: where no encoding is smaller;
    ``keep_unencodable``: where ``encoding`` cannot encode them).

    ``keep_int8``: leave that many of the largest weight tensors as plain int8 constants (no decode buffer in the
    arena, 8 bits per weight in flash), for a RAM budget that decode buffers would exceed.
    ``keep_unencodable``: a tensor that ``encoding`` cannot encode (a LUT of 2-bit indices holds four values per
    channel: an int8 layer that is not ternary) stays plain int8 instead of raising.
    """
    check_options(encoding, latency_budget)
    weights = _weights(model)
    if keep_int8:
        sizes = _sizes(model, weights)
        kept = set(sorted(range(len(weights)), key=lambda i: (-sizes[i], i))[:keep_int8])
        weights = [w for i, w in enumerate(weights) if i not in kept]
    plain = []
    for weight in weights:
        subgraph = model.subgraphs[weight.subgraph]
        tensor = subgraph.tensors[weight.tensor]
        name = _name(tensor) or f"#{weight.tensor}"
        values = flatbuffer.buffer_array(model, tensor)
        layout = _layout(tensor, name)
        try:
            if encoding == "auto":
                encoded = _choose(values, layout, weight.macs, latency_budget)
            elif encoding == groups.ENCODING:
                encoded = groups.encode(values)
            else:
                encoded = encoders.get(encoding).encode(values, layout)
        except encoders.EncodingError as exc:
            if keep_unencodable:
                plain.append(name)
                continue
            shape = [int(d) for d in tensor.shape]
            raise ValueError(f"tensor {name!r} {shape} cannot be encoded as {encoding!r}: {exc}") from None
        if encoded is None:  # auto: plain int8 is no larger
            plain.append(name)
            continue
        if isinstance(encoded, groups.GroupEncoded):
            groups.insert(model, weight.subgraph, weight.tensor, encoded, _decode_opcode(model))
        else:
            _insert_decode(model, weight, encoded)
    flatbuffer.drop_unreferenced_buffers(model)
    return plain


def encoded_names(model: flatbuffer.schema.ModelT) -> list[str]:
    """The name of each ``TFLM_DECODE`` op's first encoded tensor, in op order ("" when unnamed): what
    :func:`describe` needs to name the rows of a file whose names were dropped."""
    return [
        _name(subgraph.tensors[int(op.inputs[0])])
        for subgraph in model.subgraphs
        for op in subgraph.operators or []
        if flatbuffer.builtin_name(model, op.opcodeIndex) == DECODE_OP and op.inputs is not None and len(op.inputs)
    ]


def describe(tflite_bytes: bytes, names: list[str] | None = None) -> list[dict]:
    """One row per encoded tensor: name, encoding, shape, elements, payload_bytes (encoded + ancillary),
    bits_per_weight (8 * payload / elements), entropy_bound_bits (Shannon entropy of its int8 values, bits
    per weight: no code of the values one by one does better) and decode_scratch_bytes (the decoded copy
    the runtime puts in the arena, or in ``alt_decompression_memory``). ``names``: :func:`encoded_names` of the
    same file before its names were dropped (the ``micro`` target drops them), used where the file has none."""
    model = flatbuffer.read(tflite_bytes, "tflite_bytes")
    rows, seen = [], set()
    position = -1  # of the DECODE op, in op order over the subgraphs
    for s, subgraph in enumerate(model.subgraphs):
        consumers: dict[int, list] = {}
        for op in subgraph.operators or []:
            for i in op.inputs if op.inputs is not None else []:
                consumers.setdefault(int(i), []).append(op)
        for op in subgraph.operators or []:
            if flatbuffer.builtin_name(model, op.opcodeIndex) != DECODE_OP:
                continue
            position += 1
            inputs, outputs = _decode_io(op, s)
            for k, out_index in enumerate(outputs):
                data_index, ancillary_index = inputs[2 * k], inputs[2 * k + 1]
                if (s, data_index) in seen:
                    continue
                seen.add((s, data_index))
                row = _describe_one(model, subgraph, s, (data_index, ancillary_index, out_index), consumers)
                if not row["name"] and names is not None and position < len(names) and k == 0:
                    row["name"] = names[position]
                rows.append(row)
    return rows


def _decode_io(op, s: int) -> tuple[list[int], list[int]]:
    """The input and output tensor indices of a ``TFLM_DECODE`` op: an (encoded, ancillary) pair per output."""
    inputs = [int(i) for i in (op.inputs if op.inputs is not None else [])]
    outputs = [int(i) for i in (op.outputs if op.outputs is not None else [])]
    if len(inputs) != 2 * len(outputs) or min(inputs + outputs, default=0) < 0:
        raise flatbuffer.FlatbufferError(
            f"tflite_bytes: a {DECODE_OP} op in subgraph {s} has {len(inputs)} inputs for {len(outputs)} "
            "outputs; it needs an (encoded, ancillary) pair of constant tensors per output."
        )
    return inputs, outputs


def _describe_one(model, subgraph, s: int, indices: tuple[int, int, int], consumers: dict) -> dict:
    """The ``describe`` row of one (encoded, ancillary, output) triple of tensor ``indices``, named as stored."""
    data_index, ancillary_index, out_index = indices
    encoded, output = subgraph.tensors[data_index], subgraph.tensors[out_index]
    arrays = [flatbuffer.buffer_array(model, t) for t in (encoded, subgraph.tensors[ancillary_index])]
    if any(a is None for a in arrays):
        raise flatbuffer.FlatbufferError(
            f"tflite_bytes: {DECODE_OP} input {_name(encoded) or data_index!r} (subgraph {s}) or its "
            "ancillary tensor has no constant data."
        )
    data, ancillary = (a.tobytes() for a in arrays)
    shape = [int(d) for d in output.shape] if output.shape is not None else []
    count = _decoded_count(output, out_index, shape, data, s)
    try:
        encoder = encoders.for_ancillary(ancillary)
        values = encoder.decode(data, ancillary, count, _layout(output, _name(encoded)))
    except (ValueError, IndexError, KeyError, RecursionError, OverflowError) as exc:
        raise flatbuffer.FlatbufferError(
            f"tflite_bytes: encoded tensor {_name(encoded) or data_index!r} (subgraph {s}): its data or "
            f"ancillary data is inconsistent ({exc})."
        ) from None
    payload, scratch, encoding = len(data) + len(ancillary), count * np.dtype(np.int8).itemsize, encoder.name
    end = groups.end_of(model, subgraph, out_index, consumers)
    if end is not None:
        values, shape, extra, scratch = _grouped(model, subgraph, s, end, data, ancillary, values)
        count, payload, encoding = values.size, payload + extra, groups.ENCODING
    return {
        "name": _name(encoded),
        "encoding": encoding,
        "shape": shape,
        "elements": count,
        "payload_bytes": payload,
        "bits_per_weight": 8.0 * payload / count,
        "entropy_bound_bits": _entropy(values),
        "decode_scratch_bytes": scratch,
    }


def _decoded_count(output, out_index: int, shape: list[int], data: bytes, s: int) -> int:
    """The elements of a ``TFLM_DECODE`` output, checked against its encoded tensor's size."""
    count = int(np.prod(shape)) if shape else 0
    if count < 1:
        raise flatbuffer.FlatbufferError(
            f"tflite_bytes: {DECODE_OP} output {_name(output) or out_index!r} (subgraph {s}) has no "
            f"elements (shape {shape})."
        )
    if count > 8 * len(data):  # every encoding spends at least one bit per element
        raise flatbuffer.FlatbufferError(
            f"tflite_bytes: {DECODE_OP} output {_name(output) or out_index!r} {shape} (subgraph {s}) has "
            f"more elements than its {len(data)}-byte encoded tensor can hold."
        )
    return count


def _grouped(model, subgraph, s: int, end: int, data: bytes, ancillary: bytes, indices: np.ndarray):
    """(weights, shape, table bytes, chain arena bytes) of a grouped chain ending at tensor ``end``."""
    producers = {int(o): op for op in subgraph.operators or [] for o in op.outputs}
    found = groups.chain(model, subgraph, end, producers)
    table_tensor = subgraph.tensors[found["table"]] if found else None
    table = flatbuffer.buffer_array(model, table_tensor) if table_tensor is not None else None
    if table is None or table.ndim != 2 or table.shape[1] != groups.GROUP:
        raise flatbuffer.FlatbufferError(
            f"tflite_bytes: the grouped chain ending at tensor {end} (subgraph {s}) has no constant [G, 4] group table."
        )
    count = found["count"]
    if not 0 < count <= groups.GROUP * len(indices) or int(indices.min()) < 0 or int(indices.max()) >= len(table):
        raise flatbuffer.FlatbufferError(
            f"tflite_bytes: the grouped chain ending at tensor {end} (subgraph {s}): {len(indices)} group indices "
            f"do not fit {count} weights or the {len(table)}-row group table."
        )
    weights = table[indices.astype(np.int64)].reshape(-1)[:count]
    shape = [int(d) for d in subgraph.tensors[end].shape]
    arena = sum(_tensor_bytes(subgraph.tensors[int(o)]) for op in found["ops"] for o in op.outputs)
    return weights, shape, table.size, arena + len(indices)


def _tensor_bytes(tensor) -> int:
    size = {flatbuffer.schema.TensorType.INT32: 4}.get(tensor.type, 1)
    return size * int(np.prod([int(d) for d in tensor.shape]))


def _entropy(values: np.ndarray) -> float:
    """Shannon entropy of the values, bits per element."""
    _, counts = np.unique(values, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum() + 0.0)


_name = flatbuffer.tensor_name  # "" when names were stripped


def weight_count(model: flatbuffer.schema.ModelT) -> int:
    """How many weight tensors ``compress_model`` would encode."""
    return len(_weights(model))


def weight_sizes(model: flatbuffer.schema.ModelT) -> list[int]:
    """The elements (int8 bytes) of each weight tensor ``compress_model`` would encode."""
    return _sizes(model, _weights(model))


def _sizes(model: flatbuffer.schema.ModelT, weights: list[_Weight]) -> list[int]:
    return [int(np.prod(model.subgraphs[w.subgraph].tensors[w.tensor].shape)) for w in weights]


def _weights(model: flatbuffer.schema.ModelT) -> list[_Weight]:
    """Constant INT8 weight tensors of the weight ops (each once, even when several ops read it)."""
    found: dict[tuple[int, int], _Weight] = {}
    for s, subgraph, op in flatbuffer.weight_ops(model):
        index = int(op.inputs[1])
        tensor = subgraph.tensors[index]
        if flatbuffer.int8_constant(model, tensor) is None:
            continue
        weight = found.setdefault((s, index), _Weight(s, index, 0))
        weight.macs += _macs(subgraph, op, tensor)
    for s, subgraph in enumerate(model.subgraphs):
        outputs = {int(t) for t in subgraph.outputs} if subgraph.outputs is not None else set()
        for index in outputs:
            found.pop((s, index), None)  # a weight that is also a subgraph output stays int8
    return list(found.values())


def _macs(subgraph: flatbuffer.schema.SubGraphT, op: flatbuffer.schema.OperatorT, weight) -> int:
    """Multiply-accumulates of one weight op: output elements x (weights per output channel)."""
    out_shape = [max(int(d), 1) for d in subgraph.tensors[int(op.outputs[0])].shape]
    count = int(np.prod(weight.shape))
    return int(np.prod(out_shape)) * count // max(out_shape[-1], 1)


def _layout(tensor: flatbuffer.schema.TensorT, name: str) -> ChannelLayout:
    """The channel layout the TFLM decode kernels derive from a tensor's quantization."""
    q = tensor.quantization
    if q is None or q.scale is None or len(q.scale) <= 1:
        zero_point = int(q.zeroPoint[0]) if q is not None and q.zeroPoint is not None and len(q.zeroPoint) else 0
        return ChannelLayout(1, 0, (zero_point,))
    rank, axis = len(tensor.shape), int(q.quantizedDimension)
    if axis not in (0, rank - 1):
        raise ValueError(
            f"tensor {name!r}: per-channel quantization on axis {axis} of a rank-{rank} tensor; the TFLM decode "
            "kernels support axis 0 or the last axis only. Leave this tensor unencoded."
        )
    zero_points = tuple(int(z) for z in q.zeroPoint) if q.zeroPoint is not None else (0,)
    return ChannelLayout(len(q.scale), axis, zero_points)


def _choose(values: np.ndarray, layout: ChannelLayout, macs: int, latency_budget: float | None) -> Encoded | None:
    """``auto``: the smallest payload (ties: faster decode), within the latency budget when one is given; ``None``
    (leave the tensor plain int8) where that payload plus ``DECODE_OVERHEAD_BYTES`` is no smaller than
    ``values.size`` bytes (a small int8 kernel that is not ternary)."""
    best = encoding_for(values, layout, macs, latency_budget)
    if best.payload_bytes + getattr(best, "structure_bytes", 0) + DECODE_OVERHEAD_BYTES >= values.size:
        return None
    return best


def auto_bytes(values: np.ndarray, layout: ChannelLayout) -> int:
    """Bytes ``encoding="auto"`` stores one int8 tensor in: its chosen encoding's payload (and structure), or the
    plain int8 bytes where it leaves the tensor unencoded (the file's per-tensor tables come on top)."""
    chosen = _choose(values, layout, values.size, None)
    return int(values.size if chosen is None else chosen.payload_bytes + getattr(chosen, "structure_bytes", 0))


def encoding_for(values: np.ndarray, layout: ChannelLayout, macs: int, latency_budget: float | None) -> Encoded:
    """The encoding ``auto`` picks among the encoders for one int8 tensor (``EncodingError`` if none can)."""
    candidates: list[Encoded] = []
    errors = []
    for name in _SPEED_ORDER:
        try:
            encoder = groups if name == groups.ENCODING else encoders.get(name)
            candidates.append(encoder.encode(values) if name == groups.ENCODING else encoder.encode(values, layout))
        except encoders.EncodingError as exc:
            errors.append(f"{name}: {exc}")
    if not candidates:
        raise encoders.EncodingError("; ".join(errors))
    if latency_budget is not None:
        allowed = latency_budget * macs * INT8_NS_PER_MAC
        fitting = [c for c in candidates if DECODE_NS_PER_WEIGHT[c.encoding] * values.size <= allowed]
        candidates = fitting or [min(candidates, key=lambda c: DECODE_NS_PER_WEIGHT[c.encoding])]
    best = min(candidates, key=lambda c: c.payload_bytes + getattr(c, "structure_bytes", 0))
    if best.encoding == groups.ENCODING:
        # The group chain costs about one more decoded tensor of arena while it runs: take it only where it
        # saves a real share of the file (high sparsity), not a few percent.
        others = [c for c in candidates if c.encoding != groups.ENCODING]
        if others:
            runner_up = min(others, key=lambda c: c.payload_bytes)
            if best.payload_bytes + best.structure_bytes > (1.0 - GROUP_MIN_SAVING) * runner_up.payload_bytes:
                return runner_up
    return best


def _decode_opcode(model: flatbuffer.schema.ModelT) -> int:
    """Index of the TFLM_DECODE operator code, added when missing."""
    for i in range(len(model.operatorCodes)):
        if flatbuffer.builtin_name(model, i) == DECODE_OP:
            return i
    code = flatbuffer.schema.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = flatbuffer.schema.BuiltinOperator.CUSTOM
    code.customCode = DECODE_OP
    code.version = 1
    model.operatorCodes.append(code)
    return len(model.operatorCodes) - 1


def _insert_decode(model: flatbuffer.schema.ModelT, weight: _Weight, encoded: Encoded) -> None:
    """Turn the weight tensor into the encoded one and put a TFLM_DECODE before each of its consumers."""
    subgraph = model.subgraphs[weight.subgraph]
    original = subgraph.tensors[weight.tensor]
    name = _name(original)
    decoded_template = flatbuffer.decoded_copy(original, f"{name}_decoded" if name else None)
    ancillary = flatbuffer.add_constant(model, subgraph, f"{name}_ancillary" if name else None,
                                        np.frombuffer(encoded.ancillary, np.uint8), _UINT8)  # fmt: skip
    flatbuffer.make_encoded(original, flatbuffer.add_buffer(model, encoded.data), len(encoded.data))
    opcode = _decode_opcode(model)
    consumers = [
        i for i, op in enumerate(subgraph.operators) if op.opcodeIndex != opcode and weight.tensor in op.inputs
    ]
    inserts: dict[int, list] = {}
    for position in consumers:
        subgraph.tensors.append(copy.deepcopy(decoded_template))
        decoded_index = len(subgraph.tensors) - 1
        flatbuffer.reroute(subgraph.operators[position], weight.tensor, decoded_index)
        op = flatbuffer.schema.OperatorT()
        op.opcodeIndex = opcode
        op.inputs = np.array([weight.tensor, ancillary], dtype=np.int32)
        op.outputs = np.array([decoded_index], dtype=np.int32)
        inserts[position] = [op]
    flatbuffer.insert_before(subgraph, inserts)
