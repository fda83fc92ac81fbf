"""Quiet standard error for the project's entry points: TensorFlow's C++ start-up lines (``absl::InitializeLog``,
``cudart_stub``, ``failed call to cuInit`` on a machine without a GPU, CPU feature and oneDNN notices, CUDA factory
registrations) and the converter's and interpreters' per-call notices are dropped; every other line, Python
warnings and tracebacks included, passes through unchanged.

The scripts, the benchmarks and ``ptq-convert`` call :func:`install` first, before TensorFlow loads. ``--verbose``
on their command line, or ``PTQ_VERBOSE=1``, keeps everything. The library itself never calls it: an application
that imports ptq_keras keeps its standard error as it is.

How: file descriptor 2 becomes a pipe, and a thread copies what arrives to the original standard error line by line,
minus the lines that match :data:`NOISE`. C++ code writes to the descriptor directly, so this is the one place
where its lines can be seen. At exit the pipe is drained; a crash report (faulthandler) goes straight to the
original descriptor.
"""

from __future__ import annotations

import atexit
import faulthandler
import os
import re
import select
import sys
import threading

# A glog-style line from TensorFlow's C++ (``I0000 00:00:1796638433.758898   12514 cudart_stub.cc:31] ...``) from
# one of the start-up sources, or a start-up notice without that prefix.
_SOURCES = (
    "cudart_stub", "cuda_platform", "cuda_diagnostics", "cuda_executor", "cuda_driver", "cuda_dnn", "cuda_fft",
    "cuda_blas", "cpu_feature_guard", "port", "dso_loader", "computation_placer", "gpu_device", "gpu_timer",
)  # fmt: skip
# The two prefixes of TensorFlow's C++ log lines: absl's (``I0000 00:00:1796638433.758898   12514 file.cc:31] ``)
# and TensorFlow's own, before absl's logging starts (``2026-12-07 10:40:46.590984: E external/.../file.cc:51] ``).
_PREFIX = r"^(?:[IWEF]\d{4} [\d:.]+\s+\d+ |\d{4}-\d\d-\d\d [\d:.]+: [IWEF] (?:\S*/)?)"
NOISE = [
    re.compile(r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"),
    re.compile(_PREFIX + r"(" + "|".join(_SOURCES) + r")\.cc:\d+\] "),
    # the converter's notices at every conversion (TensorFlow 2.19)
    re.compile(_PREFIX + r"tf_tfl_flatbuffer_helpers\.cc:\d+\] Ignored (output_format|drop_control_dependency)\.$"),
    re.compile(_PREFIX + r"mlir_graph_optimization_pass\.cc:\d+\] MLIR V1 optimization pass is not enabled"),
    re.compile(r"^To enable the following instructions: .* rebuild TensorFlow with the appropriate compiler flags"),
    re.compile(r"^.*TF-TRT Warning: Could not find TensorRT"),
    re.compile(r"^fully_quantize: \d+, inference_type: \d+, input_inference_type: \w+, output_inference_type: \w+"),
    re.compile(r"^INFO: Created TensorFlow Lite XNNPACK delegate for CPU\."),
]
ENV = "PTQ_VERBOSE"
VERBOSE_HELP = "Keep TensorFlow's start-up log and notices on standard error (PTQ_VERBOSE=1 does the same)."
_VERBOSE_ARGS = ("--verbose", "--verbose=true", "--verbose=True", "--verbose=1")
_state: dict = {}


def is_noise(line: str) -> bool:
    """True for a line that :func:`install` drops."""
    return any(pattern.match(line) for pattern in NOISE)


def verbose_requested(argv: list[str] | None = None) -> bool:
    """``PTQ_VERBOSE`` set (not ``0``/``false``/empty), or ``--verbose`` (``--verbose=true``/``1``) in ``argv``."""
    if os.environ.get(ENV, "").strip().lower() not in ("", "0", "false", "no"):
        return True
    args = sys.argv[1:] if argv is None else argv
    return any(a in _VERBOSE_ARGS for a in args)


def for_script(module_name: str) -> bool:
    """The first lines of a script: ``quiet.for_script(__name__)`` installs the filter when the module runs as the
    main program (not when a test imports it), deciding by :func:`verbose_requested`; ``--verbose`` and
    ``--noverbose`` are then taken off ``sys.argv``, so every script accepts them whatever its flag parser."""
    if module_name != "__main__":
        return False
    verbose = verbose_requested()
    sys.argv[1:] = [a for a in sys.argv[1:] if a not in _VERBOSE_ARGS and a != "--noverbose"]
    return install(verbose)


def define_flag() -> None:
    """Define absl's ``--verbose`` (for ``--help``; :func:`for_script` has already read and removed it), once."""
    from absl import flags

    if "verbose" not in flags.FLAGS:
        flags.DEFINE_bool("verbose", False, VERBOSE_HELP)
        flags.FLAGS.register_flag_by_module(sys.argv[0], flags.FLAGS["verbose"])  # listed by the script's --help


def install(verbose: bool | None = None) -> bool:
    """Filter standard error as the module describes, for the rest of the process; returns whether it did.

    ``verbose=None`` reads :func:`verbose_requested`. Nothing happens when verbose, when already installed, or
    when standard error has no file descriptor."""
    if verbose is None:
        verbose = verbose_requested()
    if verbose or _state or os.name == "nt":  # (select() on a pipe is POSIX: on Windows nothing is filtered)
        return False
    try:
        sys.stderr.flush()
        original = os.dup(2)
    except (OSError, ValueError, AttributeError):
        return False
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    crash_file = os.fdopen(os.dup(original), "w")
    faulthandler.enable(file=crash_file)
    thread = threading.Thread(target=_copy, args=(read_end, original), name="ptq_keras-stderr", daemon=True)
    _state.update(original=original, thread=thread, crash_file=crash_file)
    thread.start()
    atexit.register(_drain)
    return True


def _copy(read_end: int, original: int) -> None:
    """Copy the pipe to ``original``, a segment (ending in a newline or a carriage return) at a time, dropping noise;
    a partial segment goes out when nothing more arrives within 50 ms (progress bars, prompts)."""
    pending = b""
    while True:
        waited = not pending or select.select([read_end], [], [], 0.05)[0]
        chunk = os.read(read_end, 65536) if waited else None
        if chunk == b"":  # end of file: every writer closed
            _write(original, pending)
            os.close(read_end)
            return
        if chunk is None:  # a partial segment and a pause
            _write(original, pending)
            pending = b""
            continue
        pending += chunk
        complete, pending = _split(pending)
        _write(original, b"".join(seg for seg in complete if not is_noise(seg.decode("utf-8", "replace"))))


def _split(data: bytes) -> tuple[list[bytes], bytes]:
    """``data`` -> (its segments up to and including each newline or carriage return, the rest)."""
    segments = re.findall(rb"[^\r\n]*(?:\r\n|\n|\r)", data)
    used = sum(len(seg) for seg in segments)
    return segments, data[used:]


def _write(fd: int, data: bytes) -> None:
    while data:
        try:
            data = data[os.write(fd, data) :]
        except OSError:
            return


def _drain() -> None:
    """At exit: point descriptor 2 back at the original (closing the pipe's last writer) and let the thread finish."""
    if not _state:
        return
    try:
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    os.dup2(_state["original"], 2)
    _state["thread"].join(timeout=2.0)


__all__ = ["ENV", "NOISE", "VERBOSE_HELP", "define_flag", "for_script", "install", "is_noise", "verbose_requested"]
