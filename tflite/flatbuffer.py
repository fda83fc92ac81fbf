"""Read, edit and write .tflite flatbuffers with the schema object API (one module for every other one to use)."""

from __future__ import annotations

import os
import tempfile

import flatbuffers
import numpy as np
from tflite_micro.tensorflow.lite.micro.python import schema_py_generated as schema

__all__ = [
    "schema",
    "FlatbufferError",
    "read",
    "load",
    "write",
    "align",
    "atomic_write",
    "builtin_name",
    "tensor_type_name",
    "buffer_array",
]

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
        raise FlatbufferError(
            f"{what}: not a TensorFlow Lite file (file identifier {buf[4:8]!r}, expected b'TFL3')."
        )
    try:
        model = schema.ModelT.InitFromObj(schema.Model.GetRootAs(buf, 0))
    except Exception as exc:  # flatbuffers raises assorted errors on truncated input
        raise FlatbufferError(f"{what}: the .tflite flatbuffer is corrupt or truncated ({exc}).") from exc
    if not model.subgraphs:
        raise FlatbufferError(f"{what}: the .tflite file has no subgraph.")
    return model


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
