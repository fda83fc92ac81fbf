"""INT2 / INT4 weights for targets ``litert`` and ``int4``: ``pack`` rewrites the int8 weights, ``unpack`` is its
int8 twin (the oracle of the bit packing), ``pack_signed`` / ``unpack_signed`` the bit fields.

Packing int8 ``±q`` to ``±L`` keeps every weight product exact: the weight scale becomes ``s_w * q / L`` and the int32
bias is rounded to ``round(b * L / q)`` with scale ``s_in * s_w * q / L`` (``q`` = 127 for converter output).
"""

from __future__ import annotations

import numpy as np

from . import flatbuffer
from .checks import ExportError, channel_magnitudes

__all__ = ["PACKED_TYPES", "pack_signed", "unpack_signed", "pack_model", "pack", "unpack"]

# Ops with a constant weight operand that no packed target knows how to store.
_UNPACKABLE_OPS = ("TRANSPOSE_CONV", "BATCH_MATMUL", "CONV_3D", "EMBEDDING_LOOKUP", "UNIDIRECTIONAL_SEQUENCE_LSTM")
# Weight levels per packed type: (schema type, bits, L) with values in {-L, 0, L}.
_LOWBIT = {"INT4": (17, 4, 7), "INT2": (19, 2, 1)}
# The packed type of each weight op, per target.
PACKED_TYPES = {
    "litert": {"FULLY_CONNECTED": "INT2", "CONV_2D": "INT4", "DEPTHWISE_CONV_2D": "INT4"},
    "int4": {"FULLY_CONNECTED": "INT4", "CONV_2D": "INT4", "DEPTHWISE_CONV_2D": "INT4"},
}

S = flatbuffer.schema
_name = flatbuffer.tensor_name  # "" when names were stripped


def pack_signed(values: np.ndarray, bits: int) -> bytes:
    """Two's complement ``bits``-bit packing, element ``k * (8 // bits)`` in the lowest bits of byte ``k``."""
    per_byte = 8 // bits
    flat = values.astype(np.int64).ravel() & ((1 << bits) - 1)
    flat = np.concatenate([flat, np.zeros(-len(flat) % per_byte, dtype=np.int64)]).reshape(-1, per_byte)
    shifts = np.arange(per_byte, dtype=np.int64) * bits
    return (flat << shifts).sum(axis=1).astype(np.uint8).tobytes()


def unpack_signed(data: bytes, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_signed`: ``count`` signed int8 values."""
    per_byte = 8 // bits
    raw = np.frombuffer(bytes(data), dtype=np.uint8).astype(np.int64)
    fields = (raw[:, None] >> (np.arange(per_byte) * bits)) & ((1 << bits) - 1)
    fields = fields.ravel()[:count]
    return np.where(fields >= 1 << (bits - 1), fields - (1 << bits), fields).astype(np.int8)


def pack_model(model, target: str) -> None:
    """Rewrite the int8 weights as INT2 / INT4 for target ``litert`` or ``int4``, in place."""
    types = PACKED_TYPES[target]
    done: set[tuple[int, int]] = set()
    for s, graph in enumerate(model.subgraphs):
        for op in graph.operators or []:
            op_name = flatbuffer.builtin_name(model, op.opcodeIndex)
            if op_name in _UNPACKABLE_OPS:
                raise ExportError(
                    f"op {op_name} (output {_name(graph.tensors[op.outputs[0]])!r}) has weights target {target!r} "
                    "cannot pack; export target 'int8'."
                )
            if op_name not in types or (s, int(op.inputs[1])) in done:
                continue
            weight = graph.tensors[int(op.inputs[1])]
            values = flatbuffer.int8_constant(model, weight)
            if values is None:
                continue
            done.add((s, int(op.inputs[1])))
            bias = graph.tensors[int(op.inputs[2])] if len(op.inputs) > 2 and op.inputs[2] >= 0 else None
            _pack_weight(model, graph, op, weight, values, bias, types[op_name])


pack = flatbuffer.on_bytes(pack_model, "int8 .tflite")


def _pack_weight(model, graph, op, weight, values, bias, type_name: str) -> None:
    schema_type, bits, level = _LOWBIT[type_name]
    q_params = weight.quantization
    scales = np.asarray(q_params.scale, dtype=np.float64)
    axis = int(q_params.quantizedDimension) if len(scales) > 1 else 0
    name = _name(weight)
    q = channel_magnitudes(values, axis, name, per_tensor=len(scales) == 1)
    if len(scales) == 1:
        q = q[:1]
    shape = [1] * values.ndim
    shape[axis] = -1
    ternary = np.sign(values).astype(np.int8) * np.int8(level)
    new_scales = (scales * q / level).astype(np.float32)
    q_params.scale = new_scales
    buffer = S.BufferT()
    buffer.data = np.frombuffer(pack_signed(ternary, bits), dtype=np.uint8)
    model.buffers[weight.buffer] = buffer
    weight.type = schema_type
    if bias is None:
        return
    b = flatbuffer.buffer_array(model, bias)
    if b is None:
        return
    input_scale = np.float32(graph.tensors[int(op.inputs[0])].quantization.scale[0])
    factor = np.broadcast_to(level / q.astype(np.float64), b.shape)
    requantized = np.round(b.astype(np.float64) * factor).astype(np.int32)
    bias_buffer = S.BufferT()
    bias_buffer.data = np.frombuffer(requantized.tobytes(), dtype=np.uint8)
    model.buffers[bias.buffer] = bias_buffer
    bias.quantization.scale = (input_scale * new_scales).astype(np.float32)
    bias.quantization.zeroPoint = np.zeros(len(bias.quantization.scale), dtype=np.int64)


def unpack(packed: bytes) -> bytes:
    """The int8 twin of a ``litert`` / ``int4`` file: the same ``±L`` weight values, scales and biases stored as
    INT8, so both files compute the same integers (an oracle for the bit packing)."""
    model = flatbuffer.read(packed, "packed .tflite")
    levels = {schema_type: bits for schema_type, bits, _ in _LOWBIT.values()}
    for graph in model.subgraphs:
        for tensor in graph.tensors:
            if tensor.type not in levels or model.buffers[tensor.buffer].data is None:
                continue
            count = int(np.prod([int(d) for d in tensor.shape]))
            values = unpack_signed(model.buffers[tensor.buffer].data, levels[tensor.type], count)
            buffer = S.BufferT()
            buffer.data = np.frombuffer(values.tobytes(), dtype=np.uint8)
            model.buffers[tensor.buffer] = buffer
            tensor.type = S.TensorType.INT8
    return flatbuffer.write(model)
