"""Damaged .tflite files (hypothesis mutations of real exported files of every target and encoding): every
reader either parses them or raises ``FlatbufferError`` naming the problem; nothing else escapes."""

from __future__ import annotations

import fuzz_support
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ptq_keras import tflite as ptq_tflite
from ptq_keras.tflite import decode, flatbuffer

_FILES: list = []


@pytest.fixture(scope="module", autouse=True)
def files():
    _FILES[:] = fuzz_support.exported_files()
    yield _FILES


def test_the_sources_parse_and_cover_every_target_and_encoding(files):
    for _, buf in files:
        fuzz_support.read_all(buf)
    encodings = {row["encoding"] for _, buf in files for row in decode.describe(buf)}
    assert encodings == {"lut", "huffman", "prune"}
    assert {label.split("/")[1] for label, _ in files} == {"int8", "micro", "litert", "int4"}


edit = st.tuples(st.integers(0, 3), st.integers(0, 2**20), st.integers(-(2**31), 2**31 - 1))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(source=st.integers(0, len(fuzz_support.SOURCES) - 1), edits=st.lists(edit, min_size=1, max_size=5))
@example(source=0, edits=[(1, 11266, 1)])  # an operator that lost its outputs vector (the size breakdown)
def test_damaged_files_parse_or_raise_flatbuffer_error(source, edits):
    _, buf = _FILES[source]
    damaged = fuzz_support.mutate(buf, edits)
    try:
        fuzz_support.read_all(damaged)
    except flatbuffer.FlatbufferError as exc:
        assert "fuzzed" in str(exc) or "inspect" in str(exc) or "<bytes>" in str(exc) or "tflite" in str(exc)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: setattr(m.subgraphs[0].operators[0], "opcodeIndex", 99), r"operator 0's operator code is 99"),
        (lambda m: setattr(m.subgraphs[0].operators[0], "inputs", [500, *m.subgraphs[0].operators[0].inputs[1:]]),
         r"operator 0's input is 500"),
        (lambda m: setattr(m.subgraphs[0].tensors[0], "buffer", 10**6), r"tensor 0's buffer index"),
        (lambda m: setattr(m.subgraphs[0].tensors[0], "name", b"\xff\xfe"), r"tensor 0's name is not valid UTF-8"),
    ],
)
def test_structural_damage_is_named(files, edit, message):
    model = flatbuffer.read(files[0][1])
    edit(model)
    with pytest.raises(flatbuffer.FlatbufferError, match=message):
        ptq_tflite.inspect(flatbuffer.write(model, aligned=False))


def test_constant_data_that_does_not_match_its_shape_is_named(files):
    model = flatbuffer.read(files[0][1])
    graph = model.subgraphs[0]
    index, tensor = next((i, t) for i, t in enumerate(graph.tensors) if flatbuffer.buffer_array(model, t) is not None)
    model.buffers[tensor.buffer].data = model.buffers[tensor.buffer].data[:-1]
    with pytest.raises(flatbuffer.FlatbufferError, match=rf"tensor {index} .* needs \d+ bytes of data, its buffer"):
        flatbuffer.read(flatbuffer.write(model, aligned=False), "edited")


def test_inconsistent_ancillary_data_is_named(files):
    _, buf = next(f for f in files if f[0] == "cnn/micro/huffman")
    model = flatbuffer.read(buf)
    graph = model.subgraphs[0]
    decode_op = next(op for op in graph.operators if flatbuffer.builtin_name(model, op.opcodeIndex) == "TFLM_DECODE")
    ancillary = graph.tensors[int(decode_op.inputs[1])]
    data = bytearray(model.buffers[ancillary.buffer].data.tobytes())
    data[0] = 9  # an unknown decode type
    model.buffers[ancillary.buffer].data = bytes(data)
    with pytest.raises(flatbuffer.FlatbufferError, match=r"encoded tensor .*decode type 9"):
        decode.describe(flatbuffer.write(model, aligned=False))
