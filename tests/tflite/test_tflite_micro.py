"""TFLM artifacts: measured arena, C array for firmware (compiled with g++), the export report's measurements."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
import tflite_models as tm

from ptq_keras import tflite as ptq_tflite
from ptq_keras.tflite import decode, micro


@pytest.fixture(scope="module")
def firmware_export(tmp_path_factory):
    model = tm.build("cnn")
    x = tm.inputs(model, 32)
    out = tmp_path_factory.mktemp("firmware")
    return ptq_tflite.export(model, x, out, targets=("int8", "micro", "litert"), c_array=True)


def test_measured_arena_is_the_smallest_that_runs(firmware_export):
    buf = open(firmware_export.files["micro"], "rb").read()
    arena = firmware_export.report.targets["micro"].arena_bytes
    assert arena % 16 == 0
    assert micro.arena_fits(buf, arena)
    assert not micro.arena_fits(buf, arena - 16)


def _head(report: str) -> int:
    return int(re.search(r"Arena allocation head (\d+) bytes", report).group(1))


def test_decoded_weights_leave_the_arena_with_alt_decompression_memory():
    model = tm.build("mlp")  # weight-dominated: the decoded weights outweigh the activations
    buf = ptq_tflite.convert(model, tm.inputs(model, 16), target="micro")
    scratch = [row["decode_scratch_bytes"] for row in decode.describe(buf)]
    alt = sum(scratch) + 256
    assert _head(micro.allocation_report(buf)) - _head(micro.allocation_report(buf, alt)) >= max(scratch)
    assert micro.measure_arena(buf, alt) < micro.measure_arena(buf)


def test_c_array_compiles_and_holds_the_file(firmware_export, tmp_path):
    files = firmware_export.files
    source, header = open(files["c_source"]).read(), open(files["c_header"]).read()
    buf = open(files["micro"], "rb").read()
    assert "alignas(16) const unsigned char model_data[]" in source
    assert f"constexpr size_t model_data_len = {len(buf)};" in header
    arena = firmware_export.report.targets["micro"].arena_bytes
    assert f"constexpr size_t model_data_arena_size = {arena};" in header
    values = bytes(int(v, 16) for v in re.findall(r"0x([0-9a-f]{2})", source))
    assert values == buf
    if shutil.which("g++") is None:
        pytest.skip("g++ is not installed")
    shutil.copy(files["c_header"], tmp_path / "model_data.h")
    shutil.copy(files["c_source"], tmp_path / "model_data.cc")
    run = subprocess.run(["g++", "-std=c++17", "-Wall", "-Werror", "-c", "model_data.cc"], cwd=tmp_path,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "model_data.o").stat().st_size > len(buf)


def test_export_result_keeps_the_int8_reference(firmware_export):
    assert firmware_export.int8 == open(firmware_export.files["int8"], "rb").read()


def test_report_measures_tflm_targets_only(firmware_export):
    report = json.loads(open(firmware_export.files["report"]).read())
    targets = report["targets"]
    assert targets["int8"]["arena_bytes"] > 0 and targets["micro"]["arena_bytes"] > 0
    assert targets["litert"]["arena_bytes"] is None and "tflm" not in targets["litert"]["runtimes"]
    assert targets["micro"]["runtimes"] == ["tflm"]
    assert set(targets["micro"]["invoke_ratio"]) == {"tflm"}
    assert set(targets["litert"]["invoke_ratio"]) == {"litert", "litert_ref"}
    assert targets["int8"]["invoke_ratio"]["tflm"] > 0
    rows = targets["micro"]["encodings"]
    assert [row["encoding"] for row in rows] == ["lut"] * 3
    assert all(row["entropy_bound_bits"] < row["bits_per_weight"] for row in rows)
    assert targets["micro"]["decoded_weight_bytes"] == sum(row["decode_scratch_bytes"] for row in rows)
    payload = sum(row["payload_bytes"] for row in rows)
    assert targets["micro"]["weight_payload_bytes"] == payload
    assert report["weight_sparsity"] == pytest.approx(0.6, abs=0.1)


def test_c_array_symbol_must_be_an_identifier():
    with pytest.raises(ValueError, match="C identifier"):
        micro.c_array(b"\0" * 16, "model-data")


def test_micro_interpreter_refuses_files_tflm_cannot_run(firmware_export):
    buf = open(firmware_export.files["litert"], "rb").read()
    assert micro.tflm_supported(buf) == (False, "FULLY_CONNECTED has INT2 weights (TFLM has no INT2 kernels)")
    with pytest.raises(ValueError, match="INT2"):
        micro.interpreter(buf)
    assert np.asarray(ptq_tflite.predict(buf, tm.inputs(tm.cnn(), 2), "litert_ref")).shape == (2, 6)
