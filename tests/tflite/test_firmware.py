"""The generated firmware project: its op resolver, its files, the export/CLI hooks and, marked slow, the firmware
built for Cortex-M4 and run under QEMU, bit-exact against the TFLM Python interpreter."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tflite_models as tm

from ptq_keras import tflite as ptq_tflite
from ptq_keras.tflite import firmware, firmware_build, flatbuffer, micro

INT8_OPS = {"CONV_2D", "MAX_POOL_2D", "AVERAGE_POOL_2D", "RESHAPE", "FULLY_CONNECTED"}


@pytest.fixture(scope="module")
def cnn_files():
    """The tiny CNN as int8, micro (LUT) and micro (huffman_group) files, and inputs for it."""
    model = tm.build("cnn")
    x = tm.inputs(model, 120)
    files = {
        "int8": ptq_tflite.convert(model, x[:32], target="int8"),
        "lut": ptq_tflite.convert(model, x[:32], target="micro", encoding="lut"),
        "huffman_group": ptq_tflite.convert(model, x[:32], target="micro", encoding="huffman_group"),
    }
    return files, x


def _registered(header: str) -> list[str]:
    """The Add methods the generated header calls, in order."""
    return re.findall(r"resolver\.(Add\w+)\(\)", header)


def _resolver_size(header: str) -> int:
    return int(re.search(r"_op_count = (\d+);", header).group(1))


def _ops_in_file(buf: bytes) -> set[str]:
    model = flatbuffer.read(buf)
    return {flatbuffer.builtin_name(model, op.opcodeIndex) for g in model.subgraphs for op in g.operators}


@pytest.mark.parametrize(
    "name, expected",
    [
        ("int8", INT8_OPS),
        ("lut", INT8_OPS | {"TFLM_DECODE"}),
        ("huffman_group", INT8_OPS | {"TFLM_DECODE", "CAST", "GATHER", "SLICE"}),
    ],
)
def test_resolver_registers_exactly_the_models_ops(cnn_files, name, expected):
    buf = cnn_files[0][name]
    assert _ops_in_file(buf) == expected
    header = firmware.ops_header(buf, "cnn_data")
    methods = _registered(header)
    assert len(methods) == len(set(methods)) == _resolver_size(header) == len(expected)
    assert set(methods) == {firmware.ADD_METHODS[op] for op in expected}
    assert ("AddDecode" in methods) == (name != "int8")
    assert "tflite::MicroMutableOpResolver<cnn_data_op_count>" in header
    assert "inline TfLiteStatus cnn_data_register_ops(cnn_data_op_resolver& resolver)" in header


def test_own_kernels_replace_tflms_only_where_every_op_of_their_kind_qualifies(cnn_files, tmp_path):
    files, x = cnn_files
    assert firmware.ptq_kernel_ops(files["int8"]) == {}
    assert firmware.ptq_kernel_ops(files["lut"]) == {"TFLM_DECODE": ""}
    assert "decode type 1" in firmware.ptq_kernel_ops(files["huffman_group"])["TFLM_DECODE"]
    lut = firmware.ops_header(files["lut"], ptq_kernels=True)
    assert "AddDecode" not in _registered(lut) and 'AddCustom("TFLM_DECODE", &decode)' in lut
    assert '#include "ptq_kernels.h"' in lut and _resolver_size(lut) == len(INT8_OPS) + 1
    assert "AddDecode" in _registered(firmware.ops_header(files["lut"]))  # TFLM's kernels unless asked
    huffman = firmware.firmware(files["huffman_group"], tmp_path / "h", inputs=x[:2], arena_bytes=9000)
    assert huffman.ptq_ops == [] and "ptq_kernels.cc" not in huffman.files
    assert "AddDecode" in _registered((tmp_path / "h" / "model_ops.h").read_text())
    tflm = firmware.firmware(files["lut"], tmp_path / "t", inputs=x[:2], arena_bytes=9000, ptq_kernels=False)
    assert tflm.ptq_ops == [] and "ptq_kernels.cc" not in tflm.files
    with pytest.raises(ValueError, match="ptq_kernels must be True or False"):
        firmware.firmware(files["lut"], tmp_path / "x", arena_bytes=9000, ptq_kernels="yes")


def test_split_files_concatenate_with_the_own_kernel_unless_quantizations_differ(tmp_path):
    model = tm.build("mlp")
    x = tm.inputs(model, 20)
    buf = ptq_tflite.convert(model, x, target="micro", max_decode_bytes=64)
    assert firmware.ptq_kernel_ops(buf) == {"TFLM_DECODE": "", "CONCATENATION": ""}
    header = firmware.ops_header(buf, ptq_kernels=True)
    assert "AddConcatenation(ptq_keras::Register_INT8_CONCATENATION())" in header
    parsed = flatbuffer.read(buf)
    graph = parsed.subgraphs[0]
    concat = next(op for op in graph.operators if flatbuffer.builtin_name(parsed, op.opcodeIndex) == "CONCATENATION")
    quantization = graph.tensors[int(concat.inputs[0])].quantization
    quantization.scale = np.asarray(quantization.scale) * 2  # TFLM would requantize: not a byte copy
    changed = flatbuffer.write(parsed)
    assert "quantization" in firmware.ptq_kernel_ops(changed)["CONCATENATION"]
    assert "AddConcatenation()" in firmware.ops_header(changed, ptq_kernels=True)


def _with_op(buf: bytes, old: str, new: int) -> bytes:
    model = flatbuffer.read(buf)
    for code in model.operatorCodes:
        if flatbuffer.builtin_name(model, model.operatorCodes.index(code)) == old:
            code.builtinCode = new
            code.deprecatedBuiltinCode = min(new, 127)
    return flatbuffer.write(model)


def test_an_op_tflm_cannot_register_is_a_clear_error_before_anything_is_written(cnn_files, tmp_path):
    buf = _with_op(cnn_files[0]["int8"], "AVERAGE_POOL_2D", flatbuffer.schema.BuiltinOperator.DENSIFY)
    with pytest.raises(ValueError, match=r"\['DENSIFY'\].*cannot register"):
        firmware.ops_header(buf)
    with pytest.raises(ValueError, match="DENSIFY"):
        firmware.firmware(buf, tmp_path / "fw", arena_bytes=4096)
    assert list(tmp_path.iterdir()) == []


def test_project_holds_the_model_its_ops_and_the_inputs(cnn_files, tmp_path):
    files, x = cnn_files
    project = firmware.firmware(files["lut"], tmp_path / "fw", inputs=x[:100], arena_bytes=8000)
    out = tmp_path / "fw"
    names = {
        "model_data.cc", "model_data.h", "model_ops.h", "test_inputs.cc", "test_inputs.h", "main.cc", "startup.c",
        "link_cortex-m4.ld", "link_cortex-m55.ld", "Makefile", "README.md", "ptq_kernels.cc", "ptq_kernels.h",
    }  # fmt: skip
    assert {p.name for p in out.iterdir()} == names == set(project.files)
    assert project.inputs == 100 and project.arena_bytes == 8000 and project.ptq_ops == ["TFLM_DECODE"]
    assert "constexpr size_t model_data_arena_size = 8000;" in (out / "model_data.h").read_text()
    assert (out / "model_ops.h").read_text() == firmware.ops_header(files["lut"], ptq_kernels=True)
    assert "ptq_kernels.cc" in (out / "Makefile").read_text() and "ptq_kernels.cc" in (out / "README.md").read_text()
    # the embedded inputs are the float inputs quantized with the input tensor's scale and zero point
    source = (out / "test_inputs.cc").read_text()
    body = source.split("input_0[] = {", 1)[1].split("};", 1)[0]
    embedded = np.array([int(v) for v in body.replace("\n", "").split(",") if v.strip()], np.uint8)
    detail = micro.interpreter(files["lut"]).get_input_details(0)
    scale, zero = detail["quantization_parameters"]["scales"][0], detail["quantization_parameters"]["zero_points"][0]
    expected = np.clip(np.round(x[:100] / scale) + zero, -128, 127).astype(np.int8).reshape(100, -1)
    np.testing.assert_array_equal(embedded.view(np.int8).reshape(100, -1), expected)
    assert "constexpr size_t test_input_count = 100;" in (out / "test_inputs.h").read_text()
    assert "ORIGIN = 0x20000000" in (out / "link_cortex-m55.ld").read_text()
    assert "mps3-an547" in (out / "Makefile").read_text()


def test_project_is_replaced_whole_or_not_at_all(cnn_files, tmp_path, monkeypatch):
    files, x = cnn_files
    out = tmp_path / "fw"
    firmware.firmware(files["int8"], out, inputs=x[:3], arena_bytes=8000)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_open = open

    def failing_open(path, *args, **kwargs):
        if str(path).endswith("main.cc"):
            raise OSError("disk full")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", failing_open)
    with pytest.raises(OSError, match="disk full"):
        firmware.firmware(files["lut"], out, inputs=x[:5], arena_bytes=9000)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fw"]  # no temporary folder left behind
    firmware.firmware(files["lut"], out, inputs=x[:5], arena_bytes=9000)
    assert "Register_LUT_DECODE" in (out / "model_ops.h").read_text()
    assert "test_input_count = 5;" in (out / "test_inputs.h").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fw"]


def test_inputs_that_do_not_fit_the_model_are_refused(cnn_files, tmp_path):
    buf = cnn_files[0]["int8"]
    with pytest.raises(ValueError, match=r"shape \[n, 12, 12, 1\]"):
        firmware.firmware(buf, tmp_path / "fw", inputs=np.zeros((4, 10, 10, 1), np.float32), arena_bytes=4096)
    with pytest.raises(ValueError, match="the tensor is int8, the array int32"):
        firmware.input_bytes(buf, np.zeros((4, 12, 12, 1), np.int32))
    with pytest.raises(ValueError, match="core 'cortex-m0'"):
        firmware.firmware(buf, tmp_path / "fw", core="cortex-m0", arena_bytes=4096)
    assert not (tmp_path / "fw").exists()


def test_parse_output_reads_back_the_programs_lines():
    text = (
        "calibration 2000000 50000\nticks 0 1000\noutput 0 0 0aff\nticks 1 1010\noutput 1 0 80\n"
        "op CONV_2D 2 1500\nop TFLM_DECODE 2 300\narena_used 4000\narena_size 8000\ndone\n"
    )
    run = firmware.parse_output(text)
    assert run.done and not run.errors
    assert run.instructions_per_tick == 40.0 and run.instructions() == [40000.0, 40400.0]
    assert run.outputs[(0, 0)] == b"\x0a\xff" and run.outputs[(1, 0)] == b"\x80"
    assert run.ops["TFLM_DECODE"] == (2, 300) and run.arena_used == 4000
    assert not firmware.parse_output("error Invoke failed on input 3\n").done


def test_export_writes_the_firmware_project_of_the_first_tflm_target(tmp_path):
    model = tm.build("mlp")
    x = tm.inputs(model, 40)
    result = ptq_tflite.export(model, x, tmp_path, targets=("int8", "micro"), firmware=True, measure=False)
    project = tmp_path / "model_firmware"
    assert result.files["firmware"] == str(project)
    header = (project / "model_ops.h").read_text()
    assert set(_registered(header)) == {"AddFullyConnected"} and "Register_LUT_DECODE" in header
    assert (project / "model_data.cc").read_text() == micro.c_array(
        open(result.files["micro"], "rb").read(), "model_data", arena_bytes=1
    )[0]
    assert "test_input_count = 40;" in (project / "test_inputs.h").read_text()
    with pytest.raises(ValueError, match="firmware=True needs a TFLM target"):
        ptq_tflite.export(model, x, tmp_path / "x", targets=("litert",), firmware=True, measure=False)


def test_cli_firmware_flag_writes_the_project(tmp_path):
    model = tm.build("mlp")
    model.save(tmp_path / "mlp.h5")
    np.save(tmp_path / "samples.npy", tm.inputs(model, 30))
    command = [
        sys.executable, "-m", "ptq_keras.tflite.cli", "--model", "mlp.h5", "--data", "samples.npy",
        "--targets", "int8", "--out_dir", "out", "--firmware", "--num_samples", "20", "--verify_samples", "0",
        "--nomeasure",
    ]  # fmt: skip
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    header = (tmp_path / "out" / "model_firmware" / "model_ops.h").read_text()
    assert _registered(header) == ["AddFullyConnected"]
    assert "wrote firmware: out/model_firmware" in run.stdout


def _library_or_skip(core: str, kernels: str):
    try:
        firmware_build.check_toolchain()
        root = firmware_build.tflm_root(log=lambda line: None)
    except (firmware_build.ToolchainMissing, FileNotFoundError) as exc:
        pytest.skip(f"firmware on QEMU needs the ARM toolchain, qemu and a TFLM tree: {exc}")
    return firmware_build.build_library(core, kernels, root, log=lambda line: None)


@pytest.mark.slow
def test_firmware_on_emulated_cortex_m4_matches_the_python_interpreter_byte_for_byte(cnn_files, tmp_path):
    files, x = cnn_files
    buf = files["lut"]
    lib = _library_or_skip("cortex-m4", os.environ.get("PTQ_FIRMWARE_KERNELS", "cmsis_nn"))
    firmware.firmware(buf, tmp_path / "fw", inputs=x[:100])
    built = firmware_build.make_firmware(tmp_path / "fw", lib)
    assert built.flash > 0 and built.test_inputs >= 100 * 144
    parts = built.flash_parts
    assert sum(parts.values()) == built.flash and parts["model"] == len(buf)
    assert parts["kernels"] > 1000 and parts["runtime"] > 10_000 and 0 < parts["other"] < built.flash
    assert built.arena == micro.measure_arena(buf) + firmware.ARENA_MARGIN and built.arena < built.ram
    run = firmware.parse_output(firmware_build.run_firmware(tmp_path / "fw", lib, timeout=900))
    assert run.done and not run.errors and len(run.ticks) == 100
    expected = firmware.reference_outputs(buf, x[:100])
    got = run.output_array(0)
    assert got.shape == expected[0].shape == (100, 6)
    assert len({bytes(row) for row in got}) > 10  # real, varied outputs
    np.testing.assert_array_equal(got, expected[0])
    assert 0 < run.arena_used <= run.arena_size
    assert run.ops["TFLM_DECODE"][0] == 100 * 3  # three weight tensors decoded per inference
    assert 20 < run.instructions_per_tick < 60 and min(run.instructions()) > 10_000


def _uneven_lut(int8: bytes, levels: int = 5, index_bits: int = 3) -> bytes:
    """``int8`` with every weight tensor redrawn so that each output channel holds ``levels`` values of its own
    (the channels' tables differ), LUT-encoded with ``index_bits``-bit indices: per-channel value tables with a
    stride, on both channel axes (the depthwise kernel's is the last), through the kernel's generic path."""
    from ptq_keras.tflite import decode, encoders

    parsed = flatbuffer.read(int8)
    graph = parsed.subgraphs[0]
    rng = np.random.default_rng(0)
    for op in graph.operators:
        if flatbuffer.builtin_name(parsed, op.opcodeIndex) not in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
            continue
        tensor = graph.tensors[int(op.inputs[1])]
        axis = tensor.quantization.quantizedDimension
        values = np.moveaxis(flatbuffer.buffer_array(parsed, tensor).copy(), axis, 0)
        for channel in values:
            table = rng.choice(np.arange(-127, 128), size=levels, replace=False)
            channel[...] = rng.choice(table, size=channel.shape)
        data = np.moveaxis(values, 0, axis).astype(np.int8).tobytes()
        parsed.buffers[tensor.buffer].data = np.frombuffer(data, np.uint8)
    model = flatbuffer.read(flatbuffer.write(parsed))
    saved = encoders.ENCODERS["lut"]
    encoders.ENCODERS["lut"] = encoders.LutEncoder(index_bits)
    try:
        decode.compress_model(model, encoding="lut")
    finally:
        encoders.ENCODERS["lut"] = saved
    return flatbuffer.write(model)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["ternary_depthwise", "uneven_3bit_depthwise", "split_mlp"])
def test_own_kernels_on_emulated_cortex_m4_match_tflms_python_interpreter(case, tmp_path):
    """ptq_kernels.cc against TFLM's own DECODE and CONCATENATION (the Python interpreter runs TFLM's kernels):
    shared ternary tables with the last channel axis, per-channel 3-bit tables on both axes, and a split file."""
    name = "mlp" if case == "split_mlp" else "depthwise"
    model = tm.build(name)
    x = tm.inputs(model, 100)
    if case == "split_mlp":
        buf = ptq_tflite.convert(model, x[:32], target="micro", max_decode_bytes=64)
    elif case == "ternary_depthwise":
        buf = ptq_tflite.convert(model, x[:32], target="micro", encoding="lut")
    else:
        buf = _uneven_lut(ptq_tflite.convert(model, x[:32], target="int8"))
        strides = {d["ancillary"][6] for d in _ancillaries(buf)}
        assert 0 not in strides and all(d["ancillary"][5] & 7 == 3 for d in _ancillaries(buf))
    lib = _library_or_skip("cortex-m4", os.environ.get("PTQ_FIRMWARE_KERNELS", "cmsis_nn"))
    project = firmware.firmware(buf, tmp_path / "fw", inputs=x)
    assert project.ptq_ops == (["TFLM_DECODE", "CONCATENATION"] if case == "split_mlp" else ["TFLM_DECODE"])
    firmware_build.make_firmware(tmp_path / "fw", lib)
    run = firmware.parse_output(firmware_build.run_firmware(tmp_path / "fw", lib, timeout=900))
    assert run.done and not run.errors and len(run.ticks) == 100
    expected = firmware.reference_outputs(buf, x)
    got = run.output_array(0)
    assert len({bytes(row) for row in got}) > 10
    np.testing.assert_array_equal(got, expected[0])


def _ancillaries(buf: bytes) -> list[dict]:
    parsed = flatbuffer.read(buf)
    graph = parsed.subgraphs[0]
    found = []
    for op in graph.operators:
        if flatbuffer.builtin_name(parsed, op.opcodeIndex) == "TFLM_DECODE":
            for k in range(0, len(op.inputs), 2):
                data = flatbuffer.buffer_array(parsed, graph.tensors[int(op.inputs[k + 1])])
                found.append({"ancillary": bytes(np.asarray(data, np.uint8).reshape(-1))})
    return found
