"""TensorFlow Lite Micro helpers: which files TFLM runs, the smallest tensor arena, and C arrays for firmware.

The arena is measured on the TFLM Python interpreter: its allocation report gives a lower bound, then
probes in child processes (an arena that is too small can crash the interpreter) find the smallest size,
on a 16-byte grid, with which the model allocates and invokes. The interpreter's recording allocator adds a
few hundred bytes of bookkeeping, so the figure is a safe upper bound for firmware.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import tempfile

import numpy as np

from . import flatbuffer

__all__ = ["tflm_supported", "interpreter", "allocation_report", "arena_fits", "measure_arena", "c_array"]

S = flatbuffer.schema
_GRID = 16
_PROBE = (
    "import sys\n"
    "import numpy as np\n"
    "from tflite_micro import runtime\n"
    "buf = open(sys.argv[1], 'rb').read()\n"
    "it = runtime.Interpreter.from_bytes(buf, arena_size=int(sys.argv[2]),"
    " alt_decompression_memory_size=int(sys.argv[3]))\n"
    "d = it.get_input_details(0)\n"
    "it.set_input(np.zeros(d['shape'], dtype=d['dtype']), 0)\n"
    "it.invoke()\n"
)


def tflm_supported(tflite: bytes) -> tuple[bool, str]:
    """Whether the TFLM interpreter runs ``tflite`` (and why not): no INT2 weights, INT4 fully connected
    weights only with one scale per tensor."""
    model = flatbuffer.read(tflite, "tflite")
    for graph in model.subgraphs:
        for op in graph.operators or []:
            op_name = flatbuffer.builtin_name(model, op.opcodeIndex)
            for i in op.inputs:
                if i < 0:
                    continue
                t = graph.tensors[int(i)]
                if t.type == S.TensorType.INT2:
                    return False, f"{op_name} has INT2 weights (TFLM has no INT2 kernels)"
                if op_name == "FULLY_CONNECTED" and t.type == S.TensorType.INT4:
                    q = t.quantization
                    if q is not None and q.scale is not None and len(q.scale) > 1:
                        return False, "FULLY_CONNECTED has per-channel INT4 weights (TFLM needs one scale per tensor)"
    return True, ""


def tensor_bytes_bound(tflite: bytes) -> int | None:
    """The bytes of every tensor of the file at its full shape, plus TFLM's per-tensor overhead: more than any
    arena it needs (constants and decode outputs included). None when the file does not parse."""
    try:
        model = flatbuffer.read(tflite, "tflite")
    except Exception:  # a damaged file: the interpreter's own error is the one to report
        return None
    total = 0
    for graph in model.subgraphs or []:
        for t in graph.tensors or []:
            shape = [int(d) for d in t.shape] if t.shape is not None else []
            itemsize = np.dtype(flatbuffer._NUMPY_TYPES[t.type]).itemsize if t.type in flatbuffer._NUMPY_TYPES else 1
            total += int(np.prod(shape, dtype=np.float64)) * itemsize + 256
    return total


def interpreter(tflite: bytes, arena_size: int | None = None, alt_decompression_memory_size: int = 0):
    """A TFLM Python interpreter for ``tflite``. Default arena: 10x the file plus 64 KiB; when TFLM cannot allocate
    in that (an entropy-coded file decodes to many times its own size), once more with room for every tensor of
    the file at once (:func:`tensor_bytes_bound`)."""
    from tflite_micro import runtime

    ok, why = tflm_supported(tflite)
    if not ok:
        raise ValueError(f"the TFLM interpreter cannot run this file: {why}.")

    def make(size):
        return runtime.Interpreter.from_bytes(
            bytes(tflite), arena_size=size, alt_decompression_memory_size=alt_decompression_memory_size
        )

    if arena_size is not None:
        return make(arena_size)
    size = 10 * len(tflite) + 65536
    try:
        return make(size)
    except RuntimeError:
        bound = tensor_bytes_bound(tflite)
        if bound is None or not size < bound + 65536 <= 1 << 31:
            raise
        return make(bound + 65536)


def allocation_report(tflite: bytes, alt_decompression_memory_size: int = 0) -> str:
    """The text of TFLM's recording allocator report (arena head/tail and per-kind usage)."""
    it = interpreter(tflite, alt_decompression_memory_size=alt_decompression_memory_size)
    sys.stderr.flush()
    with tempfile.TemporaryFile() as capture:
        saved = os.dup(2)
        try:
            os.dup2(capture.fileno(), 2)
            it.print_allocations()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        capture.seek(0)
        return capture.read().decode(errors="replace")


def _report_total(report: str) -> int:
    match = re.search(r"Arena allocation total (\d+) bytes", report)
    if match is None:
        raise RuntimeError(f"unexpected TFLM allocation report: {report[:200]!r}")
    return int(match.group(1))


def arena_fits(tflite: bytes, arena_size: int, alt_decompression_memory_size: int = 0) -> bool:
    """Whether TFLM allocates and invokes ``tflite`` with ``arena_size`` bytes (probed in a child process,
    since a too-small arena can crash the interpreter)."""
    with _model_file(tflite) as path:
        return _fits(path, arena_size, alt_decompression_memory_size)


@contextlib.contextmanager
def _model_file(tflite: bytes):
    """The path of ``tflite`` written to a temporary folder (removed afterwards), for the probing child processes."""
    with tempfile.TemporaryDirectory(prefix="ptq_arena_") as tmp:
        path = os.path.join(tmp, "model.tflite")
        with open(path, "wb") as f:
            f.write(tflite)
        yield path


def _fits(path: str, arena_size: int, alt_decompression_memory_size: int) -> bool:
    run = [sys.executable, "-c", _PROBE, path, str(arena_size), str(alt_decompression_memory_size)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run(run, capture_output=True, env=env, timeout=120).returncode == 0


def measure_arena(tflite: bytes, alt_decompression_memory_size: int = 0) -> int:
    """The smallest tensor arena (bytes, a multiple of 16) with which TFLM allocates and invokes ``tflite``.

    Bisection on a 16-byte grid, starting at the allocation report's total (usually two probes). With
    ``alt_decompression_memory_size`` > 0 the TFLM_DECODE outputs go to that separate memory instead.
    """
    lower = _report_total(allocation_report(tflite, alt_decompression_memory_size))
    with _model_file(tflite) as path:

        def fits(size: int) -> bool:
            return _fits(path, size, alt_decompression_memory_size)

        start = -(-lower // _GRID) * _GRID
        if fits(start):  # the common case: the report's total is enough; confirm that 16 bytes less is not
            lo, hi = (start - _GRID, start) if not fits(start - _GRID) else (0, start - _GRID)
        else:
            lo, step = start, 256
            hi = lo + step
            while not fits(hi):
                lo, step = hi, step * 2
                hi = lo + step
                if hi > 64 * (lower + len(tflite)) + (1 << 20):
                    raise RuntimeError("TFLM does not allocate this model with any arena size tried.")
        while hi - lo > _GRID:
            mid = lo + ((hi - lo) // 2 // _GRID) * _GRID
            if fits(mid):
                hi = mid
            else:
                lo = mid
        return hi


def c_array(
    tflite: bytes,
    symbol: str = "model_data",
    *,
    arena_bytes: int | None = None,
    target: str = "",
    npu_scratch_bytes: int | None = None,
) -> tuple[str, str]:
    """C++ source and header text: ``alignas(16) const unsigned char <symbol>[]``, ``<symbol>_len`` and, when
    known, ``<symbol>_arena_size`` (the measured TFLM arena) or, for an Ethos-U file, ``<symbol>_npu_scratch_size``
    (Vela's SRAM figure: the arena holds it plus TFLM's own allocations). Returns ``(source, header)``."""
    if not symbol.isidentifier():
        raise ValueError(f"symbol must be a C identifier, got {symbol!r}.")
    data = np.frombuffer(bytes(tflite), dtype=np.uint8)
    lines = []
    for start in range(0, len(data), 12):
        lines.append("    " + ", ".join(f"0x{b:02x}" for b in data[start : start + 12]) + ",")
    what = f" ({target} target)" if target else ""
    header_lines = [
        f"// TensorFlow Lite model{what} generated by ptq_keras.tflite; do not edit.",
        "#pragma once",
        "",
        "#include <cstddef>",
        "",
        "// The .tflite flatbuffer, 16-byte aligned as TensorFlow Lite Micro requires.",
        f"extern const unsigned char {symbol}[];",
        f"constexpr size_t {symbol}_len = {len(data)};",
    ]
    if arena_bytes is not None:
        header_lines += [
            "// Smallest tensor arena measured with the TFLM interpreter (includes decoded weights).",
            f"constexpr size_t {symbol}_arena_size = {int(arena_bytes)};",
        ]
    if npu_scratch_bytes is not None:
        header_lines += [
            "// Ethos-U scratch (feature maps) Vela planned; the TFLM arena needs it plus the interpreter's own",
            "// allocations (a few KB; the arena may also hold the input and output tensors): see docs/FIRMWARE.md.",
            f"constexpr size_t {symbol}_npu_scratch_size = {int(npu_scratch_bytes)};",
        ]
    header = "\n".join(header_lines) + "\n"
    source = (
        f'#include "{symbol}.h"\n\n'
        f"alignas(16) const unsigned char {symbol}[] = {{\n" + "\n".join(lines) + "\n};\n"
        f'static_assert(sizeof({symbol}) == {symbol}_len, "model size mismatch");\n'
    )
    return source, header
