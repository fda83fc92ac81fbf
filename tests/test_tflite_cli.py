"""The ``ptq-convert`` command line, run as a separate process on a saved model and .npy samples."""

from __future__ import annotations

import json
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
