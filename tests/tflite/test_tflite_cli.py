"""The ``ptq-convert`` command line, run as a separate process on a saved model and .npy samples."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import tflite_models as tm
from absl import app
from absl.testing import flagsaver

from ptq_keras.tflite import cli


def _run(*args: str, cwd) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "ptq_keras.tflite.cli", *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_cli_exports_verifies_and_writes_the_c_array(tmp_path):
    model = tm.build("residual")
    model.save(tmp_path / "residual.h5")
    np.save(tmp_path / "samples.npy", (tm.inputs(model, 60) * 255).astype(np.uint8))
    run = _run(
        "--model", "residual.h5", "--data", "samples.npy", "--targets", "int8,micro", "--out_dir", "out",
        "--c_array", "--num_samples", "30", "--verify_samples", "30", "--nomeasure", cwd=tmp_path,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "[ptq-convert" in run.stdout and "converting target micro" in run.stdout
    assert "parity of out/model_micro.tflite" in run.stdout and "FAIL" not in run.stdout
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "model_data.cc", "model_data.h", "model_int8.tflite", "model_micro.tflite", "model_report.json"
    ]
    report = json.loads((out / "model_report.json").read_text())
    assert report["targets"]["micro"]["file_bytes"] == (out / "model_micro.tflite").stat().st_size
    assert "model_data_arena_size" in (out / "model_data.h").read_text()


def test_cli_ethos_u_target_passes_vela_options(tmp_path):
    model = tm.build("depthwise")
    model.save(tmp_path / "dw.h5")
    tm.depthwise(seed=1).save(tmp_path / "float.h5")
    np.save(tmp_path / "samples.npy", tm.inputs(model, 40))
    run = _run(
        "--model", "dw.h5", "--float_model", "float.h5", "--data", "samples.npy", "--targets", "int8,ethos-u",
        "--accelerator", "ethos-u65-256", "--optimise", "Size", "--out_dir", "out", "--c_array",
        "--num_samples", "20", "--verify_samples", "20", "--nomeasure", cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert "converting target ethos-u ... (Vela, ethos-u65-256)" in run.stdout
    assert "ethos-u: ethos-u65-256 (Ethos_U65_High_End, Dedicated_Sram)" in run.stdout
    assert "plain int8 model of the same architecture" in run.stdout
    assert "parity of out/model_ethos-u.tflite" in run.stdout and "FAIL" not in run.stdout
    report = json.loads((tmp_path / "out" / "model_report.json").read_text())
    figures = report["targets"]["ethos-u"]["ethos_u"]
    assert (figures["accelerator"], figures["optimise"]) == ("ethos-u65-256", "Size")
    assert "model_data_npu_scratch_size" in (tmp_path / "out" / "model_data.h").read_text()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "missing.h5", "--data", "samples.npy"], "'missing.h5' does not exist"),
        (["--model", "m.h5", "--data", "samples.npy", "--targets", "int8,int3"], r"unknown \['int3'\]"),
        (["--data", "samples.npy"], "--model and --data are required"),
    ],
)
def test_cli_usage_errors_name_the_problem(args, message):
    with flagsaver.flagsaver():
        cli.FLAGS.unparse_flags()
        cli.FLAGS(["ptq-convert", *args])
        with pytest.raises(app.UsageError, match=message):
            cli.main(["ptq-convert"])


def _cli_error(args) -> str:
    with flagsaver.flagsaver():
        cli.FLAGS.unparse_flags()
        cli.FLAGS(["ptq-convert", *args])
        with pytest.raises(app.UsageError) as info:
            cli.main(["ptq-convert"])
    return str(info.value)


def test_damaged_or_wrong_inputs_are_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = tm.build("mlp")
    model.save("good.h5")
    model.save("saved")
    np.save("samples.npy", tm.inputs(model, 8))
    data = open("good.h5", "rb").read()
    open("damaged.h5", "wb").write(data[: len(data) // 2])
    (tmp_path / "saved" / "saved_model.pb").write_bytes(b"not a protobuf")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"jpeg")
    np.save("strings.npy", np.array(["a", "b"]))
    open("broken.npy", "wb").write(b"\x93NUMPY garbage")
    cases = {
        ("--model", "damaged.h5", "--data", "samples.npy"): r"'damaged.h5': the .h5 file cannot be loaded",
        ("--model", "saved", "--data", "samples.npy"): r"'saved': the SavedModel folder cannot be loaded",
        ("--model", "photos", "--data", "samples.npy"): r"'photos' is a folder without saved_model.pb",
        ("--model", "good.h5", "--data", "strings.npy"): r"'strings.npy' holds a <U1 array",
        ("--model", "good.h5", "--data", "broken.npy"): r"'broken.npy' is not a readable .npy array",
    }
    for args, message in cases.items():
        assert re.search(message, _cli_error(list(args))), args


def test_samples_of_the_wrong_shape_are_an_error_and_nothing_is_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    model = tm.build("mlp")
    model.save("good.h5")
    np.save("wrong.npy", np.zeros((8, 3, 3), np.float32))
    with flagsaver.flagsaver():
        cli.FLAGS.unparse_flags()
        cli.FLAGS(["ptq-convert", "--model", "good.h5", "--data", "wrong.npy", "--out_dir", "out"])
        assert cli.main(["ptq-convert"]) == 2
    assert "does not fit the model input" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_export_killed_midway_leaves_only_complete_files(tmp_path):
    """SIGKILL as soon as the first output file appears: every file under its final name is complete."""
    import os
    import signal
    import time

    from ptq_keras.tflite import flatbuffer

    model = tm.build("residual")
    model.save(tmp_path / "residual.h5")
    np.save(tmp_path / "samples.npy", tm.inputs(model, 40))
    command = [sys.executable, "-m", "ptq_keras.tflite.cli", "--model", "residual.h5", "--data", "samples.npy",
               "--targets", "int8,micro,litert", "--c_array", "--out_dir", "out", "--verify_samples", "0"]
    proc = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = tmp_path / "out"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not (out.exists() and any(out.iterdir())):
        time.sleep(0.02)
    assert proc.poll() is None, "the export finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = [p for p in out.iterdir() if not p.name.startswith(".tmp_")]
    assert finished, "nothing was written before the kill"
    assert not (out / "model_report.json").exists()  # the report is written last
    for path in finished:
        if path.suffix == ".tflite":
            flatbuffer.load(str(path))
        else:
            assert path.suffix in (".cc", ".h", ".json")
            text = path.read_text()
            assert text.rstrip().endswith("}") or text.rstrip().endswith("#endif") or path.suffix == ".h"


def test_max_decode_bytes_flag_takes_auto_none_or_bytes():
    assert cli._decode_bytes("auto", None) == "auto"
    assert cli._decode_bytes("none", None) is None
    assert cli._decode_bytes("16384", None) == 16384
    for bad in ("16k", "0", "-3"):
        with pytest.raises(app.UsageError, match="--max_decode_bytes must be 'auto', 'none' or a positive number"):
            cli._decode_bytes(bad, None)
    with pytest.raises(app.UsageError, match="--ram_budget chooses the split bound itself"):
        cli._decode_bytes("8192", 50_000)


def test_keep_names_max_decode_bytes_and_firmware_flags_reach_export(monkeypatch):
    import importlib

    export_mod = importlib.import_module("ptq_keras.tflite.export")
    seen = {}

    class Stop(Exception):
        pass

    def fake_export(model, calibration, out_dir, **options):
        seen.update(options)
        raise Stop

    monkeypatch.setattr(export_mod, "export", fake_export)
    monkeypatch.setattr(cli, "load_model", lambda path, flag="--model": object())
    monkeypatch.setattr(cli, "load_samples", lambda spec, limit, scale: np.zeros((limit, 4), np.float32))
    for args, expected in (
        ([], {"keep_names": False, "max_decode_bytes": "auto", "firmware": False}),
        (["--keep_names", "--max_decode_bytes", "none", "--firmware"],
         {"keep_names": True, "max_decode_bytes": None, "firmware": True}),
    ):  # fmt: skip
        seen.clear()
        with flagsaver.flagsaver():
            cli.FLAGS.unparse_flags()
            cli.FLAGS(["ptq-convert", "--model", "m.h5", "--data", "x.npy", *args])
            with pytest.raises(Stop):
                cli.main(["ptq-convert"])
        assert {k: seen[k] for k in expected} == expected
