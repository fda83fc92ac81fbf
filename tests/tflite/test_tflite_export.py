"""End-to-end export: every target x every model shape, run on the real interpreters and compared with int8."""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os

import numpy as np
import pytest
import tflite_models as tm

from ptq_keras import tflite as ptq_tflite
from ptq_keras.tflite import encoders, flatbuffer

convert_mod = importlib.import_module("ptq_keras.tflite.convert")

S = flatbuffer.schema
TARGETS = ("int8", "micro", "litert", "int4")
MODELS = tuple(tm.BUILDERS)
GOLDEN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "tflite_mlp_tensors.json")
CALIBRATION, CHECK = 32, 48


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each test model exported once to every target (Dense kernels with one scale per tensor, so that
    target int4 applies), with its verification inputs."""
    cache = {}

    def get(name: str):
        if name not in cache:
            model = tm.build(name, dense="tensor")
            x = tm.inputs(model, CALIBRATION + CHECK)
            out = tmp_path_factory.mktemp(name)
            result = ptq_tflite.export(model, x[:CALIBRATION], out, targets=TARGETS, measure=False)
            cache[name] = (model, x[CALIBRATION:], result)
        return cache[name]

    return get


def _weight_ops(model):
    graph = model.subgraphs[0]
    producers = {int(o): op for op in graph.operators for o in op.outputs}
    for op in graph.operators:
        if flatbuffer.builtin_name(model, op.opcodeIndex) in convert_mod.WEIGHT_OPS:
            yield graph, op, producers


# ----------------------------------------------------------------------------- the matrix
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", MODELS)
def test_export_matches_int8_on_each_runtime(exported, name, target):
    model, x, result = exported(name)
    report = ptq_tflite.verify(model, result.files[target], x)
    assert report.ok, str(report)
    keras_rung, *rungs = report.steps
    assert (keras_rung.reference, keras_rung.candidate) == ("keras", "int8")
    expected = {
        "int8": {"litert_ref/tflm"},
        "micro": {"tflm"},
        "litert": {"litert", "litert_ref"},
        "int4": {"litert", "litert_ref", "tflm"},
    }[target]
    assert {step.runtime for step in rungs if step.reference in ("int8", "litert")} == expected
    if target == "micro":
        assert all(step.max_lsb == 0 for step in rungs)
    twins = {step.runtime: step.max_lsb for step in rungs if step.reference == "twin"}
    if target in ("litert", "int4"):
        assert set(twins) == expected
        assert all(lsb == 0 for runtime, lsb in twins.items() if runtime != "litert")  # packing is bit-exact
    else:
        assert not twins


@pytest.mark.parametrize("target", ["int8", "litert", "int4", "micro"])
@pytest.mark.parametrize("name", MODELS)
def test_bias_scale_is_input_scale_times_weight_scale(exported, name, target):
    """On the micro target the bias quantization is trimmed (TFLM never reads it; bit-exactness vs int8 holds)."""
    _, _, result = exported(name)
    model = flatbuffer.read(open(result.files[target], "rb").read())
    checked = 0
    for graph, op, _ in _weight_ops(model):
        x, w, b = (graph.tensors[int(i)] for i in op.inputs[:3])
        if target == "micro":
            assert b.quantization is None and len(w.quantization.zeroPoint) == 1
            assert len(w.quantization.scale) == w.shape[w.quantization.quantizedDimension]
            checked += 1
            continue
        w_scale = np.asarray(w.quantization.scale, np.float64)
        b_scale = np.asarray(b.quantization.scale, np.float64)
        assert len(b_scale) == len(w_scale)
        np.testing.assert_allclose(b_scale, x.quantization.scale[0] * w_scale, rtol=1e-6)
        checked += 1
    assert checked >= 2


@pytest.mark.parametrize("name", MODELS)
def test_packed_weights_stay_ternary_with_the_int8_zeros(exported, name):
    _, _, result = exported(name)
    int8 = flatbuffer.read(open(result.files["int8"], "rb").read())
    int8_weights = {
        graph.tensors[int(op.inputs[1])].name: flatbuffer.buffer_array(int8, graph.tensors[int(op.inputs[1])])
        for graph, op, _ in _weight_ops(int8)
    }
    for target, types in (("litert", {"FULLY_CONNECTED": 19}), ("int4", {"FULLY_CONNECTED": 17})):
        packed = flatbuffer.read(open(result.files[target], "rb").read())
        for graph, op, _ in _weight_ops(packed):
            op_name = flatbuffer.builtin_name(packed, op.opcodeIndex)
            w = graph.tensors[int(op.inputs[1])]
            assert w.type == types.get(op_name, 17), (target, op_name)
            bits, level = (2, 1) if w.type == 19 else (4, 7)
            reference = int8_weights[w.name]
            values = convert_mod.unpack_signed(packed.buffers[w.buffer].data, bits, reference.size)
            np.testing.assert_array_equal(values, np.sign(reference).reshape(-1) * level)
            if target == "int4" and op_name == "FULLY_CONNECTED":
                assert len(w.quantization.scale) == 1


def test_buffers_are_16_byte_aligned(exported):
    _, _, result = exported("cnn")
    for target in TARGETS:
        buf = open(result.files[target], "rb").read()
        root = S.Model.GetRootAs(buf, 0)
        base = np.frombuffer(buf, dtype=np.uint8).ctypes.data
        for i in range(root.BuffersLength()):
            data = root.Buffers(i).DataAsNumpy()
            if isinstance(data, np.ndarray) and data.size:
                assert (data.ctypes.data - base) % 16 == 0, (target, i)


def test_micro_file_has_per_channel_tables_and_no_stale_quantization(exported):
    _, _, result = exported("cnn")
    model = flatbuffer.read(open(result.files["micro"], "rb").read())
    graph = model.subgraphs[0]
    decodes = [op for op in graph.operators if flatbuffer.builtin_name(model, op.opcodeIndex) == "TFLM_DECODE"]
    assert len(decodes) == 3
    for op in decodes:
        encoded, ancillary = graph.tensors[op.inputs[0]], graph.tensors[op.inputs[1]]
        decoded = graph.tensors[op.outputs[0]]
        assert encoded.quantization is None or not encoded.quantization.scale
        header = flatbuffer.buffer_array(model, ancillary)
        channels = len(decoded.quantization.scale)
        assert header[0] == 0 and header[5] & 0x0F == 2  # LUT, 2-bit index
        assert (header[5] >> 4) != 15 or channels == 1  # one table per channel


def test_single_lut_table_on_per_channel_weights_decodes_wrong_outputs(exported):
    """The documented TFLM trap at model level: one table for a per-channel tensor runs but gives wrong
    outputs; the exporter's per-channel tables are bit-exact."""
    _, x, result = exported("cnn")
    int8_buf = open(result.files["int8"], "rb").read()
    micro_buf = open(result.files["micro"], "rb").read()
    int8 = flatbuffer.read(int8_buf)
    weight_ops = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
    originals = [flatbuffer.buffer_array(int8, int8.subgraphs[0].tensors[op.inputs[1]])
                 for op in int8.subgraphs[0].operators if flatbuffer.builtin_name(int8, op.opcodeIndex) in weight_ops]
    model = flatbuffer.read(micro_buf)
    graph = model.subgraphs[0]
    decodes = [op for op in graph.operators if flatbuffer.builtin_name(model, op.opcodeIndex) == "TFLM_DECODE"]
    assert len(decodes) == len(originals)  # one per weight op, in the same order (the micro file has no names)
    for op, original in zip(decodes, originals):
        encoded, ancillary = graph.tensors[op.inputs[0]], graph.tensors[op.inputs[1]]
        single = encoders.get("lut").encode(original, encoders.ChannelLayout())
        for tensor, data in ((encoded, single.data), (ancillary, single.ancillary)):
            buffer = S.BufferT()
            buffer.data = np.frombuffer(data, dtype=np.uint8)
            model.buffers[tensor.buffer] = buffer
            tensor.shape = np.array([len(data)], dtype=np.int32)
    trapped = flatbuffer.write(model)
    reference = ptq_tflite.predict(int8_buf, x, "tflm")
    assert np.array_equal(ptq_tflite.predict(micro_buf, x, "tflm"), reference)
    assert not np.array_equal(ptq_tflite.predict(trapped, x, "tflm"), reference)


# ----------------------------------------------------------------------------- per-channel Dense, names, golden
def test_per_channel_dense_packs_for_micro_and_litert_but_not_int4(tmp_path):
    model = tm.build("mlp", dense="channel")
    x = tm.inputs(model, 64)
    for target in ("micro", "litert"):
        path = tmp_path / f"mlp_{target}.tflite"
        path.write_bytes(ptq_tflite.convert(model, x[:32], target=target))
        report = ptq_tflite.verify(model, path, x[32:], int8=ptq_tflite.convert(model, x[:32]))
        assert report.ok, str(report)
    with pytest.raises(ptq_tflite.ExportError, match=r"layer 'fc1'.*granularity='tensor'"):
        ptq_tflite.convert(model, x[:32], target="int4")


def test_strip_names_drops_names_and_signatures_and_still_runs(exported):
    model, x, result = exported("residual")
    for target, runtime in (("micro", "tflm"), ("litert", "litert_ref")):
        full = open(result.files[target], "rb").read()
        stripped = convert_mod.strip_names(full)
        assert len(stripped) < len(full) if target == "litert" else stripped == full  # micro: no names to drop
        parsed = flatbuffer.read(stripped)
        assert not parsed.signatureDefs and not parsed.metadata
        assert all(not t.name for t in parsed.subgraphs[0].tensors)
        np.testing.assert_array_equal(ptq_tflite.predict(stripped, x, runtime), ptq_tflite.predict(full, x, runtime))
    direct = ptq_tflite.convert(model, tm.inputs(model, CALIBRATION + CHECK)[:CALIBRATION], target="litert",
                                strip_names=True)
    assert direct == convert_mod.strip_names(open(result.files["litert"], "rb").read())


def _table(buf: bytes) -> dict:
    table = ptq_tflite.inspect(buf).to_dict()
    table.pop("file")
    return table


def test_tensor_table_matches_golden():
    """Converter drift: the tensor table (names, types, shapes, bytes, channels) of a fixed tiny model."""
    model = tm.build("mlp", dense="channel")
    x = tm.inputs(model, 16)
    tables = {target: _table(ptq_tflite.convert(model, x, target=target)) for target in ("int8", "litert")}
    tf_minor = ".".join(importlib.metadata.version("tensorflow").split(".")[:2])
    if os.environ.get("PTQ_UPDATE_GOLDEN"):
        flatbuffer.atomic_write(GOLDEN, json.dumps({**tables, "tensorflow": tf_minor}, indent=1) + "\n")
    with open(GOLDEN) as f:
        golden = json.load(f)
    same_converter = golden.get("tensorflow", "2.21") == tf_minor
    for target in tables:
        assert _comparable(tables[target], same_converter) == _comparable(golden[target], same_converter), (
            f"{target} tensor table changed (PTQ_UPDATE_GOLDEN=1 to accept)"
        )


def _comparable(table: dict, same_converter: bool) -> dict:
    """All of ``table`` under the TensorFlow that wrote the golden file; under another version the converter names
    tensors differently and writes other metadata, so names and those bytes (names, metadata, structure, file size)
    are left out."""
    if same_converter:
        return table
    tensors = [{k: v for k, v in t.items() if k != "name"} for t in table["tensors"]]
    parts = {k: v for k, v in table["parts"].items() if k not in ("names", "metadata", "structure", "file_bytes")}
    return {"ops": table["ops"], "tensors": tensors, "parts": parts}


# ----------------------------------------------------------------------------- export files and report
def test_export_writes_report_and_files_atomically(exported):
    _, _, result = exported("depthwise")
    out = result.out_dir
    names = sorted(os.listdir(out))
    assert not [n for n in names if n.startswith(".tmp")]
    assert names == sorted(f"model_{t}.tflite" for t in TARGETS) + ["model_report.json"]
    report = json.loads(open(result.files["report"]).read())
    assert set(report["targets"]) == set(TARGETS)
    for target, row in report["targets"].items():
        assert row["file_bytes"] == os.path.getsize(result.files[target])
        assert row["ratio_fp32_tflite"] == pytest.approx(report["fp32_tflite_bytes"] / row["file_bytes"])
    bits = {t: report["targets"][t]["bits_per_weight"] for t in TARGETS}
    assert bits["int8"] == 8 and bits["int4"] == 4
    assert report["targets"]["litert"]["weight_types"] == ["INT2", "INT4"]
    assert [r["encoding"] for r in report["targets"]["micro"]["encodings"]] == ["lut"] * 4
    assert "micro" in result.summary() and "bits/w" in result.summary()
