"""``export``: every target of one model written to disk with its size/RAM report and C array.

The flow reads one way: ``convert`` (bytes of one target) -> ``verify`` (runs the files) -> ``report`` (sizes,
arenas, timings) -> ``export`` (writes files).
"""

from __future__ import annotations

import collections.abc
import os
import time
from dataclasses import dataclass

from . import ethosu, flatbuffer, micro, report
from .convert import (
    AUTO,
    DEFAULT_NUM_SAMPLES,
    TARGETS,
    _check_options,
    _convert_prepared,
    _prepare,
    check_layers,
    check_max_decode_bytes,
    check_ram_budget,
    compile_ethos_u,
    fit_ram,
    float_tflite,
    int8_tflite,
    plain_model,
    vela_options,
)

__all__ = ["ExportResult", "export"]

_FIRMWARE_ORDER = ("micro", "int4", "ethos-u", "int8")  # the C array's target when c_array=True: the first one exported


@dataclass
class ExportResult:
    """What ``export`` wrote: ``files`` (target -> path, plus ``report``/``c_source``/``c_header``), the
    ``report`` object (``report.summary()``, ``report.to_dict()``) and ``int8``, the bytes of the int8 file
    the packed targets came from (``verify(..., int8=result.int8)`` when target int8 was not written)."""

    out_dir: str
    files: dict
    report: object
    int8: bytes | None = None

    def summary(self) -> str:
        return self.report.summary()

    def __str__(self) -> str:
        return self.summary()


def export(
    model,
    representative_data,
    out_dir: str | os.PathLike,
    *,
    targets: collections.abc.Sequence[str] = ("int8", "micro", "litert"),
    c_array: bool | str = False,
    encoding: str = "lut",
    strip_names: bool = False,
    latency_budget: float | None = None,
    num_samples: int = DEFAULT_NUM_SAMPLES,
    name: str = "model",
    measure: bool = True,
    progress=None,
    accelerator: str = ethosu.DEFAULT_ACCELERATOR,
    system_config: str | None = None,
    memory_mode: str | None = None,
    optimise: str = "Performance",
    float_model=None,
    max_decode_bytes: int | str | None = AUTO,
    ram_budget: int | None = None,
    keep_names: bool = False,
    firmware: bool = False,
) -> ExportResult:
    """Convert ``model`` to every target, write ``<name>_<target>.tflite``, a size/arena/speed report
    (``<name>_report.json``) and, with ``c_array``, ``<name>_data.cc`` / ``.h`` for firmware.

    ``c_array=True`` picks the first TFLM target exported among micro, int4, int8; a target name picks it.
    ``measure=False`` skips the TFLM arena bisection and the timing. ``progress``: a callable taking one line
    (e.g. ``print``) for long steps. Files are written atomically.
    Target ``ethos-u``: ``accelerator``, ``system_config``, ``memory_mode``, ``optimise`` as in ``convert``; the
    report carries Vela's figures and, given ``float_model`` (the float model the ternary one was trained from),
    the same figures for that model's plain int8 file compiled alike, so the gain of ternary weights is visible.
    ``max_decode_bytes`` (target ``micro``): as in ``convert``; the report also gives the split layers and, with
    ``measure``, the arena of the unsplit file. ``ram_budget`` (target ``micro``): the TFLM arena the file must
    run in; the split bound (and, if needed, weights kept plain int8) is chosen by measuring (``convert.fit_ram``).
    ``keep_names`` (target ``micro``): keep tensor names, signatures and metadata in the ``micro`` file, which
    otherwise holds only what TFLM reads.
    ``firmware=True``: also ``<name>_firmware/``, a TFLM firmware project of the first TFLM target among micro,
    int4, int8 that runs the first 100 representative samples under QEMU (``firmware.firmware``).
    """
    if isinstance(targets, str):
        targets = (targets,)
    targets = tuple(targets)
    if not targets:
        raise ValueError(f"targets is empty; choose from {list(TARGETS)}.")
    for target in targets:
        _check_options(target, encoding, num_samples)
    if len(set(targets)) != len(targets):
        raise ValueError(f"targets {list(targets)} name a target twice.")
    vela = vela_options(accelerator, system_config, memory_mode, optimise)
    max_decode_bytes = check_max_decode_bytes(max_decode_bytes)
    ram_budget = check_ram_budget(ram_budget, max_decode_bytes)
    if ram_budget is not None and "micro" not in targets:
        raise ValueError(f"ram_budget applies to target 'micro' (decode buffers); targets are {list(targets)}.")
    if firmware and not {"micro", "int4", "int8"} & set(targets):
        raise ValueError(f"firmware=True needs a TFLM target (micro, int4 or int8) in targets {list(targets)}.")
    project_target = _firmware_target(bool(firmware), tuple(t for t in targets if t != "ethos-u"))
    firmware = _firmware_target(c_array, targets)
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"name must be a C identifier-like file stem (e.g. 'model'), got {name!r}.")
    say = progress or (lambda line: None)
    out_dir = os.fspath(out_dir)
    started = time.perf_counter()
    say(f"preparing {getattr(model, 'name', 'model')!r} and {num_samples} calibration samples ...")
    prep = _prepare(model, representative_data, num_samples, vela)
    prep.max_decode_bytes = max_decode_bytes
    prep.keep_names = bool(keep_names)
    for target in targets:  # every layer error before any slow conversion
        check_layers(prep.plain, target, encoding)
    say("converting fp32 reference ...")
    fp32 = float_tflite(prep.plain)
    buffers, vela_figures, split_rows, unsplit_arena, ram_fit = {}, {}, [], None, None
    channel_rows, macs, micro_names = [], (0, 0), []
    for target in targets:
        say(f"converting target {target} ..." + (f" (Vela, {vela.accelerator})" if target == "ethos-u" else ""))
        if target == "micro" and ram_budget is not None:
            buffers[target], ram_fit = fit_ram(prep, encoding, bool(strip_names), latency_budget, ram_budget, say)
            max_decode_bytes = ram_fit.max_decode_bytes
        else:
            buffers[target] = _convert_prepared(prep, target, encoding, bool(strip_names), latency_budget)
        if target == "ethos-u":
            vela_figures["ethos-u"] = prep.vela_figures
        if target == "micro":
            channel_rows, macs, micro_names = list(prep.channel_rows), prep.macs, list(prep.encoded_names)
            removed = sum(r["removed"] for r in channel_rows)
            if channel_rows:
                say(f"  {sum(r['dead'] for r in channel_rows)} dead output channel(s), {removed} removed: MACs "
                    f"{macs[0]:,} -> {macs[1]:,}")  # fmt: skip
        if target == "micro" and prep.split_rows:
            split_rows = list(prep.split_rows)
            max_decode_bytes = prep.decode_bytes
            say(f"  split {len(split_rows)} weight tensor(s) larger than {max_decode_bytes:,} B along output channels"
                + (" (max_decode_bytes='auto': half the int8 arena, at least 16 KiB)" if prep.max_decode_bytes == AUTO
                   else ""))  # fmt: skip
    if "ethos-u" in targets and float_model is not None:
        say(f"compiling the float model's plain int8 file with Vela for comparison ({vela.accelerator}) ...")
        plain_int8 = int8_tflite(plain_model(float_model), prep.calibration)
        vela_figures["plain_int8"] = compile_ethos_u(plain_int8, vela)[1]
    files = {}
    for target, buf in buffers.items():
        path = os.path.join(out_dir, f"{name}_{target}.tflite")
        flatbuffer.atomic_write(path, buf)
        files[target] = path
    if split_rows and ram_fit is not None:
        unsplit_arena = ram_fit.tried[0][2]  # the first candidate: no split, every tensor decoded
    elif split_rows and measure:
        say("measuring the arena of the unsplit micro file for comparison ...")
        prep.max_decode_bytes, prep.keep_int8 = None, 0
        unsplit_arena = micro.measure_arena(
            _convert_prepared(prep, "micro", encoding, bool(strip_names), latency_budget)
        )
    say("measuring sizes" + (", TFLM arenas and invoke times ..." if measure else " ..."))
    reference = prep.int8.get(False, prep.int8.get(True))  # the int8 file the targets came from
    rep = report.build(prep.plain, fp32, buffers, measure=measure, int8_reference=reference, vela=vela_figures,
                       encoded_names=micro_names)  # fmt: skip
    if "micro" in rep.targets and split_rows:
        rep.targets["micro"].split = split_rows
        rep.targets["micro"].max_decode_bytes = max_decode_bytes
        rep.targets["micro"].arena_bytes_unsplit = unsplit_arena
    if "micro" in rep.targets and channel_rows:
        rep.targets["micro"].dead_channels = channel_rows
        rep.targets["micro"].macs_unreduced, rep.targets["micro"].macs = macs
    if "micro" in rep.targets and ram_fit is not None:
        rep.targets["micro"].ram_budget = ram_fit.ram_budget
        rep.targets["micro"].max_decode_bytes = ram_fit.max_decode_bytes
        rep.targets["micro"].keep_int8 = ram_fit.keep_int8
        rep.targets["micro"].ram_fit = [list(t) for t in ram_fit.tried]
    if firmware is not None:
        arena = npu_scratch = None
        if firmware == "ethos-u":
            npu_scratch = vela_figures["ethos-u"].sram_bytes
        else:
            arena = rep.targets[firmware].arena_bytes
            if arena is None:
                arena = micro.measure_arena(buffers[firmware])
        source, header = micro.c_array(
            buffers[firmware], f"{name}_data", arena_bytes=arena, target=firmware, npu_scratch_bytes=npu_scratch
        )
        files["c_source"] = os.path.join(out_dir, f"{name}_data.cc")
        files["c_header"] = os.path.join(out_dir, f"{name}_data.h")
        flatbuffer.atomic_write(files["c_source"], source)
        flatbuffer.atomic_write(files["c_header"], header)
    if project_target is not None:
        from . import firmware as firmware_project

        arena = rep.targets[project_target].arena_bytes
        files["firmware"] = os.path.join(out_dir, f"{name}_firmware")
        say(f"writing the firmware project of target {project_target} ...")
        firmware_project.firmware(
            buffers[project_target],
            files["firmware"],
            inputs=prep.calibration[:100],
            symbol=f"{name}_data",
            arena_bytes=None if arena is None else arena + firmware_project.ARENA_MARGIN,
        )
    files["report"] = os.path.join(out_dir, f"{name}_report.json")
    rep.files = dict(files)
    flatbuffer.atomic_write(files["report"], rep.to_json())
    say(f"done in {time.perf_counter() - started:.1f} s: {len(buffers)} target(s) in {out_dir}")
    return ExportResult(out_dir, files, rep, reference)


def _firmware_target(c_array, targets: tuple) -> str | None:
    if c_array is False or c_array is None:
        return None
    if c_array is True:
        for target in _FIRMWARE_ORDER:
            if target in targets:
                return target
        raise ValueError(
            f"c_array=True needs a firmware target (one of {list(_FIRMWARE_ORDER)}) in targets {list(targets)}."
        )
    if c_array not in _FIRMWARE_ORDER or c_array not in targets:
        raise ValueError(
            f"c_array={c_array!r}: name a firmware target that is also exported "
            f"({[t for t in _FIRMWARE_ORDER if t in targets]}), or pass True."
        )
    return c_array
