"""Bounded decode memory: split large weight tensors along their output channels (``max_decode_bytes``).

TFLM puts each ``TFLM_DECODE`` output (a whole int8 weight tensor) in the arena while its consumer runs, so the
arena grows by the largest decoded weight. ``split_model`` rewrites a FULLY_CONNECTED / CONV_2D whose weight is
larger than ``max_bytes`` into several ops of the same kind on the same input, each with a slice of the output
channels (weights, int32 bias, per-channel scales and zero points sliced alike), joined by CONCATENATION on the
channel axis (a tree when there are more parts than TFLM's ten concatenation inputs). A DEPTHWISE_CONV_2D is split
the same way, its input channels with it (SPLIT_V on the input). Each part's weight is at most ``max_bytes``
(at least one output channel per part), so once the parts are encoded, TFLM's planner reuses one decode buffer for
all of them. The outputs stay bit-exact: every output channel is computed by the same kernel from the same input,
weights, bias and scales, and concatenation copies int8 values (all parts share the output quantization).
"""

from __future__ import annotations

import copy

import numpy as np

from . import flatbuffer

__all__ = ["SPLIT_OPS", "MAX_CONCAT_INPUTS", "split_model", "parts_of"]

S = flatbuffer.schema
SPLIT_OPS = flatbuffer.WEIGHT_OPS
MAX_CONCAT_INPUTS = 10  # TFLM's CONCATENATION kernel (kMaxInputNum)


def parts_of(channels: int, bytes_per_channel: int, max_bytes: int) -> list[tuple[int, int]]:
    """``[(first, stop), ...]`` output-channel ranges of at most ``max_bytes`` each (one channel at least),
    as even as possible."""
    per_part = max(1, int(max_bytes) // max(int(bytes_per_channel), 1))
    count = -(-channels // per_part)
    edges = np.linspace(0, channels, count + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def _constant(model, graph, template, array: np.ndarray, name_suffix: str, reuse: int | None = None) -> int:
    """A copy of constant tensor ``template`` holding ``array`` (its own buffer); with ``reuse``, that tensor
    index becomes it (so the original weight and bias are not left behind unused)."""
    buffer = flatbuffer.add_buffer(model, np.ascontiguousarray(array).tobytes())
    if reuse is None:
        return _copy(graph, template, list(array.shape), name_suffix, buffer)
    tensor = graph.tensors[reuse]
    tensor.buffer = buffer
    tensor.shape = np.array(array.shape, dtype=np.int32)
    tensor.shapeSignature = None
    return reuse


def _copy(graph, template, shape: list[int], name_suffix: str, buffer: int) -> int:
    """A copy of tensor ``template`` with ``shape`` and ``buffer``, named its name + ``name_suffix``; its index."""
    tensor = copy.deepcopy(template)
    tensor.buffer = buffer
    tensor.shape = np.array(shape, dtype=np.int32)
    tensor.shapeSignature = None
    name = flatbuffer.tensor_name(template)
    tensor.name = f"{name}{name_suffix}" if name else None
    graph.tensors.append(tensor)
    return len(graph.tensors) - 1


def _slice_quantization(q, first: int, stop: int, channels: int):
    if q is None or q.scale is None or len(q.scale) != channels:
        return copy.deepcopy(q)
    out = copy.deepcopy(q)
    out.scale = np.asarray(q.scale)[first:stop].copy()
    if q.zeroPoint is not None and len(q.zeroPoint) == channels:
        out.zeroPoint = np.asarray(q.zeroPoint)[first:stop].copy()
    return out


def _activation(graph, template, shape: list[int], name_suffix: str) -> int:
    return _copy(graph, template, shape, name_suffix, buffer=0)


def _concat(model, graph, inputs: list[int], output: int, axis: int, template) -> list:
    """CONCATENATION ops joining ``inputs`` into ``output`` on ``axis`` (a tree of at most ten inputs each)."""
    ops = []
    level = 0
    while len(inputs) > MAX_CONCAT_INPUTS:
        joined = []
        for start in range(0, len(inputs), MAX_CONCAT_INPUTS):
            group = inputs[start : start + MAX_CONCAT_INPUTS]
            if len(group) == 1:
                joined.append(group[0])
                continue
            width = sum(int(graph.tensors[i].shape[axis]) for i in group)
            shape = [int(d) for d in graph.tensors[group[0]].shape]
            shape[axis] = width
            mid = _activation(graph, template, shape, f"_concat{level}_{start}")
            ops.append(_concat_op(model, group, mid, axis))
            joined.append(mid)
        inputs, level = joined, level + 1
    ops.append(_concat_op(model, inputs, output, axis))
    return ops


def _concat_op(model, inputs: list[int], output: int, axis: int):
    options = S.ConcatenationOptionsT()
    options.axis = axis
    options.fusedActivationFunction = S.ActivationFunctionType.NONE
    return flatbuffer.new_op(model, "CONCATENATION", inputs, [output], (S.BuiltinOptions.ConcatenationOptions, options))


def _split_v(model, graph, source: int, sizes: list[int], axis: int) -> tuple[object, list[int]]:
    """A SPLIT_V op cutting ``source`` along ``axis`` into ``sizes``; returns (op, output tensor indices)."""
    template = graph.tensors[source]
    size_tensor = _constant(model, graph, _int32_template(), np.array(sizes, np.int32), "")
    axis_tensor = _constant(model, graph, _int32_template(), np.array([axis], np.int32), "")
    outputs = []
    for k, size in enumerate(sizes):
        shape = [int(d) for d in template.shape]
        shape[axis] = size
        outputs.append(_activation(graph, template, shape, f"_part{k}"))
    options = S.SplitVOptionsT()
    options.numSplits = len(sizes)
    options = (S.BuiltinOptions.SplitVOptions, options)
    return flatbuffer.new_op(model, "SPLIT_V", [source, size_tensor, axis_tensor], outputs, options), outputs


def _int32_template():
    tensor = S.TensorT()
    tensor.type = S.TensorType.INT32
    tensor.name = None
    return tensor


def split_model(model, max_bytes: int) -> list[dict]:
    """Split, in place, every FULLY_CONNECTED / CONV_2D / DEPTHWISE_CONV_2D whose constant int8 weight has more
    than ``max_bytes`` bytes (module docstring). Returns one row per split op: name, kind, weight bytes, parts."""
    if not isinstance(max_bytes, (int, np.integer)) or isinstance(max_bytes, bool) or max_bytes < 1:
        raise ValueError(f"max_decode_bytes must be a positive int (bytes), got {max_bytes!r}.")
    rows = []
    for graph in model.subgraphs:
        new_ops = []
        for op in graph.operators or []:
            kind = flatbuffer.builtin_name(model, op.opcodeIndex)
            row = None
            if kind in SPLIT_OPS and len(op.inputs) >= 2:
                row, replacement = _split_op(model, graph, op, kind, int(max_bytes))
            if row is None:
                new_ops.append(op)
            else:
                new_ops += replacement
                rows.append(row)
        graph.operators = new_ops
    flatbuffer.drop_unreferenced_buffers(model)
    return rows


def _split_op(model, graph, op, kind: str, max_bytes: int):
    """``(row, ops)``: the parts and CONCATENATION ops that replace ``op``, or ``(None, None)`` where it stays whole
    (a weight of at most ``max_bytes``, shared by several ops, or without constant int8 data or bias)."""
    weight_index = int(op.inputs[1])
    values = flatbuffer.int8_constant(model, graph.tensors[weight_index])
    if values is None or values.size <= max_bytes:
        return None, None
    if sum(weight_index in o.inputs for o in graph.operators) != 1:  # a weight shared by several ops stays whole
        return None, None
    depthwise = kind == "DEPTHWISE_CONV_2D"
    weight = _Cut(model, graph, weight_index, axis=values.ndim - 1 if depthwise else 0)  # the output-channel axis
    channels = values.shape[weight.axis]
    multiplier = _depth_multiplier(op) if depthwise else 1
    # whole input channels per part: a part holds a multiple of ``multiplier`` output channels
    per_part = values.size // channels * multiplier
    ranges = [(a * multiplier, b * multiplier) for a, b in parts_of(channels // multiplier, per_part, max_bytes)]
    bias_index = int(op.inputs[2]) if len(op.inputs) > 2 else -1
    bias = _Cut(model, graph, bias_index, axis=0) if bias_index >= 0 else None
    if len(ranges) < 2 or bias is not None and bias.values is None:
        return None, None
    ops, sources = [], [int(op.inputs[0])] * len(ranges)
    if depthwise:
        source = int(op.inputs[0])
        split_op, sources = _split_v(model, graph, source, [(b - a) // multiplier for a, b in ranges],
                                     len(graph.tensors[source].shape) - 1)  # fmt: skip
        ops.append(split_op)
    output_index = int(op.outputs[0])
    parts = []
    for k, (first, stop) in enumerate(ranges):
        inputs = [sources[k], weight.part(k, first, stop, channels)]
        if bias is not None:
            inputs.append(bias.part(k, first, stop, channels))
        ops.append(_part_op(graph, op, inputs, first, stop, f"_part{k}"))
        parts.append(int(ops[-1].outputs[0]))
    ops += _concat(model, graph, parts, output_index, len(graph.tensors[output_index].shape) - 1,
                   graph.tensors[output_index])  # fmt: skip
    name = flatbuffer.tensor_name(weight.template) or f"#{weight_index}"
    return {"name": name, "op": kind, "weight_bytes": int(values.size), "parts": len(ranges),
            "largest_part_bytes": int(max(b - a for a, b in ranges) * values.size // channels)}, ops  # fmt: skip


def _depth_multiplier(op) -> int:
    multiplier = int(op.builtinOptions.depthMultiplier) if op.builtinOptions is not None else 1
    return max(multiplier, 1)


class _Cut:
    """A constant operand (weight or bias) of a split op, cut along its output-channel ``axis`` part by part; part 0
    reuses (and rewrites) the original tensor, so a copy of it and of its quantization is kept."""

    def __init__(self, model, graph, index: int, axis: int):
        self.model, self.graph, self.index, self.axis = model, graph, index, axis
        tensor = graph.tensors[index]
        self.values = flatbuffer.buffer_array(model, tensor)
        self.quantization = copy.deepcopy(tensor.quantization)
        self.template = copy.deepcopy(tensor)

    def part(self, k: int, first: int, stop: int, channels: int) -> int:
        """The tensor of output channels ``first`` to ``stop`` of part ``k``."""
        values = np.take(self.values, range(first, stop), axis=self.axis)
        reuse = self.index if k == 0 else None
        index = _constant(self.model, self.graph, self.template, values, f"_part{k}", reuse=reuse)
        self.graph.tensors[index].quantization = _slice_quantization(self.quantization, first, stop, channels)
        return index


def _part_op(graph, op, inputs: list[int], first: int, stop: int, suffix: str):
    """A copy of ``op`` on ``inputs`` writing output channels ``first`` to ``stop`` to a new tensor."""
    output = graph.tensors[int(op.outputs[0])]
    shape = [int(d) for d in output.shape]
    shape[-1] = stop - first
    part = copy.deepcopy(op)
    part.inputs = np.array(inputs + [int(i) for i in op.inputs[3:]], dtype=np.int32)
    part.outputs = np.array([_activation(graph, output, shape, suffix)], dtype=np.int32)
    return part
