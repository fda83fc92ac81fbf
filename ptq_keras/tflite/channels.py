"""Dead output channels (``channel_sparsity``) removed from the int8 graph, bit-exact.

A CONV_2D or FULLY_CONNECTED whose weights are all zero for output channel ``k`` computes the same value for that
channel everywhere: its bias, requantized and clamped by the fused activation. When the channel reaches the next
weight op only through ops that keep channels apart (MAX_POOL_2D, AVERAGE_POOL_2D, MEAN over spatial axes, a
flattening RESHAPE), that op sees a constant ``v_k`` in input channel ``k``, and its int32 accumulator gains
``(v_k - zp_in) * sum(w[o, ..., k])`` per output ``o``. This module removes the channel from the producer
(weights, bias, per-channel scales), from every tensor on the way, and from the consumer's weights, adding that
exact integer to the consumer's int32 bias:

* FULLY_CONNECTED consumer, or CONV_2D with VALID padding: every window sees the constant, so the fold is exact;
* CONV_2D with SAME padding and a kernel larger than 1x1: border windows see padding (the zero point) instead,
  so the channel is removed only when ``v_k`` is the zero point (its contribution is zero everywhere); otherwise
  it stays, as zeros. A 1x1 kernel reads no padding, so the fold is exact there.

Channels feeding anything else (residual adds, concatenations, depthwise convolutions, graph outputs) stay as
zero weights. ``v_k`` is read from the int8 file run on LiteRT's reference kernels over calibration inputs, and a
channel whose value is not the same at every position and input is left alone. The result computes exactly what
the int8 file computes (``tests/test_channels.py`` checks it on TFLM).
"""

from __future__ import annotations

import numpy as np

from . import decode, flatbuffer

S = flatbuffer.schema
PRODUCERS = ("CONV_2D", "FULLY_CONNECTED")
CONSUMERS = ("CONV_2D", "FULLY_CONNECTED")
_POOLS = ("MAX_POOL_2D", "AVERAGE_POOL_2D")
_MAX_SAMPLES = 16


def weight_macs(model) -> int:
    """Multiply-accumulates of every FULLY_CONNECTED / CONV_2D / DEPTHWISE_CONV_2D op of ``model``."""
    ops = flatbuffer.weight_ops(model)
    return sum(decode._macs(graph, op, graph.tensors[int(op.inputs[1])]) for _, graph, op in ops)


def _consumers(graph, index: int) -> list:
    return [op for op in graph.operators or [] if index in [int(i) for i in op.inputs]]


def _chain(model, graph, start: int):
    """``(path ops, consumer op, flatten positions or None)`` from tensor ``start`` to the next weight op, or None
    when the channel axis does not survive the way there unmixed."""
    outputs = {int(t) for t in graph.outputs}
    path, current, positions = [], start, None
    while True:
        users = _consumers(graph, current)
        if current in outputs or len(users) != 1 or int(users[0].inputs[0]) != current:
            return None
        op = users[0]
        name = flatbuffer.builtin_name(model, op.opcodeIndex)
        shape = [int(d) for d in graph.tensors[current].shape]
        if name in CONSUMERS:
            if positions is None and len(shape) < 2:
                return None
            return path, op, positions
        if positions is not None:
            return None  # after a flatten only the consumer may follow
        if name in _POOLS and len(shape) == 4:
            pass
        elif name == "MEAN":
            axes = flatbuffer.buffer_array(model, graph.tensors[int(op.inputs[1])])
            if axes is None or any(int(a) % len(shape) == len(shape) - 1 for a in np.ravel(axes)):
                return None
        elif name == "RESHAPE":
            out = [int(d) for d in graph.tensors[int(op.outputs[0])].shape]
            if len(out) != 2 or out[0] != shape[0] or out[1] != int(np.prod(shape[1:])):
                return None  # only a flatten keeps the channel as the fastest axis
            positions = int(np.prod(shape[1:-1]))
        else:
            return None
        path.append(op)
        current = int(op.outputs[0])


def _set_constant(model, tensor, array: np.ndarray) -> None:
    """Give ``tensor`` a new buffer holding ``array`` (buffers may be shared; never edit one in place)."""
    buffer = S.BufferT()
    buffer.data = np.frombuffer(np.ascontiguousarray(array).tobytes(), dtype=np.uint8)
    model.buffers.append(buffer)
    tensor.buffer = len(model.buffers) - 1
    tensor.shape = np.array(array.shape, dtype=np.int32)
    tensor.shapeSignature = None


def _drop_last(tensor, count: int) -> None:
    shape = [int(d) for d in tensor.shape]
    shape[-1] -= count
    tensor.shape = np.array(shape, dtype=np.int32)
    tensor.shapeSignature = None


def _drop_channels_quantization(tensor, keep: np.ndarray, channels: int) -> None:
    q = tensor.quantization
    if q is None or q.scale is None or len(q.scale) != channels:
        return
    q.scale = np.asarray(q.scale)[keep].copy()
    if q.zeroPoint is not None and len(q.zeroPoint) == channels:
        q.zeroPoint = np.asarray(q.zeroPoint)[keep].copy()


def _constants(int8: bytes, calibration: np.ndarray, tensors: list[int]) -> dict:
    """Values of ``tensors`` (subgraph 0) of the int8 file over calibration inputs: {index: (samples, ...)}."""
    from ai_edge_litert import interpreter as litert

    interp = litert.Interpreter(
        model_content=bytes(int8),
        experimental_op_resolver_type=litert.OpResolverType.BUILTIN_REF,
        experimental_preserve_all_tensors=True,
    )
    interp.allocate_tensors()
    detail = interp.get_input_details()[0]
    scale, zero = detail["quantization"]
    info = np.iinfo(detail["dtype"])
    values = {t: [] for t in tensors}
    for x in np.asarray(calibration, np.float32)[:_MAX_SAMPLES]:
        q = np.clip(np.round(x / scale) + zero, info.min, info.max) if scale else x
        interp.set_tensor(detail["index"], q.astype(detail["dtype"]).reshape(detail["shape"]))
        interp.invoke()
        for t in tensors:
            values[t].append(np.array(interp.get_tensor(t)))
    return {t: np.stack(v) for t, v in values.items()}


def remove_dead_channels(model, int8: bytes, calibration: np.ndarray) -> list[dict]:
    """Remove, in place, the dead output channels that can go (module docstring) from ``model`` (the parsed
    ``int8`` file, subgraph 0). Returns one row per producer with dead channels: name, channels, dead, removed."""
    graph = model.subgraphs[0]
    plans = []
    for op in graph.operators or []:
        if flatbuffer.builtin_name(model, op.opcodeIndex) not in PRODUCERS or len(op.inputs) < 2:
            continue
        weight = graph.tensors[int(op.inputs[1])]
        values = flatbuffer.int8_constant(model, weight)
        if values is None:
            continue
        channels = values.shape[0]
        dead = np.flatnonzero(~values.reshape(channels, -1).any(axis=1))
        if len(dead) == 0:
            continue
        plans.append((op, dead, channels, _chain(model, graph, int(op.outputs[0]))))
    rows = []
    if not plans:
        return rows
    probes = sorted({int(chain[1].inputs[0]) for *_, chain in plans if chain is not None})
    observed = _constants(int8, calibration, probes) if probes else {}
    for op, dead, channels, chain in plans:
        name = flatbuffer.tensor_name(graph.tensors[int(op.outputs[0])]) or f"#{int(op.outputs[0])}"
        row = {"name": name, "op": flatbuffer.builtin_name(model, op.opcodeIndex), "channels": int(channels),
               "dead": int(len(dead)), "removed": 0}  # fmt: skip
        rows.append(row)
        if chain is None:
            continue
        path, consumer, positions = chain
        removable = _removable(model, graph, consumer, observed[int(consumer.inputs[0])], dead, channels, positions)
        if removable:
            _remove(model, graph, op, path, consumer, removable, channels, positions)
            row["removed"] = len(removable)
    return rows


def _removable(model, graph, consumer, seen: np.ndarray, dead, channels: int, positions) -> dict:
    """{channel: constant int8 value at the consumer's input} for the dead channels that can go exactly."""
    seen = seen.reshape(seen.shape[0], -1, channels)  # (samples, positions, channels)
    q = graph.tensors[int(consumer.inputs[0])].quantization
    zero = int(q.zeroPoint[0]) if q is not None and q.zeroPoint is not None and len(q.zeroPoint) else 0
    kind = flatbuffer.builtin_name(model, consumer.opcodeIndex)
    kernel = [int(d) for d in graph.tensors[int(consumer.inputs[1])].shape]
    # SAME padding pads only kernels larger than 1x1: a pointwise conv sees the constant everywhere
    same_padding = kind == "CONV_2D" and consumer.builtinOptions.padding == S.Padding.SAME and max(kernel[1:3]) > 1
    has_bias = len(consumer.inputs) > 2 and int(consumer.inputs[2]) >= 0
    out = {}
    for k in dead:
        column = seen[:, :, k]
        if not np.all(column == column.flat[0]):
            continue
        value = int(column.flat[0])
        if value != zero and (same_padding or not has_bias):
            continue
        out[int(k)] = value
    return out


def _remove(model, graph, producer, path, consumer, removable: dict, channels: int, positions) -> None:
    dead = np.array(sorted(removable))
    keep = np.ones(channels, bool)
    keep[dead] = False
    # producer: weights, bias, per-channel quantization, output shape
    weight = graph.tensors[int(producer.inputs[1])]
    _set_constant(model, weight, flatbuffer.buffer_array(model, weight)[keep])
    _drop_channels_quantization(weight, keep, channels)
    if len(producer.inputs) > 2 and int(producer.inputs[2]) >= 0:
        bias = graph.tensors[int(producer.inputs[2])]
        _set_constant(model, bias, flatbuffer.buffer_array(model, bias)[keep])
        _drop_channels_quantization(bias, keep, channels)
    _drop_last(graph.tensors[int(producer.outputs[0])], len(dead))
    for op in path:
        out = graph.tensors[int(op.outputs[0])]
        if flatbuffer.builtin_name(model, op.opcodeIndex) == "RESHAPE":
            shape = [int(d) for d in out.shape]
            shape[-1] = positions * int(keep.sum())
            out.shape, out.shapeSignature = np.array(shape, dtype=np.int32), None
            if len(op.inputs) > 1 and int(op.inputs[1]) >= 0:
                _set_constant(model, graph.tensors[int(op.inputs[1])], np.array(shape, np.int32))
            if op.builtinOptions is not None and getattr(op.builtinOptions, "newShape", None) is not None:
                op.builtinOptions.newShape = list(shape)
        else:
            _drop_last(out, len(dead))
    # consumer: drop the input channels, fold their constant contribution into the int32 bias
    cweight = graph.tensors[int(consumer.inputs[1])]
    w = flatbuffer.buffer_array(model, cweight).astype(np.int64)
    q = graph.tensors[int(consumer.inputs[0])].quantization
    zero = int(q.zeroPoint[0]) if q is not None and q.zeroPoint is not None and len(q.zeroPoint) else 0
    if positions is None:  # (O, ..., C): channel is the last axis
        wk = w.reshape(w.shape[0], -1, channels)
    else:  # FULLY_CONNECTED after a flatten: (O, positions * C)
        wk = w.reshape(w.shape[0], positions, channels)
    offset = sum((removable[k] - zero) * wk[:, :, k].sum(axis=1) for k in dead)
    if np.any(offset):
        bias = graph.tensors[int(consumer.inputs[2])]
        _set_constant(model, bias, (flatbuffer.buffer_array(model, bias).astype(np.int64) + offset).astype(np.int32))
    reduced = wk[:, :, keep].astype(np.int8)
    if positions is None:
        reduced = reduced.reshape(*w.shape[:-1], int(keep.sum()))
    else:
        reduced = reduced.reshape(w.shape[0], positions * int(keep.sum()))
    _set_constant(model, cweight, reduced)
