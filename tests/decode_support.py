"""Helpers for the TFLM_DECODE tests: runtime probes, reference decoders that mirror the TFLM kernels
step by step (independent of the library's vectorized decoders), and tiny int8 models."""

from __future__ import annotations

import numpy as np
from tflite_micro import runtime

from ptq_keras.tflite import encoders, flatbuffer

S = flatbuffer.schema


# ----------------------------------------------------------------------------- runtime probes
def run_tflm(buf: bytes, inputs: list[np.ndarray], arena_size: int = 400_000, **kwargs) -> list[np.ndarray]:
    """Output 0 of a TFLM interpreter for each input (one interpreter, invoked once per input)."""
    interpreter = runtime.Interpreter.from_bytes(buf, arena_size=arena_size, **kwargs)
    outputs = []
    for x in inputs:
        interpreter.set_input(x, 0)
        interpreter.invoke()
        outputs.append(np.array(interpreter.get_output(0)))
    return outputs


def _tensor(shape, tensor_type, buffer, name, quantization=None) -> S.TensorT:
    t = S.TensorT()
    t.shape = np.array(shape, dtype=np.int32)
    t.type, t.buffer, t.name, t.quantization = tensor_type, buffer, name, quantization
    return t


def _quant(scales, zero_points, axis) -> S.QuantizationParametersT:
    q = S.QuantizationParametersT()
    q.scale = np.asarray(scales, dtype=np.float32)
    q.zeroPoint = np.asarray(zero_points, dtype=np.int64)
    q.quantizedDimension = axis
    return q


def _model(tensors, buffers, ops, opcodes, inputs, outputs) -> bytes:
    model = S.ModelT()
    model.version = 3
    model.buffers = [S.BufferT()]
    for data in buffers:
        b = S.BufferT()
        b.data = np.frombuffer(data, dtype=np.uint8)
        model.buffers.append(b)
    graph = S.SubGraphT()
    graph.tensors, graph.operators = tensors, ops
    graph.inputs, graph.outputs = np.array(inputs, dtype=np.int32), np.array(outputs, dtype=np.int32)
    model.subgraphs, model.operatorCodes = [graph], opcodes
    return flatbuffer.write(model)


def decode_only_model(data: bytes, ancillary: bytes, shape, scales=None, zero_points=None, axis: int = 0) -> bytes:
    """A graph whose only op is TFLM_DECODE and whose output is the decoded tensor (plus an unused input)."""
    quant = None if scales is None else _quant(scales, zero_points, axis)
    tensors = [
        _tensor([len(data)], S.TensorType.UINT8, 1, "encoded"),
        _tensor([len(ancillary)], S.TensorType.UINT8, 2, "encoded_ancillary"),
        _tensor(shape, S.TensorType.INT8, 0, "decoded", quant),
        _tensor([1], S.TensorType.INT8, 0, "unused_input"),
    ]
    op = S.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = 0, np.array([0, 1], dtype=np.int32), np.array([2], dtype=np.int32)
    code = S.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = S.BuiltinOperator.CUSTOM
    code.customCode, code.version = "TFLM_DECODE", 1
    return _model(tensors, [data, ancillary], [op], [code], [3], [2])


def runtime_decode(encoded: encoders.Encoded, values: np.ndarray, layout: encoders.ChannelLayout) -> np.ndarray:
    """What the TFLM runtime decodes from ``encoded`` for a tensor shaped like ``values``."""
    scales = [1.0] * layout.channels
    zero_points = list(layout.zero_points) * (layout.channels if len(layout.zero_points) == 1 else 1)
    buf = decode_only_model(encoded.data, encoded.ancillary, values.shape, scales, zero_points, layout.axis)
    return run_tflm(buf, [np.zeros(1, dtype=np.int8)], arena_size=16 * 1024 + 4 * values.size)[0]


def identity_fc_model(weights: np.ndarray, per_channel: bool = True) -> bytes:
    """int8 FULLY_CONNECTED (O, I) with unit scales and zero bias: input eye(I) -> output weights.T."""
    out_ch, in_ch = weights.shape
    unit = _quant([1.0], [0], 0)
    channels = out_ch if per_channel else 1
    tensors = [
        _tensor([in_ch, in_ch], S.TensorType.INT8, 0, "x", unit),
        _tensor([out_ch, in_ch], S.TensorType.INT8, 1, "fc/weights", _quant([1.0] * channels, [0] * channels, 0)),
        _tensor([out_ch], S.TensorType.INT32, 2, "fc/bias", _quant([1.0] * channels, [0] * channels, 0)),
        _tensor([in_ch, out_ch], S.TensorType.INT8, 0, "y", _quant([1.0], [0], 0)),
    ]
    op = S.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = 0, np.array([0, 1, 2], dtype=np.int32), np.array([3], dtype=np.int32)
    op.builtinOptionsType = S.BuiltinOptions.FullyConnectedOptions
    op.builtinOptions = S.FullyConnectedOptionsT()
    code = S.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = S.BuiltinOperator.FULLY_CONNECTED
    code.version = 1
    bias = np.zeros(out_ch, dtype=np.int32).tobytes()
    return _model(tensors, [weights.astype(np.int8).tobytes(), bias], [op], [code], [0], [3])


# ----------------------------------------------------------------------------- reference decoders
def _runtime_channels(count: int, layout: encoders.ChannelLayout, rank: int):
    """(channels, interleaved) as the LUT / PRUNE Setup derives them from quantization and rank."""
    interleaved = layout.axis == rank - 1 and layout.channels > 1
    if not interleaved and layout.axis != 0:
        raise RuntimeError(f"unsupported quantization axis {layout.axis}")
    return layout.channels, interleaved


def ref_lut(data: bytes, ancillary: bytes, shape, layout: encoders.ChannelLayout) -> np.ndarray:
    """TFLM LUT decode, element by element."""
    count = int(np.prod(shape))
    channels, interleaved = _runtime_channels(count, layout, len(shape))
    width, stride = ancillary[5] & 0x07, ancillary[6]
    table = np.frombuffer(ancillary[16:], dtype=np.int8)
    per_channel = 1 if interleaved else count // channels
    out = np.empty(count, dtype=np.int8)
    for i in range(count):
        index = 0
        for b in range(i * width, (i + 1) * width):
            index = (index << 1) | ((data[b >> 3] >> (7 - (b & 7))) & 1)
        channel = i % channels if interleaved else i // per_channel
        out[i] = table[channel * stride + index]
    return out.reshape(shape)


def ref_prune(data: bytes, ancillary: bytes, shape, layout: encoders.ChannelLayout) -> np.ndarray:
    """TFLM PRUNE decode for int8, element by element."""
    count = int(np.prod(shape))
    channels, interleaved = _runtime_channels(count, layout, len(shape))
    zero_points = list(layout.zero_points)
    per_channel_zp = channels > 1 and any(z != 0 for z in zero_points)
    values = np.frombuffer(ancillary[16:], dtype=np.int8)
    out, taken = np.empty(count, dtype=np.int8), 0
    for i in range(count):
        if (data[i >> 3] >> (7 - (i & 7))) & 1:
            out[i], taken = values[taken], taken + 1
        elif per_channel_zp:
            out[i] = zero_points[i % channels if interleaved else i // (count // channels)]
        else:
            out[i] = zero_points[0]
    return out.reshape(shape)


def ref_huffman(data: bytes, ancillary: bytes, count: int) -> np.ndarray:
    """TFLM HUFFMAN decode: the kernel's 32-bit word reader (big-endian words), get / put-back bits and
    table walk. Reading past the stream raises IndexError (missing look-ahead padding)."""
    assert len(data) % 4 == 0, "the stream must be whole 32-bit words"
    words = [int.from_bytes(data[i : i + 4], "big") for i in range(0, len(data), 4)]
    wide = bool(ancillary[5] & 1)
    table = np.frombuffer(ancillary[16:], dtype="<u4" if wide else "<u2").astype(np.int64)
    found, count_mask, shift, value_mask = (
        (0x80000000, 0x78000000, 27, 0x07FFFFFF) if wide else (0x8000, 0x7800, 11, 0x07FF)
    )
    root = (ancillary[5] >> 4) + 1
    state = {"offset": 32, "hold": words[0], "next": 1}

    def get_bits(n: int) -> int:
        out = 0
        if n > state["offset"]:
            out = (state["hold"] & ((1 << state["offset"]) - 1)) << (n - state["offset"])
            n -= state["offset"]
            state["hold"], state["next"], state["offset"] = words[state["next"]], state["next"] + 1, 32
        out |= (state["hold"] >> (state["offset"] - n)) & ((1 << n) - 1)
        state["offset"] -= n
        return out

    def put_back(n: int) -> None:
        state["offset"] += n
        if state["offset"] > 32:
            state["offset"] -= 32
            state["next"] -= 1
            state["hold"] = words[state["next"] - 1]

    out = np.empty(count, dtype=np.int8)
    for i in range(count):
        used = root
        offset = get_bits(used)
        entry = int(table[offset])
        while not entry & found:
            used = ((entry & count_mask) >> shift) + 1
            offset += (entry & value_mask) + get_bits(used)
            entry = int(table[offset])
        out[i] = np.uint8(entry & 0xFF).view(np.int8)
        residual = (entry & count_mask) >> shift
        if used > residual:
            put_back(used - residual)
    return out


# ----------------------------------------------------------------------------- tiny int8 models
def make_ternary(model, rng: np.random.Generator, sparsity: float = 0.7) -> None:
    """Set every kernel to alpha_c * {-1, 0, +1} per output channel (depthwise: channel = in * mult)."""
    from ptq_keras.compat import keras

    for layer in model.layers:
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            variable = layer.depthwise_kernel
            channels = variable.shape[2] * variable.shape[3]
        elif getattr(layer, "kernel", None) is not None:
            variable = layer.kernel
            channels = variable.shape[-1]
        else:
            continue
        shape = tuple(variable.shape)
        signs = rng.choice([-1.0, 0.0, 1.0], size=(int(np.prod(shape)) // channels, channels),
                           p=[(1 - sparsity) / 2, sparsity, (1 - sparsity) / 2])
        alpha = rng.uniform(0.05, 0.4, size=(1, channels))
        variable.assign((signs * alpha).reshape(shape).astype(np.float32))


def to_int8(model, rng: np.random.Generator, samples: int = 32) -> bytes:
    """Full-int8 TFLite conversion (int8 in/out) with a random representative dataset."""
    from ptq_keras.compat import tf

    shape = tuple(model.input_shape[1:])
    data = rng.normal(size=(samples, *shape)).astype(np.float32)
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([d[None]] for d in data)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    return converter.convert()


def random_inputs(buf: bytes, rng: np.random.Generator, count: int = 3) -> list[np.ndarray]:
    """Random int8 inputs shaped like input 0 of a .tflite file."""
    model = flatbuffer.read(buf)
    graph = model.subgraphs[0]
    shape = [int(d) for d in graph.tensors[int(graph.inputs[0])].shape]
    return [rng.integers(-128, 128, size=shape).astype(np.int8) for _ in range(count)]
