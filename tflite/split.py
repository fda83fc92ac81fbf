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
SPLIT_OPS = ("FULLY_CONNECTED", "CONV_2D", "DEPTHWISE_CONV_2D")
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
    buffer = S.BufferT()
    buffer.data = np.frombuffer(np.ascontiguousarray(array).tobytes(), dtype=np.uint8)
    model.buffers.append(buffer)
    if reuse is not None:
        tensor = graph.tensors[reuse]
        tensor.buffer = len(model.buffers) - 1
        tensor.shape = np.array(array.shape, dtype=np.int32)
        tensor.shapeSignature = None
        return reuse
    tensor = copy.deepcopy(template)
    tensor.buffer = len(model.buffers) - 1
    tensor.shape = np.array(array.shape, dtype=np.int32)
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
    tensor = copy.deepcopy(template)
    tensor.buffer = 0
    tensor.shape = np.array(shape, dtype=np.int32)
    tensor.shapeSignature = None
    name = flatbuffer.tensor_name(template)
    tensor.name = f"{name}{name_suffix}" if name else None
    graph.tensors.append(tensor)
    return len(graph.tensors) - 1


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
    op = S.OperatorT()
    op.opcodeIndex = flatbuffer.opcode_index(model, "CONCATENATION")
    op.inputs = np.array(inputs, dtype=np.int32)
    op.outputs = np.array([output], dtype=np.int32)
    options = S.ConcatenationOptionsT()
    options.axis = axis
    options.fusedActivationFunction = S.ActivationFunctionType.NONE
    op.builtinOptionsType, op.builtinOptions = S.BuiltinOptions.ConcatenationOptions, options
    return op


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
    op = S.OperatorT()
    op.opcodeIndex = flatbuffer.opcode_index(model, "SPLIT_V")
    op.inputs = np.array([source, size_tensor, axis_tensor], dtype=np.int32)
    op.outputs = np.array(outputs, dtype=np.int32)
    options = S.SplitVOptionsT()
    options.numSplits = len(sizes)
    op.builtinOptionsType, op.builtinOptions = S.BuiltinOptions.SplitVOptions, options
    return op, outputs


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
    _drop_unreferenced(model)
    return rows


def _split_op(model, graph, op, kind: str, max_bytes: int):
    weight_index = int(op.inputs[1])
    weight = graph.tensors[weight_index]
    values = flatbuffer.buffer_array(model, weight)
    if values is None or weight.type != S.TensorType.INT8 or values.size <= max_bytes:
        return None, None
    users = sum(weight_index in o.inputs for o in graph.operators)
    if users != 1:  # a weight shared by several ops stays whole
        return None, None
    depthwise = kind == "DEPTHWISE_CONV_2D"
    axis = values.ndim - 1 if depthwise else 0  # output-channel axis of the weight
    channels = values.shape[axis]
    output_index = int(op.outputs[0])
    output = graph.tensors[output_index]
    out_axis = len(output.shape) - 1
    multiplier = 1
    if depthwise:
        multiplier = int(op.builtinOptions.depthMultiplier) if op.builtinOptions is not None else 1
        multiplier = max(multiplier, 1)
        # whole input channels per part: a part holds a multiple of ``multiplier`` output channels
        per_input = values.size // channels * multiplier
        ranges = [(a * multiplier, b * multiplier) for a, b in parts_of(channels // multiplier, per_input, max_bytes)]
    else:
        ranges = parts_of(channels, values.size // channels, max_bytes)
    if len(ranges) < 2:
        return None, None
    bias_index = int(op.inputs[2]) if len(op.inputs) > 2 else -1
    bias = graph.tensors[bias_index] if bias_index >= 0 else None
    bias_values = flatbuffer.buffer_array(model, bias) if bias is not None else None
    weight_quantization = copy.deepcopy(weight.quantization)  # part 0 reuses (and rewrites) the tensors
    bias_quantization = copy.deepcopy(bias.quantization) if bias is not None else None
    weight, bias = copy.deepcopy(weight), copy.deepcopy(bias)
    ops, parts = [], []
    inputs_for_parts = [int(op.inputs[0])] * len(ranges)
    if depthwise:
        sizes = [(b - a) // multiplier for a, b in ranges]
        source = int(op.inputs[0])
        split, inputs_for_parts = _split_v(model, graph, source, sizes, len(graph.tensors[source].shape) - 1)
        ops.append(split)
    for k, (first, stop) in enumerate(ranges):
        part_values = np.take(values, range(first, stop), axis=axis)
        weight_q = _slice_quantization(weight_quantization, first, stop, channels)
        w = _constant(model, graph, weight, part_values, f"_part{k}", reuse=weight_index if k == 0 else None)
        graph.tensors[w].quantization = weight_q
        inputs = [inputs_for_parts[k], w]
        if bias is not None:
            if bias_values is None:
                return None, None
            bias_q = _slice_quantization(bias_quantization, first, stop, channels)
            b = _constant(
                model, graph, bias, bias_values[first:stop], f"_part{k}", reuse=bias_index if k == 0 else None
            )
            graph.tensors[b].quantization = bias_q
            inputs.append(b)
        shape = [int(d) for d in output.shape]
        shape[out_axis] = stop - first
        out = _activation(graph, output, shape, f"_part{k}")
        part = copy.deepcopy(op)
        part.inputs = np.array(inputs + [int(i) for i in op.inputs[3:]], dtype=np.int32)
        part.outputs = np.array([out], dtype=np.int32)
        ops.append(part)
        parts.append(out)
    ops += _concat(model, graph, parts, output_index, out_axis, output)
    name = flatbuffer.tensor_name(weight) or f"#{weight_index}"
    return {"name": name, "op": kind, "weight_bytes": int(values.size), "parts": len(ranges),
            "largest_part_bytes": int(max(b - a for a, b in ranges) * values.size // channels)}, ops  # fmt: skip


def _drop_unreferenced(model) -> None:
    used = {int(t.buffer) for g in model.subgraphs for t in g.tensors}
    used |= {int(m.buffer) for m in model.metadata or []}
    for i, buffer in enumerate(model.buffers):
        if i not in used:
            buffer.data = None
