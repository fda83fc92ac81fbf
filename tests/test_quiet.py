"""Quiet entry points (ptq_keras.quiet) and the version checks at import (ptq_keras.core.versions)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tflite_models as tm

from ptq_keras import quiet
from ptq_keras.core import versions

# What TensorFlow 2.19-2.21 write to standard error on a machine without a GPU (seen on these versions).
NOISE_LINES = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1796638433.758898   12514 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will "
    "not be used.",
    "E0000 00:00:1796638435.974615   12514 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: Failed "
    "call to cuInit: UNKNOWN ERROR (303)",
    "I0000 00:00:1733.1   77 cpu_feature_guard.cc:210] This TensorFlow binary is optimized to use available CPU "
    "instructions in performance-critical operations.",
    "To enable the following instructions: AVX2 AVX512F FMA, in other operations, rebuild TensorFlow with the "
    "appropriate compiler flags.",
    "I0000 00:00:1733.2   77 port.cc:153] oneDNN custom operations are on. You may see slightly different numerical "
    "results due to floating-point round-off errors from different computation orders.",
    "E0000 00:00:1733.3   77 cuda_dnn.cc:8579] Unable to register cuDNN factory: Attempting to register factory for "
    "plugin cuDNN when one has already been registered",
    "W0000 00:00:1733.4   77 py_utils.cc:45] TF-TRT Warning: Could not find TensorRT",
    "2026-12-07 10:52:22.252999: E external/local_xla/xla/stream_executor/cuda/cuda_fft.cc:467] Unable to register "
    "cuFFT factory: Attempting to register factory for plugin cuFFT when one has already been registered",
    "2026-12-07 10:52:24.992879: E external/local_xla/xla/stream_executor/cuda/cuda_platform.cc:51] failed call to "
    "cuInit: INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)",
    "W0000 00:00:1796640750.720411   24519 tf_tfl_flatbuffer_helpers.cc:365] Ignored output_format.",
    "W0000 00:00:1796640750.723292   24519 tf_tfl_flatbuffer_helpers.cc:368] Ignored drop_control_dependency.",
    "I0000 00:00:1796640750.741708   24519 mlir_graph_optimization_pass.cc:425] MLIR V1 optimization pass is not "
    "enabled",
    "fully_quantize: 0, inference_type: 6, input_inference_type: INT8, output_inference_type: INT8",
    "INFO: Created TensorFlow Lite XNNPACK delegate for CPU.",
]
KEPT_LINES = [
    "/x/convert.py:846: UserWarning: something a user should see",
    "Traceback (most recent call last):",
    "E0000 00:00:1733.5   77 op_kernel.cc:1857] OP_REQUIRES failed at conv_ops.cc: INVALID_ARGUMENT: bad shape",
    "2026-12-07 10:52:22.1: E tensorflow/core/framework/op_kernel.cc:1857] OP_REQUIRES failed: bad shape",
    "W0000 00:00:1796640750.7   24519 tf_tfl_flatbuffer_helpers.cc:365] Ignored output_format, and something else",
    "ValueError: fully_quantize is not a noise line when it is part of an error",
]
# A line from TensorFlow's C++ logging (glog format) or absl's pre-initialization notice.
CPP_LINE = re.compile(r"^([IWEF]\d{4} \d\d:\d\d:[\d.]+ +\d+ \S+\.cc:\d+\]|\d{4}-\d\d-\d\d [\d:.]+: [IWEF] \S+\.cc:\d+\]"
                      r"|WARNING: All log messages before absl)", re.M)


@pytest.mark.parametrize("line", NOISE_LINES)
def test_start_up_lines_are_noise(line):
    assert quiet.is_noise(line)


@pytest.mark.parametrize("line", KEPT_LINES)
def test_other_lines_are_kept(line):
    assert not quiet.is_noise(line)


def test_segments_end_at_newlines_and_carriage_returns():
    complete, rest = quiet._split(b"a\nbar 10%\rbar 20%\rdone\r\nhalf")
    assert complete == [b"a\n", b"bar 10%\r", b"bar 20%\r", b"done\r\n"] and rest == b"half"


def test_the_filter_drops_noise_and_passes_everything_else_in_order():
    """A child process installs the filter, then writes noise and real output to descriptor 2 the way C++ and
    Python do (a warning, a partial progress line, an uncaught exception): only the real output arrives."""
    noise = "".join(line + "\n" for line in NOISE_LINES)
    script = textwrap.dedent(f"""
        import os, sys, warnings
        from ptq_keras import quiet
        assert quiet.install(verbose=False)
        os.write(2, {noise.encode()!r})
        warnings.warn("a real warning")
        os.write(2, b"progress 50%\\r")
        os.write(2, {noise.encode()!r})
        os.write(2, b"progress 100%")
        raise SystemExit("the end")
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    stderr = run.stderr.decode()  # bytes: text mode would turn the carriage return into a newline
    assert run.returncode == 1
    assert not any(quiet.is_noise(line) for line in stderr.splitlines()), stderr
    assert "UserWarning: a real warning" in stderr
    assert stderr.index("progress 50%\r") < stderr.index("progress 100%") < stderr.index("the end")


def _convert(tmp_path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    ptq_convert = os.path.join(os.path.dirname(sys.executable), "ptq-convert")
    command = [ptq_convert, "--model", "m.h5", "--data", "x.npy", "--targets", "int8,micro", "--out_dir", "out",
               "--num_samples", "16", "--verify_samples", "16", "--nomeasure", *extra]  # fmt: skip
    return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)


def test_ptq_convert_prints_no_tensorflow_start_up_lines(tmp_path):
    """``ptq-convert --help`` and a tiny conversion leave standard error without one C++ start-up line, and
    ``--verbose`` gives TensorFlow's standard error back (the same lines as without the filter)."""
    model = tm.build("cnn")
    model.save(tmp_path / "m.h5")
    np.save(tmp_path / "x.npy", tm.inputs(model, 32))
    ptq_convert = os.path.join(os.path.dirname(sys.executable), "ptq-convert")
    helped = subprocess.run([ptq_convert, "--help"], capture_output=True, text=True, timeout=120)
    assert "--[no]verbose" in helped.stdout and helped.stderr == ""  # absl exits 1 after --help
    run = _convert(tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "wrote micro" in run.stdout
    assert not CPP_LINE.search(run.stderr) and not any(quiet.is_noise(x) for x in run.stderr.splitlines()), run.stderr
    verbose = _convert(tmp_path, "--verbose")
    unfiltered = _convert(tmp_path, env={**os.environ, quiet.ENV: "1"})
    assert verbose.returncode == unfiltered.returncode == 0
    assert len(CPP_LINE.findall(verbose.stderr)) == len(CPP_LINE.findall(unfiltered.stderr))


def test_supported_versions_pass_and_others_name_the_fix(monkeypatch):
    assert versions.unsupported() == []  # the environment the tests run in is a supported one
    assert versions.tf_keras_mismatch() is None
    fake = {"tensorflow": "2.17.1", "tf-keras": "2.21.0", "numpy": "2.4.0", "tensorflow-model-optimization": "0.8.1"}
    monkeypatch.setattr(versions, "installed", lambda name: fake.get(name))
    (problem,) = versions.unsupported()
    assert "tensorflow 2.17.1 is outside" in problem and 'pip install "tensorflow>=2.19,<2.22"' in problem
    message = versions.tf_keras_mismatch()
    assert "tf-keras 2.21.0 does not run on tensorflow 2.17.1" in message and '"tf-keras~=2.17.0"' in message
    with pytest.warns(versions.VersionWarning, match="tensorflow 2.17.1"):
        versions.check()
    fake["tensorflow"] = "2.21.0rc0"
    assert versions.unsupported() == [] and versions.tf_keras_mismatch() is None


def test_import_refuses_a_tf_keras_of_another_minor_version(tmp_path):
    """The tf_keras frontend stops with the fix when tf_keras and TensorFlow differ in minor version (a fake
    tf_keras 2.18 distribution found first on the path)."""
    dist = tmp_path / "tf_keras-2.18.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tf-keras\nVersion: 2.18.0\n")
    script = "import ptq_keras; ptq_keras.keras"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 1
    assert "ImportError: tf-keras 2.18.0 does not run on tensorflow" in run.stderr and "Fix: pip install" in run.stderr
