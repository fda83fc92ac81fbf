"""The slim ``micro`` file: each slimming step keeps it bit-exact with ``int8`` on TFLM, names can be kept for
debugging, models whose value tables differ still export correctly, and the byte accounting adds up."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import tflite_models as tm
from decode_support import run_tflm

from ptq_keras import tflite as ptq_tflite
from ptq_keras.tflite import decode, flatbuffer, slim

convert_mod = importlib.import_module("ptq_keras.tflite.convert")
S = flatbuffer.schema
CALIBRATION, CHECK = 32, 24


def _outputs(buf: bytes, x: np.ndarray) -> np.ndarray:
    return ptq_tflite.predict(buf, x, "tflm")


@pytest.fixture(scope="module")
def residual():
    """A residual depthwise test model (conv, depthwise, add, pooling, per-channel dense), its int8 file, the
    micro file as the exporter wrote it before slimming (names, one buffer per tensor, stock writer), and inputs."""
    model = tm.build("residual")
    x = tm.inputs(model, CALIBRATION + CHECK)
    int8 = ptq_tflite.convert(model, x[:CALIBRATION], target="int8")
    parsed = flatbuffer.read(decode.compress(int8, encoding="lut"))
    convert_mod.trim_model(parsed)
    return model, x[CALIBRATION:], int8, parsed, x[:CALIBRATION]


def test_each_slimming_step_keeps_the_file_bit_exact_and_smaller(residual):
    import copy

    _, x, int8, parsed, _ = residual
    reference = _outputs(int8, x)
    model = copy.deepcopy(parsed)
    sizes = [len(flatbuffer.write(model))]
    for step in ("names", "merge", "buffers"):
        if step == "names":
            for graph in model.subgraphs:
                for tensor in graph.tensors:
                    tensor.name = None
            model.signatureDefs = model.metadata = model.description = None
        elif step == "merge":
            slim._merge_constants(model)
        else:
            slim._renumber_buffers(model)
        buf = flatbuffer.write(model)
        np.testing.assert_array_equal(_outputs(buf, x), reference, err_msg=f"after step {step}")
        sizes.append(len(buf))
    shared = slim.write(model)
    np.testing.assert_array_equal(_outputs(shared, x), reference, err_msg="the sharing writer")
    sizes.append(len(shared))
    assert all(b < a for a, b in zip(sizes, sizes[1:])), sizes
    # every constant tensor's data starts on a 16-byte boundary of the file, as TFLM requires
    root = S.Model.GetRootAs(shared, 0)
    for i in range(root.BuffersLength()):
        table = root.Buffers(i)
        if table.DataLength():
            assert table._tab.Vector(table._tab.Offset(4)) % 16 == 0


def test_one_value_table_for_every_ternary_layer(residual):
    model, x, int8, _, calibration = residual
    micro = ptq_tflite.convert(model, calibration, target="micro", encoding="lut")
    parsed = flatbuffer.read(micro)
    graph = parsed.subgraphs[0]
    decodes = [op for op in graph.operators if flatbuffer.builtin_name(parsed, op.opcodeIndex) == "TFLM_DECODE"]
    assert len(decodes) >= 3
    assert len({int(op.inputs[1]) for op in decodes}) == 1  # one ancillary tensor, one buffer, for all of them
    assert len({int(graph.tensors[int(op.inputs[1])].buffer) for op in decodes}) == 1
    assert not any(t.name for t in graph.tensors) and not parsed.metadata and not parsed.signatureDefs
    assert all(int(t.buffer) == 0 for t in graph.tensors if flatbuffer.buffer_array(parsed, t) is None)
    np.testing.assert_array_equal(_outputs(micro, x), _outputs(int8, x))


def test_keep_names_keeps_names_for_debugging_and_the_report_names_layers_either_way(residual, tmp_path):
    model, x, int8, _, calibration = residual
    named = ptq_tflite.convert(model, calibration, target="micro", keep_names=True)
    slim_file = ptq_tflite.convert(model, calibration, target="micro")
    parsed = flatbuffer.read(named)
    assert any(t.name for t in parsed.subgraphs[0].tensors) and parsed.signatureDefs
    assert len(named) > len(slim_file)
    np.testing.assert_array_equal(_outputs(named, x), _outputs(int8, x))
    with_names = [row["name"] for row in decode.describe(named)]
    result = ptq_tflite.export(model, calibration, tmp_path, targets=("micro",), measure=False)
    assert [row["name"] for row in result.report.targets["micro"].encodings] == with_names
    assert all(with_names)
    assert "micro: bytes: weights" in result.report.summary()


@pytest.mark.parametrize("case", ["per-tensor dense", "twn"])
def test_models_whose_value_tables_differ_export_bit_exact(case):
    import ptq_keras

    if case == "per-tensor dense":  # one scale for the Dense kernel: its int8 values differ from channel to channel
        model = tm.build("cnn", dense="tensor")
    else:
        model = ptq_keras.strip(ptq_keras.ternarize(tm.cnn(0), sparsity=0.7, threshold="twn"))
    x = tm.inputs(model, CALIBRATION + CHECK)
    calibration, check = x[:CALIBRATION], x[CALIBRATION:]
    if case == "per-tensor dense":
        int8 = convert_mod.int8_tflite(convert_mod.plain_model(model), calibration, per_tensor_dense=True)
        files = {e: slim.slim(decode.compress(int8, encoding=e)) for e in ("huffman", "prune", "auto")}
        parsed = flatbuffer.read(files["huffman"])
        graph = parsed.subgraphs[0]
        tables = {flatbuffer.buffer_array(parsed, graph.tensors[int(op.inputs[1])]).tobytes()
                  for op in graph.operators if flatbuffer.builtin_name(parsed, op.opcodeIndex) == "TFLM_DECODE"}
        assert len(tables) > 1  # different tables stay apart
    else:
        int8 = ptq_tflite.convert(model, calibration, target="int8")
        files = {e: ptq_tflite.convert(model, calibration, target="micro", encoding=e) for e in ("lut", "auto")}
    for encoding, micro in files.items():
        np.testing.assert_array_equal(_outputs(micro, check), _outputs(int8, check), err_msg=encoding)


def test_breakdown_adds_up_and_finds_the_names(residual):
    model, x, int8, _, calibration = residual
    named = ptq_tflite.convert(model, calibration, target="micro", keep_names=True)
    for buf in (int8, named, ptq_tflite.convert(model, calibration, target="micro")):
        parts = slim.breakdown(buf)
        assert sum(v for k, v in parts.items() if k != "file_bytes") == parts["file_bytes"] == len(buf)
        assert all(v >= 0 for v in parts.values())
        assert parts["weights"] > 0 and parts["scales"] > 0 and parts["structure"] > 0
    assert slim.breakdown(named)["names"] > 0 and slim.breakdown(int8)["metadata"] > 0
    slim_parts = slim.breakdown(ptq_tflite.convert(model, calibration, target="micro"))
    assert slim_parts["names"] == slim_parts["metadata"] == 0
    # the int8 file's weights are its weight ops' int8 kernels
    parsed = flatbuffer.read(int8)
    graph = parsed.subgraphs[0]
    weight_ops = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
    kernels = [graph.tensors[int(op.inputs[1])] for op in graph.operators
               if flatbuffer.builtin_name(parsed, op.opcodeIndex) in weight_ops]  # fmt: skip
    assert slim.breakdown(int8)["weights"] == sum(4 + flatbuffer.buffer_array(parsed, t).size for t in kernels)


def test_inspect_prints_where_the_bytes_go(residual):
    model, x, _, _, calibration = residual
    table = ptq_tflite.inspect(ptq_tflite.convert(model, calibration, target="micro"))
    assert table.parts["file_bytes"] == table.file_bytes
    assert "weights" in str(table) and "structure" in str(table)


def test_strip_names_slims_int8_and_litert_files_for_every_runtime(residual):
    model, x, int8, _, calibration = residual
    litert = ptq_tflite.convert(model, calibration, target="litert")
    for buf, runtimes in ((int8, ("tflm", "litert")), (litert, ("litert_ref",))):
        stripped = convert_mod.strip_names(buf)
        assert len(stripped) < len(buf)
        for runtime in runtimes:
            np.testing.assert_array_equal(ptq_tflite.predict(stripped, x, runtime), ptq_tflite.predict(buf, x, runtime))
    assert run_tflm(convert_mod.strip_names(int8), [np.zeros(_input_shape(int8), np.int8)])


def _input_shape(buf: bytes) -> list[int]:
    parsed = flatbuffer.read(buf)
    graph = parsed.subgraphs[0]
    return [int(d) for d in graph.tensors[int(graph.inputs[0])].shape]


def test_summary_estimates_the_parts_the_export_measures(residual):
    import ptq_keras

    model, x, _, _, calibration = residual
    estimate = ptq_keras.summary(model, print_fn=None).file_parts
    measured = slim.breakdown(ptq_tflite.convert(model, calibration, target="micro"))
    parsed = flatbuffer.read(ptq_tflite.convert(model, calibration, target="micro"))
    graph = parsed.subgraphs[0]
    kinds = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
    weight_ops = [op for op in graph.operators if flatbuffer.builtin_name(parsed, op.opcodeIndex) in kinds]
    assert measured["biases"] == estimate["biases"] + 4 * len(weight_ops)  # one int32 per channel + a length each
    assert estimate["weights"] <= measured["weights"] < 3 * estimate["weights"] + 1024
    assert estimate["scales"] <= measured["scales"]


def test_vela_compiles_the_stripped_int8_file_like_the_stock_one(residual):
    from ptq_keras.tflite import ethosu

    if not ethosu.available():
        pytest.skip("Arm's Vela is not installed (pip install 'ptq_keras[ethos-u]')")
    _, _, int8, _, _ = residual
    compiled, stock = ethosu.compile(int8)
    stripped = ethosu.compile(convert_mod.strip_names(int8))[1]
    parts = slim.breakdown(compiled)  # the NPU op's constants (command stream, encoded weights) count as weights
    assert parts["weights"] >= stock.encoded_weight_bytes and parts["structure"] < parts["weights"]
    assert (stripped.npu_ops, stripped.cpu_ops) == (stock.npu_ops, stock.cpu_ops) and stock.cpu_ops == 0
    assert stripped.encoded_weight_bytes == stock.encoded_weight_bytes
