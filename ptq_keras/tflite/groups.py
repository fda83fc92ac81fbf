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
def insert(model, subgraph_index: int, weight_index: int, grouped: GroupEncoded, decode_opcode: int) -> None:
    """Replace constant weight ``weight_index`` by the grouped constants and put the op chain (module docstring)
    before each of its consumers; the consumers read the chain's last tensor (the weight's shape and quantization)."""
    graph = model.subgraphs[subgraph_index]
    original = graph.tensors[weight_index]
    name = flatbuffer.tensor_name(original)
    shape = [int(d) for d in original.shape]
    data_buffer = flatbuffer.add_buffer(model, grouped.encoded.data)
    constants = _chain_constants(model, graph, grouped, weight_index, shape)
    decoded_template = flatbuffer.decoded_copy(original, f"{name}_decoded" if name else None)
    # The original tensor becomes the encoded index stream (keeps its index: nothing else refers to the weight).
    flatbuffer.make_encoded(original, data_buffer, len(grouped.encoded.data))
    consumers = [
        i for i, op in enumerate(graph.operators) if weight_index in op.inputs and op.opcodeIndex != decode_opcode
    ]
    inserts: dict[int, list] = {}
    for position in consumers:
        chain_ops, decoded = _chain_ops(model, graph, grouped, constants, decoded_template, decode_opcode)
        flatbuffer.reroute(graph.operators[position], weight_index, decoded)
        inserts[position] = chain_ops
    flatbuffer.insert_before(graph, inserts)


def _chain_constants(model, graph, grouped: GroupEncoded, weight_index: int, shape: list[int]) -> dict:
    """The constant tensors every chain of one weight reads: the ``encoded`` stream (the weight's index), its
    ``ancillary`` data, the group ``table``, the weight's ``shape`` and, padded, the ``flat_shape`` of the groups and
    the ``begin`` / ``size`` of the SLICE."""
    name = flatbuffer.tensor_name(graph.tensors[weight_index])
    int32, add = S.TensorType.INT32, flatbuffer.add_constant
    constants = {
        "encoded": weight_index,
        "ancillary": add(model, graph, f"{name}_ancillary" if name else None,
                         np.frombuffer(grouped.encoded.ancillary, np.uint8), S.TensorType.UINT8),
        "table": add(model, graph, f"{name}_groups" if name else None, grouped.table, S.TensorType.INT8),
        "shape": add(model, graph, None, np.array(shape, np.int32), int32),
    }  # fmt: skip
    if grouped.padded:
        constants["flat_shape"] = add(model, graph, None, np.array([GROUP * grouped.groups], np.int32), int32)
        constants["begin"] = add(model, graph, None, np.array([0], np.int32), int32)
        constants["size"] = add(model, graph, None, np.array([grouped.count], np.int32), int32)
    return constants


def _chain_ops(model, graph, grouped: GroupEncoded, constants: dict, decoded_template, decode_opcode: int):
    """``(ops, decoded tensor index)``: one DECODE -> CAST -> GATHER [-> RESHAPE -> SLICE] -> RESHAPE chain."""
    m, add = grouped.groups, flatbuffer.add_tensor
    indices = add(graph, None, [m], S.TensorType.INT8)
    positions = add(graph, None, [m], S.TensorType.INT32)
    gathered = add(graph, None, [m, GROUP], S.TensorType.INT8)
    graph.tensors.append(copy.deepcopy(decoded_template))
    decoded = len(graph.tensors) - 1
    decode_op = S.OperatorT()
    decode_op.opcodeIndex = decode_opcode
    decode_op.inputs = np.array([constants["encoded"], constants["ancillary"]], dtype=np.int32)
    decode_op.outputs = np.array([indices], dtype=np.int32)
    cast_options = S.CastOptionsT()
    cast_options.inDataType, cast_options.outDataType = S.TensorType.INT8, S.TensorType.INT32
    gather_options = S.GatherOptionsT()
    gather_options.axis, gather_options.batchDims = 0, 0
    ops = [
        decode_op,
        _op(model, "CAST", [indices], [positions], (S.BuiltinOptions.CastOptions, cast_options)),
        _op(model, "GATHER", [constants["table"], positions], [gathered],
            (S.BuiltinOptions.GatherOptions, gather_options)),
    ]  # fmt: skip
    last = gathered
    if grouped.padded:
        flat = add(graph, None, [GROUP * m], S.TensorType.INT8)
        sliced = add(graph, None, [grouped.count], S.TensorType.INT8)
        ops += [
            _op(model, "RESHAPE", [gathered, constants["flat_shape"]], [flat], _reshape_options([GROUP * m])),
            _op(model, "SLICE", [flat, constants["begin"], constants["size"]], [sliced],
                (S.BuiltinOptions.SliceOptions, S.SliceOptionsT())),
        ]  # fmt: skip
        last = sliced
    shape = [int(d) for d in decoded_template.shape]
    ops.append(_op(model, "RESHAPE", [last, constants["shape"]], [decoded], _reshape_options(shape)))
    return ops, decoded


_op = flatbuffer.new_op


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
