"""Real exported .tflite files of every target and encoding, byte-level mutations of them, and the readers that
must turn any damage into ``FlatbufferError`` (shared by ``tests/tflite/test_fuzz.py`` and ``tests/fuzz.py``)."""

from __future__ import annotations

import numpy as np
import tflite_models as tm

from ptq_keras import tflite as ptq_tflite
from ptq_keras.tflite import decode, flatbuffer

# (model, dense granularity, target, encoding): every target, every micro encoding, conv + depthwise + dense.
SOURCES = (
    ("cnn", "channel", "int8", "lut"),
    ("cnn", "channel", "micro", "lut"),
    ("cnn", "channel", "micro", "huffman"),
    ("depthwise", "channel", "micro", "prune"),
    ("residual", "channel", "micro", "auto"),
    ("cnn", "channel", "litert", "lut"),
    ("mlp", "tensor", "int4", "lut"),
)


def exported_files() -> list[tuple[str, bytes]]:
    """(label, bytes) of one exported file per source."""
    files, models = [], {}
    for name, dense, target, encoding in SOURCES:
        model = models.setdefault((name, dense), tm.build(name, dense=dense))
        buf = ptq_tflite.convert(model, tm.inputs(model, 16), target=target, encoding=encoding)
        files.append((f"{name}/{target}/{encoding}", buf))
    return files


def mutate(buf: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    """Apply ``edits``: (kind, position, value) with kind 0 = overwrite a byte, 1 = flip a bit, 2 = cut the file
    short at the position, 3 = overwrite a little-endian int32 (offsets, lengths, indices) with ``value``."""
    data = bytearray(buf)
    for kind, position, value in edits:
        if not data:
            break
        at = position % len(data)
        if kind == 0:
            data[at] = value & 0xFF
        elif kind == 1:
            data[at] ^= 1 << (value % 8)
        elif kind == 2:
            del data[at:]
        else:
            word = int(value).to_bytes(8, "little", signed=True)[:4]
            data[at : at + 4] = word[: len(data) - at]
    return bytes(data)


def read_all(buf: bytes) -> None:
    """Every reader of .tflite bytes that runs before a runtime sees the file: ``FlatbufferError`` or success."""
    flatbuffer.load(buf, "fuzzed")
    ptq_tflite.inspect(buf)
    decode.describe(buf)


def random_edits(rng: np.random.Generator, size: int) -> list[tuple[int, int, int]]:
    count = int(rng.integers(1, 6))
    values = (0, 1, -1, 0x7FFFFFFF, -0x80000000, int(rng.integers(-(2**31), 2**31)), int(rng.integers(0, 256)))
    return [
        (int(rng.integers(0, 4)), int(rng.integers(0, size)), values[int(rng.integers(0, len(values)))])
        for _ in range(count)
    ]
