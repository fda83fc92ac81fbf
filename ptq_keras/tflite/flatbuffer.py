"""Read, edit and write .tflite flatbuffers with the schema object API (one module for every other one to use)."""

from __future__ import annotations

import copy
import os
import tempfile

import flatbuffers
import numpy as np
from tflite_micro.tensorflow.lite.micro.python import schema_py_generated as schema

__all__ = [
    "schema",
    "FlatbufferError",
    "check",
    "read",
    "load",
    "write",
    "align",
    "atomic_write",
    "builtin_name",
    "tensor_name",
    "tensor_type_name",
    "buffer_array",
    "drop_unreferenced_buffers",
    "on_bytes",
    "WEIGHT_OPS",
    "weight_ops",
    "int8_constant",
    "add_buffer",
    "add_tensor",
    "add_constant",
    "new_op",
    "decoded_copy",
    "make_encoded",
    "reroute",
    "insert_before",
]

WEIGHT_OPS = ("FULLY_CONNECTED", "CONV_2D", "DEPTHWISE_CONV_2D")  # the ops with a constant weight (input 1)
_TFLITE_IDENTIFIER = b"TFL3"
_TYPE_NAMES = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
_BUILTIN_NAMES = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
_NUMPY_TYPES = {
    schema.TensorType.FLOAT32: np.float32,
    schema.TensorType.INT32: np.int32,
    schema.TensorType.INT64: np.int64,
    schema.TensorType.INT16: np.int16,
    schema.TensorType.INT8: np.int8,
    schema.TensorType.UINT8: np.uint8,
}


class FlatbufferError(ValueError):
    """The bytes are not a TensorFlow Lite flatbuffer this tool can read."""


def read(buf: bytes, what: str = "buffer") -> schema.ModelT:
    """Parse .tflite bytes into a mutable ``ModelT``; a clear ``FlatbufferError`` for anything else."""
    if not isinstance(buf, (bytes, bytearray, memoryview)):
        raise FlatbufferError(f"{what}: expected the bytes of a .tflite file, got {type(buf).__name__}.")
    buf = bytes(buf)
    if len(buf) < 8:
        raise FlatbufferError(f"{what}: {len(buf)} bytes is too short to be a .tflite file.")
    if buf[4:8] != _TFLITE_IDENTIFIER:
        raise FlatbufferError(f"{what}: not a TensorFlow Lite file (file identifier {buf[4:8]!r}, expected b'TFL3').")
    try:
        model = schema.ModelT.InitFromObj(schema.Model.GetRootAs(buf, 0))
    except Exception as exc:  # flatbuffers raises assorted errors on truncated input
        raise FlatbufferError(f"{what}: the .tflite flatbuffer is corrupt or truncated ({exc}).") from exc
    if not model.subgraphs:
        raise FlatbufferError(f"{what}: the .tflite file has no subgraph.")
    check(model, what, len(buf))
    return model


_PACKED_BITS = {schema.TensorType.INT4: 4, schema.TensorType.INT2: 2}
_MAX_TENSOR_BYTES = 2**31 - 1  # TFLite sizes tensors with 32-bit integers


def _text(value, where: str, what: str) -> None:
    if isinstance(value, bytes):
        try:
            value.decode("utf-8")
        except UnicodeDecodeError:
            raise FlatbufferError(f"{what}: {where} is not valid UTF-8 ({value[:32]!r}).") from None


def _index(value, size: int, where: str, what: str, optional: bool = False) -> None:
    if not (0 <= int(value) < size or (optional and int(value) == -1)):
        raise FlatbufferError(f"{what}: {where} is {int(value)}, outside 0..{size - 1}.")


def check(model: schema.ModelT, what: str = "buffer", file_size: int | None = None) -> None:
    """Raise ``FlatbufferError`` naming the first structural inconsistency: an index out of range (operator code,
    tensor, buffer), a string that is not UTF-8, a buffer outside the file, a constant whose data does not match
    its shape and type, or per-channel quantization that does not match the tensor's shape."""
    buffers = model.buffers or []
    codes = model.operatorCodes or []
    for i, code in enumerate(codes):
        _text(code.customCode, f"operator code {i}'s custom name", what)
    for b, buffer in enumerate(buffers):
        offset, size = int(getattr(buffer, "offset", 0) or 0), int(getattr(buffer, "size", 0) or 0)
        if offset > 1 and file_size is not None and offset + size > file_size:
            raise FlatbufferError(f"{what}: buffer {b} ({size} bytes at offset {offset}) lies outside the file.")
    for s, graph in enumerate(model.subgraphs):
        tensors = graph.tensors or []
        for i, t in enumerate(tensors):
            _check_tensor(t, f"subgraph {s} tensor {i}", buffers, what)
        for k, index in enumerate(list(graph.inputs if graph.inputs is not None else [])
                                  + list(graph.outputs if graph.outputs is not None else [])):  # fmt: skip
            _index(index, len(tensors), f"subgraph {s} input/output {k}", what)
        for o, op in enumerate(graph.operators or []):
            where = f"subgraph {s} operator {o}"
            _index(op.opcodeIndex, max(len(codes), 1) if codes else 0, f"{where}'s operator code", what)
            for role in ("inputs", "outputs", "intermediates"):
                for index in getattr(op, role) if getattr(op, role) is not None else []:
                    _index(index, len(tensors), f"{where}'s {role[:-1]}", what, optional=True)
        _check_op_shapes(model, graph, s, what)
    for d, sig in enumerate(model.signatureDefs or []):
        _text(sig.signatureKey, f"signature {d}'s key", what)
        _index(sig.subgraphIndex, len(model.subgraphs), f"signature {d}'s subgraph", what)
        graph_tensors = model.subgraphs[sig.subgraphIndex].tensors or []
        for m in list(sig.inputs or []) + list(sig.outputs or []):
            _text(m.name, f"signature {d}'s tensor name", what)
            _index(m.tensorIndex, len(graph_tensors), f"signature {d}'s tensor index", what)


def _check_tensor(t: schema.TensorT, where: str, buffers: list, what: str) -> None:
    """``check`` of one tensor: its name, buffer index, shape, constant data and quantization."""
    _text(t.name, f"{where}'s name", what)
    _index(t.buffer, max(len(buffers), 1), f"{where}'s buffer index", what)
    shape = [int(d) for d in t.shape] if t.shape is not None else []
    if any(d < 0 for d in shape):
        raise FlatbufferError(f"{what}: {where} has a negative dimension in its shape {shape}.")
    itemsize = np.dtype(_NUMPY_TYPES[t.type]).itemsize if t.type in _NUMPY_TYPES else 1
    if int(np.prod(shape, dtype=np.float64)) * itemsize > _MAX_TENSOR_BYTES:
        raise FlatbufferError(f"{what}: {where}'s shape {shape} needs more than 2 GiB.")
    data = buffers[t.buffer].data if buffers else None
    if data is not None and len(data):
        count = int(np.prod(shape)) if shape else 1
        if t.type in _NUMPY_TYPES:
            expected = count * np.dtype(_NUMPY_TYPES[t.type]).itemsize
        elif t.type in _PACKED_BITS:
            expected = -(-count * _PACKED_BITS[t.type] // 8)
        else:
            expected = len(data)
        if len(data) != expected:
            raise FlatbufferError(
                f"{what}: {where} ({tensor_type_name(t.type)} {shape}) needs {expected} bytes of data, "
                f"its buffer {t.buffer} holds {len(data)}."
            )
    _check_quantization(t.quantization, shape, where, what)


def _check_quantization(q, shape: list[int], where: str, what: str) -> None:
    """Positive finite scales; per-channel scales and zero points that match the tensor's ``shape``."""
    if q is not None and q.scale is not None and len(q.scale):
        with np.errstate(all="ignore"):
            scales = np.asarray(q.scale, dtype=np.float64)
            good = np.isfinite(scales) & (scales > 0)
        if not np.all(good):
            bad = scales[~good][0]
            raise FlatbufferError(f"{what}: {where} has a quantization scale {bad} (not a positive number).")
    if q is not None and q.scale is not None and len(q.scale) > 1:
        axis = int(q.quantizedDimension)
        if not 0 <= axis < len(shape) or shape[axis] != len(q.scale):
            raise FlatbufferError(
                f"{what}: {where} has {len(q.scale)} per-channel scales on axis {axis}, which does not "
                f"match its shape {shape}."
            )
        if q.zeroPoint is not None and len(q.zeroPoint) not in (0, 1, len(q.scale)):
            raise FlatbufferError(f"{what}: {where} has {len(q.zeroPoint)} zero points for {len(q.scale)} scales.")


def load(tflite, what: str = "tflite") -> bytes:
    """Bytes of a .tflite given as bytes or a path, checked to parse; a clear error for anything else."""
    if isinstance(tflite, (str, os.PathLike)):
        path = os.fspath(tflite)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{what}: no such file {path!r}.")
        with open(path, "rb") as f:
            buf = f.read()
        read(buf, path)
        return buf
    read(tflite, what)
    return bytes(tflite)


def write(model: schema.ModelT, aligned: bool = True) -> bytes:
    """Serialize ``model``; with ``aligned`` the buffers are re-laid 16-byte aligned for TFLM."""
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=_TFLITE_IDENTIFIER)
    buf = bytes(builder.Output())
    return align(buf) if aligned else buf


def align(buf: bytes) -> bytes:
    """Re-lay a flatbuffer with 16-byte aligned buffers (TFLM needs it) using the tflite-micro aligner."""
    from tflite_micro.tensorflow.lite.micro.tools import tflite_flatbuffer_align_wrapper as aligner

    with tempfile.TemporaryDirectory(prefix="ptq_align_") as tmp:
        src, dst = os.path.join(tmp, "in.tflite"), os.path.join(tmp, "out.tflite")
        with open(src, "wb") as f:
            f.write(buf)
        aligner.align_tflite_model(src, dst)
        with open(dst, "rb") as f:
            return f.read()


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename: never a half-written file."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    mode = "wb" if isinstance(data, (bytes, bytearray)) else "w"
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", dir=directory)
    try:
        with os.fdopen(fd, mode) as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def builtin_name(model: schema.ModelT, opcode_index: int) -> str:
    """Name of an operator code ("CONV_2D", or the custom code such as "TFLM_DECODE")."""
    code = model.operatorCodes[opcode_index]
    if code.customCode:
        name = code.customCode
        return name.decode() if isinstance(name, bytes) else str(name)
    builtin = max(code.builtinCode or 0, code.deprecatedBuiltinCode or 0)
    return _BUILTIN_NAMES.get(builtin, str(builtin))


def opcode_index(model: schema.ModelT, name: str) -> int:
    """Index of builtin operator code ``name`` ("CONCATENATION") in the model, appended (version 1) when missing."""
    for i in range(len(model.operatorCodes)):
        if builtin_name(model, i) == name:
            return i
    code = schema.OperatorCodeT()
    builtin = getattr(schema.BuiltinOperator, name)
    code.builtinCode, code.deprecatedBuiltinCode, code.version = builtin, min(builtin, 127), 1
    model.operatorCodes.append(code)
    return len(model.operatorCodes) - 1


def tensor_name(tensor: schema.TensorT) -> str:
    """The tensor's name ("" when names were stripped)."""
    name = tensor.name or ""
    return name.decode() if isinstance(name, bytes) else str(name)


def tensor_type_name(tensor_type: int) -> str:
    return _TYPE_NAMES.get(tensor_type, str(tensor_type))


def buffer_array(model: schema.ModelT, tensor: schema.TensorT) -> np.ndarray | None:
    """The constant data of ``tensor`` as a numpy array of its shape, or None if it has no data."""
    buffer = model.buffers[tensor.buffer]
    data = buffer.data
    if data is None or len(data) == 0:
        return None
    dtype = _NUMPY_TYPES.get(tensor.type)
    raw = np.asarray(data, dtype=np.uint8).tobytes()
    if dtype is None:
        return np.frombuffer(raw, dtype=np.uint8)
    shape = [int(d) for d in tensor.shape] if tensor.shape is not None else []
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def drop_unreferenced_buffers(model: schema.ModelT) -> None:
    """Empty, in place, the buffers no tensor or metadata entry refers to any more (replaced weights)."""
    used = {int(t.buffer) for g in model.subgraphs for t in g.tensors}
    used |= {int(m.buffer) for m in model.metadata or []}
    for i, buffer in enumerate(model.buffers):
        if i not in used:
            buffer.data = None


def on_bytes(edit, what: str = "tflite"):
    """The bytes -> bytes form of an in-place stage ``edit(model, *args)``: parse, edit, serialize."""

    def run(tflite: bytes, *args, **kwargs) -> bytes:
        model = read(tflite, what)
        edit(model, *args, **kwargs)
        return write(model)

    run.__doc__ = f"{edit.__doc__.split(chr(10))[0]} (bytes in, 16-byte aligned bytes out)"
    return run


def weight_ops(model: schema.ModelT):
    """``(subgraph index, subgraph, op)`` of every FULLY_CONNECTED / CONV_2D / DEPTHWISE_CONV_2D with a weight
    operand (input 1), in op order."""
    for s, graph in enumerate(model.subgraphs):
        for op in graph.operators or []:
            if builtin_name(model, op.opcodeIndex) in WEIGHT_OPS and op.inputs is not None and len(op.inputs) > 1:
                yield s, graph, op


def int8_constant(model: schema.ModelT, tensor: schema.TensorT) -> np.ndarray | None:
    """The data of ``tensor`` when it is a constant INT8 tensor (as ``buffer_array``), else None."""
    values = buffer_array(model, tensor)
    return values if values is not None and tensor.type == schema.TensorType.INT8 else None


# ----------------------------------------------------------------------------- graph edits
def add_buffer(model: schema.ModelT, data: bytes) -> int:
    """Append a buffer holding ``data``; its index."""
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(data, dtype=np.uint8)
    model.buffers.append(buffer)
    return len(model.buffers) - 1


def add_tensor(graph: schema.SubGraphT, name: str | None, shape: list[int], tensor_type: int, buffer: int = 0) -> int:
    """Append a tensor (no quantization; ``buffer`` 0: no data); its index."""
    tensor = schema.TensorT()
    tensor.shape = np.array(shape, dtype=np.int32)
    tensor.type = tensor_type
    tensor.buffer = buffer
    tensor.name = name
    graph.tensors.append(tensor)
    return len(graph.tensors) - 1


def add_constant(model: schema.ModelT, graph: schema.SubGraphT, name: str | None, array: np.ndarray,
                 tensor_type: int) -> int:  # fmt: skip
    """Append a constant tensor holding ``array`` (its own buffer); its index."""
    buffer = add_buffer(model, np.ascontiguousarray(array).tobytes())
    return add_tensor(graph, name, list(array.shape), tensor_type, buffer)


def new_op(model: schema.ModelT, name: str, inputs: list[int], outputs: list[int], options=None) -> schema.OperatorT:
    """An operator of builtin ``name`` (its operator code added when missing); ``options``: (type, table)."""
    op = schema.OperatorT()
    op.opcodeIndex = opcode_index(model, name)
    op.inputs = np.array(inputs, dtype=np.int32)
    op.outputs = np.array(outputs, dtype=np.int32)
    if options is not None:
        op.builtinOptionsType, op.builtinOptions = options
    return op


def decoded_copy(tensor: schema.TensorT, name: str | None) -> schema.TensorT:
    """A copy of constant ``tensor`` without data, called ``name``: the tensor a decode op writes (a one-channel
    quantization on a non-zero axis moved to axis 0: the TFLM decode kernels refuse it otherwise)."""
    decoded = copy.deepcopy(tensor)
    decoded.name = name
    decoded.buffer = 0
    q = decoded.quantization
    if q is not None and (q.scale is None or len(q.scale) <= 1) and q.quantizedDimension:
        q.quantizedDimension = 0
    return decoded


def make_encoded(tensor: schema.TensorT, buffer: int, nbytes: int) -> None:
    """Turn ``tensor`` (keeping its index) into the UINT8 vector of ``nbytes`` encoded bytes in ``buffer``."""
    tensor.buffer = buffer
    tensor.shape = np.array([nbytes], dtype=np.int32)
    tensor.shapeSignature = None
    tensor.type = schema.TensorType.UINT8
    tensor.quantization = None  # per-channel scales on the encoded bytes are stale (12 B per channel)


def reroute(op: schema.OperatorT, old: int, new: int) -> None:
    """Make ``op`` read tensor ``new`` wherever it read ``old``."""
    op.inputs = np.array([new if int(t) == old else int(t) for t in op.inputs], dtype=np.int32)


def insert_before(graph: schema.SubGraphT, inserts: dict) -> None:
    """Put the ops ``inserts[position]`` (a list) before the op at each ``position`` of ``graph``."""
    operators = []
    for position, op in enumerate(graph.operators):
        operators += inserts.get(position, [])
        operators.append(op)
    graph.operators = operators


def _broadcast(a: list[int], b: list[int]) -> list[int] | None:
    out = []
    for x, y in zip([1] * (len(b) - len(a)) + a, [1] * (len(a) - len(b)) + b):
        if x != y and 1 not in (x, y):
            return None
        out.append(max(x, y))
    return out


def _check_op_shapes(model: schema.ModelT, graph, s: int, what: str) -> None:
    """The shape rules of the ops this tool writes and edits (weight ops, element-wise ops): a damaged shape is
    named here instead of reaching a runtime's kernel."""

    def shape(index: int) -> list[int]:
        t = graph.tensors[index]
        return [int(d) for d in t.shape] if t.shape is not None else []

    for o, op in enumerate(graph.operators or []):
        name = builtin_name(model, op.opcodeIndex)
        ins = [int(i) for i in (op.inputs if op.inputs is not None else [])]
        outs = [int(i) for i in (op.outputs if op.outputs is not None else [])]
        where = f"{what}: subgraph {s} operator {o} ({name})"
        if name in WEIGHT_OPS:
            if len(ins) < 2 or len(outs) != 1 or min(ins[:2]) < 0:
                raise FlatbufferError(f"{where} needs an input, a weight and one output.")
            x, w, y = shape(ins[0]), shape(ins[1]), shape(outs[0])
            rank = 2 if name == "FULLY_CONNECTED" else 4
            if len(w) != rank or not y or 0 in w:
                raise FlatbufferError(f"{where}: weight shape {w} is not a rank-{rank} weight.")
            channels = w[0] if name != "DEPTHWISE_CONV_2D" else w[3]
            if y[-1] != channels:
                raise FlatbufferError(f"{where}: output shape {y} does not end in the weight's {channels} channels.")
            if not x:
                raise FlatbufferError(f"{where}: its input has no shape.")
            if name == "FULLY_CONNECTED" and int(np.prod(x)) % w[1]:
                raise FlatbufferError(f"{where}: input shape {x} is not a whole number of {w[1]}-element rows.")
            if name == "CONV_2D" and (len(x) != 4 or x[3] % w[3]):
                raise FlatbufferError(f"{where}: input shape {x} does not match the filter's {w[3]} channels.")
            if name == "DEPTHWISE_CONV_2D" and (len(x) != 4 or x[3] == 0 or w[3] % x[3]):
                raise FlatbufferError(f"{where}: input shape {x} does not divide the filter's {w[3]} channels.")
            if len(ins) > 2 and ins[2] >= 0 and int(np.prod(shape(ins[2]))) != channels:
                raise FlatbufferError(f"{where}: bias shape {shape(ins[2])} does not match {channels} channels.")
        elif name in ("ADD", "SUB", "MUL"):
            if len(ins) != 2 or len(outs) != 1 or min(ins + outs) < 0:
                raise FlatbufferError(f"{where} needs two inputs and one output.")
            joined = _broadcast(shape(ins[0]), shape(ins[1]))
            if joined is None or joined != shape(outs[0]):
                raise FlatbufferError(
                    f"{where}: input shapes {shape(ins[0])} and {shape(ins[1])} do not give its output shape "
                    f"{shape(outs[0])}."
                )
