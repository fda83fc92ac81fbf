"""``export``: every target of one model written to disk with its size/RAM report and C array.

The flow reads one way: ``convert`` (bytes of one target) -> ``verify`` (runs the files) -> ``report`` (sizes,
arenas, timings) -> ``export`` (writes files). ``export`` checks its options (``_plan``), prepares the model once
(``convert.prepare``), converts every target (``convert.convert_prepared``, ``convert.fit_ram``), writes the files,
builds the report and writes the C array and the firmware project.
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
    Conversion,
    Prepared,
    check_layers,
    check_max_decode_bytes,
    check_options,
    check_ram_budget,
    compile_ethos_u,
    convert_micro,
    convert_prepared,
    fit_ram,
    float_tflite,
    int8_tflite,
    plain_model,
    prepare,
    vela_options,
)
from .ram import RamFit

__all__ = ["ExportResult", "export"]

_FIRMWARE_ORDER = ("micro", "int4", "ethos-u", "int8")  # the C array's target when c_array=True: the first one exported
_TFLM_TARGETS = ("micro", "int4", "int8")  # the targets a firmware project can run


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


def export(model, representative_data, out_dir: str | os.PathLike, *,
           targets: collections.abc.Sequence[str] = ("int8", "micro", "litert"), c_array: bool | str = False,
           encoding: str = "lut", strip_names: bool = False, latency_budget: float | None = None,
           num_samples: int = DEFAULT_NUM_SAMPLES, name: str = "model", measure: bool = True, progress=None,
           accelerator: str = ethosu.DEFAULT_ACCELERATOR, system_config: str | None = None,
           memory_mode: str | None = None, optimise: str = "Performance", float_model=None,
           max_decode_bytes: int | str | None = AUTO, ram_budget: int | None = None, keep_names: bool = False,
           firmware: bool = False) -> ExportResult:  # fmt: skip
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
    plan = _plan(targets, encoding, num_samples, (accelerator, system_config, memory_mode, optimise),
                 max_decode_bytes, ram_budget, c_array, firmware, name)  # fmt: skip
    say = progress or (lambda line: None)
    out_dir, started = os.fspath(out_dir), time.perf_counter()
    say(f"preparing {getattr(model, 'name', 'model')!r} and {num_samples} calibration samples ...")
    prep = prepare(model, representative_data, num_samples, encoding=encoding, strip=bool(strip_names),
                   latency_budget=latency_budget, vela=plan.vela, max_decode_bytes=plan.max_decode_bytes,
                   keep_names=bool(keep_names))  # fmt: skip
    for target in plan.targets:  # every layer error before any slow conversion
        check_layers(prep.plain, target, encoding)
    say("converting fp32 reference ...")
    fp32 = float_tflite(prep.plain)
    conversions, ram_fit = _convert_targets(prep, plan, say)
    vela = _vela_figures(conversions, prep, float_model, say)
    buffers = {target: conversion.tflite for target, conversion in conversions.items()}
    files = _write_targets(out_dir, name, buffers)
    rep = _build_report(prep, fp32, conversions, vela, ram_fit, measure, say)
    files.update(_write_c_array(out_dir, name, plan.c_array, buffers, rep, vela))
    files.update(_write_firmware(out_dir, name, plan.firmware, buffers, rep, prep.calibration, say))
    _write_report(out_dir, name, rep, files)
    say(f"done in {time.perf_counter() - started:.1f} s: {len(buffers)} target(s) in {out_dir}")
    return ExportResult(out_dir, files, rep, prep.int8_reference())


@dataclass(frozen=True)
class _Plan:
    """The checked options of one export."""

    targets: tuple
    vela: ethosu.VelaOptions
    max_decode_bytes: int | str | None
    ram_budget: int | None
    c_array: str | None  # the target of the C array
    firmware: str | None  # the target of the firmware project


def _plan(targets, encoding: str, num_samples: int, vela: tuple, max_decode_bytes, ram_budget, c_array, firmware,
          name) -> _Plan:  # fmt: skip
    """Every option checked (``ValueError`` naming the first bad one) before anything slow runs."""
    targets = _check_targets(targets, encoding, num_samples)
    vela = vela_options(*vela)
    max_decode_bytes = check_max_decode_bytes(max_decode_bytes)
    ram_budget = check_ram_budget(ram_budget, max_decode_bytes)
    if ram_budget is not None and "micro" not in targets:
        raise ValueError(f"ram_budget applies to target 'micro' (decode buffers); targets are {list(targets)}.")
    if firmware and not set(_TFLM_TARGETS) & set(targets):
        raise ValueError(f"firmware=True needs a TFLM target (micro, int4 or int8) in targets {list(targets)}.")
    project_target = _firmware_target(bool(firmware), tuple(t for t in targets if t != "ethos-u"))
    c_array_target = _firmware_target(c_array, targets)
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"name must be a C identifier-like file stem (e.g. 'model'), got {name!r}.")
    return _Plan(targets, vela, max_decode_bytes, ram_budget, c_array_target, project_target)


def _check_targets(targets, encoding: str, num_samples: int) -> tuple:
    if isinstance(targets, str):
        targets = (targets,)
    targets = tuple(targets)
    if not targets:
        raise ValueError(f"targets is empty; choose from {list(TARGETS)}.")
    for target in targets:
        check_options(target, encoding, num_samples)
    if len(set(targets)) != len(targets):
        raise ValueError(f"targets {list(targets)} name a target twice.")
    return targets


def _convert_targets(prep: Prepared, plan: _Plan, say) -> tuple[dict, RamFit | None]:
    """``({target: Conversion}, RamFit or None)``: every target converted, ``micro`` fitted into the RAM budget."""
    conversions, ram_fit = {}, None
    for target in plan.targets:
        say(f"converting target {target} ..." + (f" (Vela, {plan.vela.accelerator})" if target == "ethos-u" else ""))
        if target == "micro" and plan.ram_budget is not None:
            conversions[target], ram_fit = fit_ram(prep, plan.ram_budget, say)
        else:
            conversions[target] = convert_prepared(prep, target)
        if target == "micro":
            _say_micro(conversions[target], ram_fit is None and prep.max_decode_bytes == AUTO, say)
    return conversions, ram_fit


def _say_micro(conversion: Conversion, auto: bool, say) -> None:
    """The progress lines of a ``micro`` conversion: dead channels, split weights (``auto``: the bound was "auto")."""
    rows = conversion.channel_rows
    if rows:
        say(f"  {sum(r['dead'] for r in rows)} dead output channel(s), {sum(r['removed'] for r in rows)} removed: "
            f"MACs {conversion.macs[0]:,} -> {conversion.macs[1]:,}")  # fmt: skip
    if conversion.split_rows:
        say(
            f"  split {len(conversion.split_rows)} weight tensor(s) larger than {conversion.decode_bytes:,} B along "
            "output channels" + (" (max_decode_bytes='auto': half the int8 arena, at least 16 KiB)" if auto else "")
        )


def _vela_figures(conversions: dict, prep: Prepared, float_model, say) -> dict:
    """Vela's figures of target ``ethos-u`` (key ``ethos-u``) and, given ``float_model``, of that model's plain int8
    file compiled alike (key ``plain_int8``)."""
    if "ethos-u" not in conversions:
        return {}
    figures = {"ethos-u": conversions["ethos-u"].vela_figures}
    if float_model is not None:
        say(f"compiling the float model's plain int8 file with Vela for comparison ({prep.vela.accelerator}) ...")
        plain_int8 = int8_tflite(plain_model(float_model), prep.calibration)
        figures["plain_int8"] = compile_ethos_u(plain_int8, prep.vela)[1]
    return figures


def _write_targets(out_dir: str, name: str, buffers: dict) -> dict:
    """``<name>_<target>.tflite`` of every target; returns target -> path."""
    files = {}
    for target, buf in buffers.items():
        path = os.path.join(out_dir, f"{name}_{target}.tflite")
        flatbuffer.atomic_write(path, buf)
        files[target] = path
    return files


def _build_report(prep: Prepared, fp32: bytes, conversions: dict, vela: dict, ram_fit: RamFit | None,
                  measure: bool, say) -> report.ExportReport:  # fmt: skip
    """``report.build`` of the converted targets, with what the ``micro`` conversion found."""
    micro_conversion = conversions.get("micro")
    unsplit_arena = _unsplit_arena(prep, micro_conversion, ram_fit, measure, say)
    say("measuring sizes" + (", TFLM arenas and invoke times ..." if measure else " ..."))
    buffers = {target: conversion.tflite for target, conversion in conversions.items()}
    names = micro_conversion.encoded_names if micro_conversion is not None else []
    rep = report.build(prep.plain, fp32, buffers, measure=measure, int8_reference=prep.int8_reference(), vela=vela,
                       encoded_names=list(names))  # fmt: skip
    if micro_conversion is not None:
        _add_micro_rows(rep.targets["micro"], micro_conversion, ram_fit, unsplit_arena)
    return rep


def _unsplit_arena(prep: Prepared, conversion: Conversion | None, ram_fit: RamFit | None, measure: bool, say):
    """The TFLM arena of the ``micro`` file without a split, where its weights were split (None otherwise)."""
    if conversion is None or not conversion.split_rows:
        return None
    if ram_fit is not None:
        return ram_fit.tried[0][2]  # the first candidate: no split, every tensor decoded
    if not measure:
        return None
    say("measuring the arena of the unsplit micro file for comparison ...")
    return micro.measure_arena(convert_micro(prep.with_options(max_decode_bytes=None, keep_int8=0)).tflite)


def _add_micro_rows(target: report.TargetReport, conversion: Conversion, ram_fit: RamFit | None, unsplit_arena):
    """The split layers, dead channels and RAM fit of the ``micro`` conversion, in its report."""
    if conversion.split_rows:
        target.split = list(conversion.split_rows)
        target.max_decode_bytes = conversion.decode_bytes
        target.arena_bytes_unsplit = unsplit_arena
    if conversion.channel_rows:
        target.dead_channels = list(conversion.channel_rows)
        target.macs_unreduced, target.macs = conversion.macs
    if ram_fit is not None:
        target.ram_budget = ram_fit.ram_budget
        target.max_decode_bytes = ram_fit.max_decode_bytes
        target.keep_int8 = ram_fit.keep_int8
        target.ram_fit = [list(t) for t in ram_fit.tried]


def _write_c_array(out_dir: str, name: str, target: str | None, buffers: dict, rep, vela: dict) -> dict:
    """``<name>_data.cc`` / ``.h`` of ``target`` (None: nothing) with its arena (or Ethos-U scratch) size."""
    if target is None:
        return {}
    arena = npu_scratch = None
    if target == "ethos-u":
        npu_scratch = vela["ethos-u"].sram_bytes
    else:
        arena = rep.targets[target].arena_bytes
        if arena is None:
            arena = micro.measure_arena(buffers[target])
    source, header = micro.c_array(
        buffers[target], f"{name}_data", arena_bytes=arena, target=target, npu_scratch_bytes=npu_scratch
    )
    files = {"c_source": os.path.join(out_dir, f"{name}_data.cc"), "c_header": os.path.join(out_dir, f"{name}_data.h")}
    flatbuffer.atomic_write(files["c_source"], source)
    flatbuffer.atomic_write(files["c_header"], header)
    return files


def _write_firmware(out_dir: str, name: str, target: str | None, buffers: dict, rep, calibration, say) -> dict:
    """``<name>_firmware/`` of ``target`` (None: nothing), running the first 100 calibration samples."""
    if target is None:
        return {}
    from . import firmware as firmware_project

    arena = rep.targets[target].arena_bytes
    path = os.path.join(out_dir, f"{name}_firmware")
    say(f"writing the firmware project of target {target} ...")
    firmware_project.firmware(
        buffers[target],
        path,
        inputs=calibration[:100],
        symbol=f"{name}_data",
        arena_bytes=None if arena is None else arena + firmware_project.ARENA_MARGIN,
    )
    return {"firmware": path}


def _write_report(out_dir: str, name: str, rep, files: dict) -> None:
    """``<name>_report.json``, listing every file written (itself included, as ``files["report"]``)."""
    files["report"] = os.path.join(out_dir, f"{name}_report.json")
    rep.files = dict(files)
    flatbuffer.atomic_write(files["report"], rep.to_json())


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
