"""The demo's files as firmware on emulated Cortex-M (QEMU): bit-exactness against the TFLM Python interpreter,
flash, RAM, arena and instructions per inference, per file and core.

Files: the demo's ``int8`` and ``micro`` files (``make demo`` writes them in out/demo) and, converted from the
demo's stripped ternary model (``out/demo/ternary_stripped.h5``) with the demo's calibration images, ``micro`` with
encodings ``huffman`` and ``huffman_group``, ``lut`` without a split (``max_decode_bytes=None``: every decoded
weight in the arena), and ``lut`` of a copy of the model with a quarter of conv2's and fc's output channels zeroed
(target ``micro`` removes those dead channels). All but ``lut_unsplit`` use the default split
(``max_decode_bytes="auto"``), as the demo's own ``micro`` file (``lut``) does. Every firmware registers the
project's small int8 kernels (``ptq_kernels.cc``) for ``TFLM_DECODE`` and ``CONCATENATION`` where the file allows
(the default of ``firmware()``), except ``lut_tflm_kernels``: the demo's ``micro`` file with TFLM's kernels only.
Flash is split by origin from the linker map (model, TFLM kernels with CMSIS-NN and the project's kernels, the rest
of TFLM, and the test program with libc). Each runs on the first ``--inputs``
Fashion-MNIST test images on Cortex-M4 (``mps2-an386``) with TFLM's reference kernels and with CMSIS-NN, and on
Cortex-M55 (``mps3-an547``) with CMSIS-NN (Helium). Instructions per inference come from SysTick under ``-icount
shift=0`` (one instruction per virtual ns), calibrated in the firmware on a loop of known length; the
``TFLM_DECODE`` share from TFLM's profiler hook (per-op ticks). Flash: text + data of the ELF without the embedded
test images (the test program's newlib-nano printf and libc included); RAM: .data + .bss (the tensor arena included;
the 16 KB stack not).

Usage: python benchmarks/firmware.py [--inputs 100] [--only int8,lut] [--output benchmarks/results/firmware.md]
"""

from __future__ import annotations

from ptq_keras import quiet

quiet.for_script(__name__)  # TensorFlow's start-up lines off standard error unless --verbose (before it loads)

import argparse
import datetime
import hashlib
import json
import os
import platform
import sys
import time

import numpy as np

from ptq_keras.tflite import firmware, firmware_build, flatbuffer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from examples.common import cpu_name  # noqa: E402

DEMO = os.path.join("out", "demo")
WORK = os.path.join("out", "firmware")
# Files run with TFLM's own kernels only (the others register ptq_kernels.cc where the model allows, the default)
TFLM_KERNELS_ONLY = {"lut_tflm_kernels": "lut"}
DEAD_FRACTION = 0.25


def _say(line: str) -> None:
    print(f"[firmware {time.strftime('%H:%M:%S')}] {line}", flush=True)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


CONVERSIONS = {
    "huffman": {"encoding": "huffman"},
    "huffman_group": {"encoding": "huffman_group"},
    "lut_unsplit": {"encoding": "lut", "max_decode_bytes": None},
    "lut_dead_channels": {"encoding": "lut"},
}


def demo_files(demo_dir: str = DEMO, only=None, reconvert: bool = False) -> dict:
    """label -> .tflite bytes: the demo's files and the ones converted from its stripped model. Converted files
    are kept in out/firmware/files/ and reused (every library runs the same bytes) unless ``reconvert``."""
    int8_path = os.path.join(demo_dir, "model_int8.tflite")
    h5_path = os.path.join(demo_dir, "ternary_stripped.h5")
    if not os.path.isfile(int8_path) or not os.path.isfile(h5_path):
        raise SystemExit(f"{int8_path} or {h5_path} is missing: run `make demo` (or `make firmware`) first.")
    files = {"int8": _read(int8_path)}
    micro_path = os.path.join(demo_dir, "model_micro.tflite")
    if os.path.isfile(micro_path):
        files["lut"] = _read(micro_path)
        for label, source in TFLM_KERNELS_ONLY.items():
            files[label] = files[source]
    model = None
    for label, options in CONVERSIONS.items():
        if only is not None and label not in only:
            continue
        kept = os.path.join(WORK, "files", f"{label}.tflite")
        if os.path.isfile(kept) and not reconvert:
            files[label] = _read(kept)
            continue
        if model is None:
            model, calibration = _demo_model(h5_path)
        _say(f"converting {label} ...")
        source = zero_channels(model) if label == "lut_dead_channels" else model
        files[label] = ptq_tflite_convert(source, calibration, **options)
        flatbuffer.atomic_write(kept, files[label])
    return {k: v for k, v in files.items() if only is None or k in only}


def _demo_model(h5_path: str):
    """The demo's stripped ternary model and its calibration images (the first 500 training images)."""
    from ptq_keras import data
    from ptq_keras.compat import keras

    x_train, _ = data.load_numpy("fashion_mnist", "train", limit=500)
    return keras.models.load_model(h5_path, compile=False), x_train.astype("float32") / 255.0


def ptq_tflite_convert(model, calibration, **options) -> bytes:
    from ptq_keras import tflite as ptq_tflite

    return ptq_tflite.convert(model, calibration, target="micro", **options)


def zero_channels(model, layers=("conv2", "fc"), fraction: float = DEAD_FRACTION):
    """A copy of ``model`` with every ``1/fraction``-th output channel of ``layers`` set to zero weights."""
    from ptq_keras.compat import keras

    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    for name in layers:
        layer = copy.get_layer(name)
        kernel = layer.kernel.numpy()
        kernel[..., :: int(round(1 / fraction))] = 0.0
        layer.kernel.assign(kernel)
    return copy


def test_images(n: int) -> np.ndarray:
    from ptq_keras import data

    x, _ = data.load_numpy("fashion_mnist", "test", limit=n)
    return x.astype("float32") / 255.0


def dead_channels(buf: bytes, int8: bytes) -> int:
    """Output channels the file has fewer of than the int8 file, summed over weight ops."""

    def channels(b):
        model = flatbuffer.read(b)
        total = 0
        for graph in model.subgraphs:
            for op in graph.operators:
                if flatbuffer.builtin_name(model, op.opcodeIndex) in ("CONV_2D", "FULLY_CONNECTED"):
                    total += int(graph.tensors[int(op.outputs[0])].shape[-1])
        return total

    return channels(int8) - channels(buf)


def compare(run: firmware.FirmwareRun, expected: list[np.ndarray]) -> tuple[bool, str]:
    """(bit-exact, detail): per output tensor, how many inputs differ and by how many LSB at most (int8)."""
    if not run.done or run.errors or len(run.ticks) != len(expected[0]):
        return False, f"run incomplete ({len(run.ticks)} inputs; {'; '.join(run.errors) or 'no done line'})"
    notes = []
    for k, want in enumerate(expected):
        got = run.output_array(k)
        differ = np.any(got != want, axis=1)
        if differ.any():
            lsb = np.abs(got.view(np.int8).astype(int) - want.view(np.int8).astype(int)).max()
            notes.append(f"output {k}: {int(differ.sum())} of {len(want)} inputs differ, by up to {lsb} LSB")
    return not notes, "; ".join(notes)


def bench(files: dict, images: np.ndarray, libraries, log=_say) -> list[dict]:
    rows = []
    for label, buf in files.items():
        log(f"{label}: {len(buf):,} B, ops {firmware.model_ops(buf)}")
        arena = None
        expected = firmware.reference_outputs(buf, images)
        for lib in libraries:
            # one project per file and library: runs on different libraries may go on side by side
            project = os.path.join(WORK, "projects", f"{label}-{lib.core}-{lib.kernels}")
            made = firmware.firmware(
                buf, project, inputs=images, arena_bytes=arena, core=lib.core, kernels=lib.kernels,
                ptq_kernels=label not in TFLM_KERNELS_ONLY,
            )  # fmt: skip
            arena = made.arena_bytes
            built = firmware_build.make_firmware(project, lib)
            started = time.perf_counter()
            run = firmware.parse_output(_run_cached(project, lib, built.elf))
            exact, detail = compare(run, expected)
            instructions = run.instructions() if run.ticks else [0.0]
            decode_ticks = sum(t for name, (_, t) in run.ops.items() if name == "TFLM_DECODE")
            row = {
                "file": label, "file_bytes": len(buf), "file_sha256": hashlib.sha256(buf).hexdigest(),
                "core": lib.core, "kernels": lib.kernels,
                "bit_exact": exact, "detail": detail, "flash": built.flash, "ram": built.ram,
                "arena": made.arena_bytes, "arena_used": run.arena_used, "inputs": len(run.ticks),
                "instructions": float(np.mean(instructions)), "instructions_min": float(min(instructions)),
                "instructions_max": float(max(instructions)),
                "decode_share": decode_ticks / max(sum(run.ticks), 1),
                "dead_channels": dead_channels(buf, files["int8"]) if "int8" in files else 0,
                "qemu_seconds": time.perf_counter() - started,
                "ptq_ops": made.ptq_ops, "flash_parts": built.flash_parts, "arena_bytes": built.arena,
            }  # fmt: skip
            rows.append(row)
            print(line(row), flush=True)
    return rows


def _run_cached(project: str, lib, elf) -> str:
    """What the firmware printed: QEMU's emulation is deterministic, so a run is kept under out/firmware/runs/ by
    the ELF's SHA-256 and an identical ELF is not run again."""
    with open(elf, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    path = os.path.join(WORK, "runs", f"{digest}.txt")
    if os.path.isfile(path):
        with open(path) as f:
            return f.read()
    text = firmware_build.run_firmware(project, lib)
    flatbuffer.atomic_write(path, text)
    return text


def merge(rows: list[dict], files: dict) -> list[dict]:
    """These rows and those of earlier runs (out/firmware/rows.json) on the same files for other libraries, in file
    then library order; saved back, so runs on one library at a time add up to the whole table."""
    path = os.path.join(WORK, "rows.json")
    old = []
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
    shas = {hashlib.sha256(buf).hexdigest() for buf in files.values()}

    def key(r):
        return r["file"], r["core"], r["kernels"], r["inputs"]

    # rows of a file this benchmark no longer makes are dropped
    known = {"int8", "lut", *TFLM_KERNELS_ONLY, *CONVERSIONS}
    merged = {key(r): r for r in old
              if r["file"] in known and (r.get("file_sha256") in shas or r["file"] not in files)}  # fmt: skip
    merged.update({key(r): r for r in rows})
    order = {k: i for i, k in enumerate(["int8", "lut", "lut_tflm_kernels", "huffman", "huffman_group", "lut_unsplit"])}
    libs = {pair: i for i, pair in enumerate(firmware_build.LIBRARIES)}
    result = sorted(
        merged.values(), key=lambda r: (order.get(r["file"], 99), r["file"], libs.get((r["core"], r["kernels"]), 9))
    )
    flatbuffer.atomic_write(path, json.dumps(result, indent=1))
    return result


def line(row: dict) -> str:
    """The one-line summary of one file on one core."""
    return (
        f"{row['file']:<18} {row['core']:<10} {row['kernels']:<9} bit-exact: {'yes' if row['bit_exact'] else 'no'} "
        f"({row['inputs']} inputs)  flash {row['flash']:,} B  RAM {row['ram']:,} B (arena used {row['arena_used']:,} "
        f"of {row['arena']:,} B)  {row['instructions']:,.0f} instructions/inference"
        f"  DECODE {100 * row['decode_share']:.1f}%" + (f"  [{row['detail']}]" if row["detail"] else "")
    )


def table(rows: list[dict], libs, seconds: dict, command: str) -> str:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    int8_insn = {(r["core"], r["kernels"]): r["instructions"] for r in rows if r["file"] == "int8"}
    lines = [
        "# The demo's files as firmware on emulated Cortex-M",
        "",
        f"{now}; host {cpu_name()} ({platform.machine()}), {os.cpu_count()} CPUs; arm-none-eabi-gcc {_gcc()}; "
        f"QEMU {_qemu()}. Command: `{command}` (after `make demo`; `make firmware` runs both).",
        "",
        "Bit-exact: every output byte of every input equals the TFLM Python interpreter's (`tflite_micro.runtime`) "
        f"on the same file, over the first {rows[0]['inputs'] if rows else 0} Fashion-MNIST test images. Flash: text "
        "+ data without the embedded test images (TFLM, kernels, newlib-nano printf and the model). RAM: .data + .bss, "
        "the tensor arena included (the arena is the Python-measured size + 4 KB). Instructions: per inference, "
        "mean over the inputs (QEMU `-icount shift=0`, SysTick calibrated in the firmware; instructions, not "
        "cycles). DECODE: share of the inference's instructions spent in `TFLM_DECODE` ops.",
        "",
        "| file | bytes | core | kernels | own kernels | bit-exact | flash B | vs int8 | RAM B | vs int8 | "
        "arena used B | instructions | vs int8 | DECODE |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    int8_rows = {(r["core"], r["kernels"]): r for r in rows if r["file"] == "int8"}
    for r in rows:
        base = int8_insn.get((r["core"], r["kernels"]))
        ratio = f"{r['instructions'] / base:.2f}x" if base else "-"
        ref = int8_rows.get((r["core"], r["kernels"]))
        flash = f"{r['flash'] / ref['flash']:.2f}x" if ref else "-"
        ram = f"{r['ram'] / ref['ram']:.2f}x" if ref else "-"
        exact = "yes" if r["bit_exact"] else f"no: {r['detail']}"
        lines.append(
            f"| {r['file']} | {r['file_bytes']:,} | {r['core']} | {r['kernels']} | {_own(r)} | {exact} "
            f"| {r['flash']:,} | {flash} "
            f"| {r['ram']:,} | {ram} | {r['arena_used']:,} | {r['instructions']:,.0f} | {ratio} "
            f"| {100 * r['decode_share']:.1f}% |"
        )
    lines += [
        "",
        "Own kernels: ops run by the project's `ptq_kernels.cc` instead of TFLM's kernel "
        "(`firmware(ptq_kernels=True)`, the default, where every op of the kind qualifies).",
        "",
        "## Where the bytes go",
        "",
        "Flash by origin, from the linker map: the model (the C array); kernels (TFLM's op kernels and the math "
        "they use, CMSIS-NN, the project's kernels); the rest of TFLM (interpreter, allocator, memory planner, "
        "flatbuffer reader); the test program with newlib-nano, libm and libgcc (the map lists merged string "
        "constants before merging: a few hundred bytes land in the last column). RAM: the tensor arena and the "
        "static data beside it.",
        "",
        "| file | core | kernels | flash B | model | kernels | TFLM runtime | test program + libc | RAM B | arena | "
        "static |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        parts = r.get("flash_parts")
        if not parts:
            continue
        lines.append(
            f"| {r['file']} | {r['core']} | {r['kernels']} | {r['flash']:,} | {parts['model']:,} | "
            f"{parts['kernels']:,} | {parts['runtime']:,} | {parts['other']:,} | {r['ram']:,} | "
            f"{r['arena_bytes']:,} | {r['ram'] - r['arena_bytes']:,} |"
        )
    dead = {r["file"]: r["dead_channels"] for r in rows if r["dead_channels"]}
    if dead:
        lines += ["", "Output channels removed as dead (fewer than in the int8 file): "
                  + ", ".join(f"{k} {v}" for k, v in dead.items())
                  + ". That file is another model (the demo's with channels zeroed): its `vs int8` is not like for "
                  "like."]  # fmt: skip
    lines += ["", "SysTick counts the core clock: 40 instructions per tick on `mps2-an386` (25 MHz), 31.25 on "
              "`mps3-an547` (32 MHz), as each run's calibration loop measured. On the M55 the CMSIS-NN (Helium) "
              "kernels take 5x fewer instructions than on the M4 while `TFLM_DECODE` runs the same scalar code, so "
              "decoding is a larger share there."]  # fmt: skip
    lines += ["", "TFLM library build times (TFLM's Makefile, `make -j2` on the 2-core host while other jobs ran; a "
              "second run finds them built and takes no time): "
              + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()) + "."]  # fmt: skip
    return "\n".join(lines) + "\n"


def _own(row: dict) -> str:
    names = {"TFLM_DECODE": "DECODE", "CONCATENATION": "CONCAT"}
    return ", ".join(names.get(op, op) for op in row.get("ptq_ops", [])) or "-"


def _version(command: list[str]) -> str:
    import subprocess

    try:
        out = subprocess.run(command, capture_output=True, text=True).stdout.splitlines()
    except OSError:
        return "?"
    return out[0].split()[-1] if out else "?"


def _gcc() -> str:
    return _version(["arm-none-eabi-gcc", "-dumpversion"])


def _qemu() -> str:
    import re
    import subprocess

    out = subprocess.run(["qemu-system-arm", "--version"], capture_output=True, text=True).stdout
    match = re.search(r"version (\S+)", out)
    return match.group(1) if match else "?"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=100, help="Fashion-MNIST test images per run (default 100)")
    parser.add_argument("--only", default="", help="comma-separated file labels (default: all)")
    parser.add_argument("--libraries", default="", help="comma-separated core:kernels (default: all three)")
    parser.add_argument("--reconvert", action="store_true", help="convert the files again (kept in out/firmware/files)")
    parser.add_argument("--output", default=os.path.join("benchmarks", "results", "firmware.md"))
    args = parser.parse_args(argv)
    pairs = firmware_build.LIBRARIES
    if args.libraries:
        pairs = tuple(tuple(item.split(":", 1)) for item in args.libraries.split(","))
    try:
        libs = firmware_build.build(pairs, log=_say)
    except (firmware_build.ToolchainMissing, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    seconds = {f"{c} {k}": t for (c, k), t in firmware_build.build_seconds(libs[0].tflm_root).items()}
    only = set(args.only.split(",")) if args.only else None
    files = demo_files(only=only, reconvert=args.reconvert)
    rows = merge(bench(files, test_images(args.inputs), libs), files)
    command = "python benchmarks/firmware.py" + (f" --inputs {args.inputs}" if args.inputs != 100 else "")
    text = table(rows, libs, seconds, command)
    flatbuffer.atomic_write(args.output, text)
    _say(f"wrote {args.output}")
    return 0 if all(r["bit_exact"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
