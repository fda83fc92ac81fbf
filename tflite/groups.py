"""Encoding ``huffman_group``: Huffman over groups of four weights, rebuilt on stock TFLM with builtin ops.

TFLM's Huffman decoder writes one value per codeword, so coding weights one by one costs at least one bit each.
Coding groups of four (one symbol per group) lowers the floor to a quarter bit and approaches the entropy of the
groups. The weight tensor becomes, in front of each consumer::

    TFLM_DECODE(indices, ancillary) -> int8 [M]          (HUFFMAN, one group index per four weights)
    CAST                            -> int32 [M]         (GATHER takes int32 positions only)
    GATHER(table int8 [G, 4], axis 0) -> int8 [M, 4]     (the G distinct groups of the tensor, G <= 128)
    [RESHAPE [4M] -> SLICE [0, N)]                       (only when N is not a multiple of four)
    RESHAPE(shape)                  -> the weight, with its shape and per-channel quantization

Groups are four consecutive weights in the tensor's stored (row-major) order; the last group is padded with
zeros. Every op is a builtin of stock TFLM (``AddDecode``, ``AddCast``, ``AddGather``, ``AddReshape``, and
``AddSlice`` for padded tensors). The chain's intermediate tensors live in the arena while it runs
(``extra_arena_bytes``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np

from . import encoders, flatbuffer

__all__ = ["ENCODING", "GROUP", "MAX_GROUPS", "GroupEncoded", "encode", "decode", "chain", "insert"]

ENCODING = "huffman_group"
GROUP = 4
STRUCTURE_BYTES = 450
MAX_GROUPS = 128  # group indices are int8 (CAST to int32 keeps them non-negative up to 127)
S = flatbuffer.schema
_CHAIN_OPS = ("CAST", "GATHER", "RESHAPE", "SLICE")


@dataclass(frozen=True)
class GroupEncoded:
    """The constants of one grouped tensor: the Huffman-coded index stream and its ancillary tensor, the table of
    distinct groups (int8 [G, 4]) and the element count."""

    encoded: encoders.Encoded
    table: np.ndarray
    count: int

    @property
    def encoding(self) -> str:
        return ENCODING

    @property
    def groups(self) -> int:
        return -(-self.count // GROUP)

    @property
    def padded(self) -> bool:
        return self.count % GROUP != 0

    @property
    def payload_bytes(self) -> int:
        """Encoded stream + ancillary + group table (what ``decode.describe`` reports)."""
        return self.encoded.payload_bytes + self.table.size

    @property
    def structure_bytes(self) -> int:
        """Flatbuffer bytes of the chain itself (its tensors, ops, shape constants): measured about 430 per
        tensor on small models; ``auto`` adds it when it compares encodings."""
        return STRUCTURE_BYTES + (STRUCTURE_BYTES // 3 if self.padded else 0)

    def extra_arena_bytes(self, shape_rank: int = 1) -> int:
        """Bytes of the chain's intermediate tensors (indices, int32 positions, gathered groups, reshaped
        weight; padded: also the flat and sliced copies)."""
        m = self.groups
        total = m + 4 * m + GROUP * m + self.count
        if self.padded:
            total += GROUP * m + self.count
        return total


def encode(values: np.ndarray) -> GroupEncoded:
    """Group ``values`` (int8, stored order) by four and Huffman-code the group indices.
    ``EncodingError`` when the tensor has more than ``MAX_GROUPS`` distinct groups (not ternary-like)."""
    flat = np.asarray(values).astype(np.int8).reshape(-1)
    count = flat.size
    if count == 0:
        raise encoders.EncodingError("the tensor is empty.")
    padded = np.zeros(-(-count // GROUP) * GROUP, dtype=np.int8)
    padded[:count] = flat
    rows = padded.reshape(-1, GROUP)
    table, indices = np.unique(rows, axis=0, return_inverse=True)
    if len(table) > MAX_GROUPS:
        raise encoders.EncodingError(
            f"{len(table)} distinct groups of {GROUP} weights (at most {MAX_GROUPS}; ternary weights have at most 81)."
        )
    idx = indices.reshape(-1).astype(np.int8)
    encoded = encoders.get("huffman").encode(idx, encoders.ChannelLayout(1, 0, (0,)))
    return GroupEncoded(encoded, table.astype(np.int8), count)


def decode(data: bytes, ancillary: bytes, table: np.ndarray, count: int) -> np.ndarray:
    """The int8 weights (stored order) of a grouped tensor (numpy reference of the op chain)."""
    groups = -(-count // GROUP)
    idx = encoders.get("huffman").decode(data, ancillary, groups, encoders.ChannelLayout(1, 0, (0,)))
    idx = idx.astype(np.int64)
    if idx.min() < 0 or idx.max() >= len(table):
        raise ValueError(f"a group index is outside the {len(table)}-row group table.")
    return np.asarray(table, np.int8)[idx].reshape(-1)[:count]


# ----------------------------------------------------------------------------- graph
def _constant(model, graph, name: str | None, array: np.ndarray, tensor_type: int) -> int:
    buffer = S.BufferT()
    buffer.data = np.frombuffer(np.ascontiguousarray(array).tobytes(), dtype=np.uint8)
    model.buffers.append(buffer)
    return _tensor(graph, name, list(array.shape), tensor_type, len(model.buffers) - 1)


def _tensor(graph, name: str | None, shape: list[int], tensor_type: int, buffer: int = 0) -> int:
    tensor = S.TensorT()
    tensor.shape = np.array(shape, dtype=np.int32)
    tensor.type = tensor_type
    tensor.buffer = buffer
    tensor.name = name
    graph.tensors.append(tensor)
    return len(graph.tensors) - 1


def _op(model, name: str, inputs: list[int], outputs: list[int], options=None) -> S.OperatorT:
    op = S.OperatorT()
    op.opcodeIndex = flatbuffer.opcode_index(model, name)
    op.inputs = np.array(inputs, dtype=np.int32)
    op.outputs = np.array(outputs, dtype=np.int32)
    if options is not None:
        op.builtinOptionsType, op.builtinOptions = options
    return op


def insert(model, subgraph_index: int, weight_index: int, grouped: GroupEncoded, decode_opcode: int) -> None:
    """Replace constant weight ``weight_index`` by the grouped constants and put the op chain (module docstring)
    before each of its consumers; the consumers read the chain's last tensor (the weight's shape and quantization)."""
    graph = model.subgraphs[subgraph_index]
    original = graph.tensors[weight_index]
    name = flatbuffer.tensor_name(original)
    shape = [int(d) for d in original.shape]

    def label(suffix: str) -> str | None:
        return f"{name}_{suffix}" if name else None

    data_buffer = S.BufferT()
    data_buffer.data = np.frombuffer(grouped.encoded.data, dtype=np.uint8)
    model.buffers.append(data_buffer)
    data_buffer_index = len(model.buffers) - 1
    ancillary = _constant(model, graph, label("ancillary"), np.frombuffer(grouped.encoded.ancillary, np.uint8),
                          S.TensorType.UINT8)  # fmt: skip
    table = _constant(model, graph, label("groups"), grouped.table, S.TensorType.INT8)
    target_shape = _constant(model, graph, None, np.array(shape, np.int32), S.TensorType.INT32)
    if grouped.padded:
        flat_shape = _constant(model, graph, None, np.array([GROUP * grouped.groups], np.int32),
                               S.TensorType.INT32)  # fmt: skip
        begin = _constant(model, graph, None, np.array([0], np.int32), S.TensorType.INT32)
        size = _constant(model, graph, None, np.array([grouped.count], np.int32), S.TensorType.INT32)
    decoded_template = copy.deepcopy(original)
    decoded_template.buffer = 0
    decoded_template.name = label("decoded")
    q = decoded_template.quantization
    if q is not None and (q.scale is None or len(q.scale) <= 1) and q.quantizedDimension:
        q.quantizedDimension = 0
    # The original tensor becomes the encoded index stream (keeps its index: nothing else refers to the weight).
    original.buffer = data_buffer_index
    original.shape = np.array([len(grouped.encoded.data)], dtype=np.int32)
    original.shapeSignature = None
    original.type = S.TensorType.UINT8
    original.quantization = None

    consumers = [
        i for i, op in enumerate(graph.operators) if weight_index in op.inputs and op.opcodeIndex != decode_opcode
    ]
    inserts: dict[int, list] = {}
    m = grouped.groups
    for position in consumers:
        indices = _tensor(graph, None, [m], S.TensorType.INT8)
        positions = _tensor(graph, None, [m], S.TensorType.INT32)
        gathered = _tensor(graph, None, [m, GROUP], S.TensorType.INT8)
        graph.tensors.append(copy.deepcopy(decoded_template))
        decoded = len(graph.tensors) - 1
        decode_op = S.OperatorT()
        decode_op.opcodeIndex = decode_opcode
        decode_op.inputs = np.array([weight_index, ancillary], dtype=np.int32)
        decode_op.outputs = np.array([indices], dtype=np.int32)
        cast_options = S.CastOptionsT()
        cast_options.inDataType, cast_options.outDataType = S.TensorType.INT8, S.TensorType.INT32
        gather_options = S.GatherOptionsT()
        gather_options.axis, gather_options.batchDims = 0, 0
        chain_ops = [
            decode_op,
            _op(model, "CAST", [indices], [positions], (S.BuiltinOptions.CastOptions, cast_options)),
            _op(model, "GATHER", [table, positions], [gathered], (S.BuiltinOptions.GatherOptions, gather_options)),
        ]
        last = gathered
        if grouped.padded:
            flat = _tensor(graph, None, [GROUP * m], S.TensorType.INT8)
            sliced = _tensor(graph, None, [grouped.count], S.TensorType.INT8)
            chain_ops += [
                _op(model, "RESHAPE", [gathered, flat_shape], [flat], _reshape_options([GROUP * m])),
                _op(model, "SLICE", [flat, begin, size], [sliced], (S.BuiltinOptions.SliceOptions, S.SliceOptionsT())),
            ]
            last = sliced
        chain_ops.append(_op(model, "RESHAPE", [last, target_shape], [decoded], _reshape_options(shape)))
        consumer = graph.operators[position]
        consumer.inputs = np.array([decoded if int(t) == weight_index else int(t) for t in consumer.inputs], np.int32)
        inserts[position] = chain_ops
    operators = []
    for position, op in enumerate(graph.operators):
        operators += inserts.get(position, [])
        operators.append(op)
    graph.operators = operators


def _reshape_options(shape: list[int]):
    options = S.ReshapeOptionsT()
    options.newShape = np.array(shape, dtype=np.int32)
    return S.BuiltinOptions.ReshapeOptions, options


def chain(model, graph, tensor_index: int, producers: dict) -> dict | None:
    """When ``tensor_index`` is the end of a grouped chain: ``{"decode", "encoded", "ancillary", "table", "ops",
    "count"}`` (the DECODE op, tensor indices, the chain ops, the weights); else None.
    ``producers``: output tensor index -> op."""
    ops, index = [], tensor_index
    while True:
        op = producers.get(index)
        if op is None:
            return None
        name = flatbuffer.builtin_name(model, op.opcodeIndex)
        if name == "TFLM_DECODE":
            break
        if name not in _CHAIN_OPS or len(op.inputs) < 2 and name == "GATHER":
            return None
        ops.append(op)
        index = int(op.inputs[1]) if name == "GATHER" else int(op.inputs[0])
    names = [flatbuffer.builtin_name(model, o.opcodeIndex) for o in ops]
    if names.count("GATHER") != 1 or names[-1] != "CAST":
        return None
    k = list(op.outputs).index(index)
    return {
        "decode": op,
        "encoded": int(op.inputs[2 * k]),
        "ancillary": int(op.inputs[2 * k + 1]),
        "table": int(ops[names.index("GATHER")].inputs[0]),
        "ops": ops,
        "count": int(np.prod([int(d) for d in graph.tensors[tensor_index].shape])),
    }


def end_of(model, graph, decoded_index: int, consumers: dict) -> int | None:
    """The last tensor of the grouped chain that starts at a DECODE output (None when that output feeds no CAST).
    ``consumers``: tensor index -> ops reading it."""
    index, seen_gather = decoded_index, False
    expected = ("CAST",)
    while True:
        nxt = [o for o in consumers.get(index, []) if flatbuffer.builtin_name(model, o.opcodeIndex) in expected]
        if len(nxt) != 1:
            return index if seen_gather and index != decoded_index else None
        name = flatbuffer.builtin_name(model, nxt[0].opcodeIndex)
        seen_gather |= name == "GATHER"
        expected = ("GATHER",) if name == "CAST" else ("RESHAPE", "SLICE")
        index = int(nxt[0].outputs[0])
