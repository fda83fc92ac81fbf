"""Target ``ethos-u``: the full-integer ``int8`` file compiled for an Arm Ethos-U NPU by Arm's Vela compiler.

Vela (``pip install 'ptq_keras[ethos-u]'``, which pins ``ethos-u-vela``) rewrites the NPU-supported part of an int8
.tflite into one ``ethos-u`` custom op, whose weights it stores with its own lossless encoder; ternary weights
(three values per channel, mostly zeros) encode to little more than their entropy. Stock TFLM runs the file with the
Ethos-U driver and the ``ethos-u`` op registered (docs/FIRMWARE.md); on a host it does not run (there is no NPU).

``compile`` runs Vela in a child process (its own working folder, nothing left behind) and returns the compiled
bytes with Vela's figures (``VelaFigures``): original and encoded weight bytes, flash / SRAM / DRAM use, the NPU/CPU
op split (naming every op that falls back to the CPU), estimated cycles and inference time.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field

__all__ = [
    "ACCELERATORS",
    "DEFAULT_ACCELERATOR",
    "OPTIMISE",
    "VelaError",
    "VelaFigures",
    "VelaOptions",
    "available",
    "missing_message",
    "compile",
    "vela_version",
]

ACCELERATORS = (
    "ethos-u55-32",
    "ethos-u55-64",
    "ethos-u55-128",
    "ethos-u55-256",
    "ethos-u65-256",
    "ethos-u65-512",
    "ethos-u85-128",
    "ethos-u85-256",
    "ethos-u85-512",
    "ethos-u85-1024",
    "ethos-u85-2048",
)
DEFAULT_ACCELERATOR = "ethos-u55-128"
OPTIMISE = ("Performance", "Size")
VELA_REQUIREMENT = "ethos-u-vela==5.2.0"
# Vela's Arm/vela.ini names; per NPU family the microcontroller-like system Vela ships (weights in flash where the
# family allows it: U65 systems put them in DRAM).
_DEFAULT_SYSTEM = {
    "ethos-u55": ("Ethos_U55_High_End_Embedded", "Shared_Sram"),
    "ethos-u65": ("Ethos_U65_High_End", "Dedicated_Sram"),
    "ethos-u85": ("Ethos_U85_SYS_Flash_High", "Shared_Sram"),
}
_CONFIG_FILE = "Arm/vela.ini"
_TIMEOUT_S = 600


class VelaError(ValueError):
    """Vela is missing, rejects the options, or fails on the model (the message has its own words)."""


@dataclass(frozen=True)
class VelaOptions:
    """What Vela compiles for. ``system_config`` / ``memory_mode`` default per NPU family (``_DEFAULT_SYSTEM``);
    ``config``: a Vela .ini file of your own (default: Vela's ``Arm/vela.ini``)."""

    accelerator: str = DEFAULT_ACCELERATOR
    system_config: str | None = None
    memory_mode: str | None = None
    optimise: str = "Performance"
    config: str | None = None

    def __post_init__(self):
        if self.accelerator not in ACCELERATORS:
            raise VelaError(f"unknown Ethos-U accelerator {self.accelerator!r}; choose one of {list(ACCELERATORS)}.")
        if self.optimise not in OPTIMISE:
            raise VelaError(f"optimise must be one of {list(OPTIMISE)}, got {self.optimise!r}.")
        for name in ("system_config", "memory_mode"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_]+", value)):
                raise VelaError(f"{name} must be a section name of the Vela config file, got {value!r}.")
        if self.config is not None and not os.path.isfile(self.config):
            raise VelaError(f"Vela config file {self.config!r} does not exist.")

    def resolved(self) -> tuple[str, str]:
        """(system_config, memory_mode) with the family defaults filled in."""
        family = self.accelerator.rsplit("-", 1)[0]
        system, memory = _DEFAULT_SYSTEM[family]
        if self.config is not None and (self.system_config is None or self.memory_mode is None):
            raise VelaError("with a config file of your own, name its system_config and memory_mode too.")
        return self.system_config or system, self.memory_mode or memory

    def args(self) -> list[str]:
        system, memory = self.resolved()
        return [
            "--config",
            self.config or _CONFIG_FILE,
            "--accelerator-config",
            self.accelerator,
            "--system-config",
            system,
            "--memory-mode",
            memory,
            "--optimise",
            self.optimise,
        ]


@dataclass
class VelaFigures:
    """Vela's figures for one compiled file (bytes are exact where the file gives them, else Vela's KiB x 1024).

    ``original_weight_bytes``: the int8 weights (and Vela's count of biases) before encoding; ``encoded_weight_bytes``
    and ``bits_per_weight`` = 8 x encoded / ``weights`` (weight elements of the weight ops), Vela's per-channel
    scale and bias words included; ``flash_bytes`` / ``dram_bytes``: the read-only data (weights and command
    stream) in the memory Vela placed it (``weights_storage``); ``sram_bytes``: the NPU's scratch (activations);
    ``npu_ops`` / ``cpu_ops``: the op split, ``cpu_op_names`` the ops left to the Cortex-M; ``cycles`` and
    ``inference_time_s`` at the system's clock; ``macs`` per inference."""

    accelerator: str
    system_config: str
    memory_mode: str
    optimise: str
    weights: int
    original_weight_bytes: int
    encoded_weight_bytes: int
    bits_per_weight: float
    weights_storage: str
    flash_bytes: int
    dram_bytes: int
    sram_bytes: int
    npu_ops: int
    cpu_ops: int
    cpu_op_names: list = field(default_factory=list)
    cycles: int = 0
    inference_time_s: float = 0.0
    macs: int = 0
    vela_version: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        cpu = f"{self.cpu_ops} CPU ({', '.join(self.cpu_op_names)})" if self.cpu_ops else "0 CPU"
        storage = self.flash_bytes if self.flash_bytes else self.dram_bytes
        where = "flash" if self.flash_bytes else "DRAM"
        return (
            f"{self.accelerator} ({self.system_config}, {self.memory_mode}): {self.npu_ops} NPU ops, {cpu}; "
            f"weights {self.original_weight_bytes:,} -> {self.encoded_weight_bytes:,} B "
            f"({self.bits_per_weight:.2f} bits/w); {where} {storage:,} B, SRAM {self.sram_bytes:,} B; "
            f"{self.cycles:,} cycles, {self.inference_time_s * 1e6:,.0f} us"
        )


def available() -> bool:
    """Whether Vela is installed in this Python environment."""
    try:
        return importlib.util.find_spec("ethosu.vela") is not None
    except (ImportError, ValueError):
        return False


def missing_message() -> str:
    return (
        "Arm's Vela compiler is not installed in this Python environment: pip install 'ptq_keras[ethos-u]' "
        f"(or pip install {VELA_REQUIREMENT})."
    )


def _require() -> None:
    if not available():
        raise VelaError(missing_message())


def vela_version() -> str:
    _require()
    from importlib import metadata

    return metadata.version("ethos-u-vela")


def _kib(row: dict, key: str) -> int:
    return int(round(float(row.get(key) or 0.0) * 1024))


def _parse_ops(stdout: str) -> tuple[int, int, list[str]]:
    """(NPU ops, CPU ops, one line per CPU op: its TFLite op, output tensor and Vela's reason where it gives one)."""
    npu = re.search(r"NPU operators = (\d+)", stdout)
    cpu = re.search(r"CPU operators = (\d+)", stdout)
    reasons = {}
    for match in re.finditer(r"operator: (\S+), ofm: '([^']*)'\s*\n\s*Reason: ([^\n]*)", stdout):
        reasons.setdefault(match.group(2), (match.group(1), match.group(3).strip()))
    names = []
    for match in re.finditer(r"^\s*CPU: (\S+) = (.*?)(?: \(outputs .*\))?\s*$", stdout, re.M):
        ofm = match.group(2)
        op, reason = reasons.get(ofm, (match.group(1), ""))
        names.append(f"{op} '{ofm}'" + (f" ({reason})" if reason else ""))
    return int(npu.group(1)) if npu else 0, int(cpu.group(1)) if cpu else 0, names


def compile(int8_tflite: bytes, options: VelaOptions | None = None, *, weights: int | None = None):
    """``(compiled_bytes, VelaFigures)``: ``int8_tflite`` compiled by Vela for ``options`` (default: ethos-u55-128).

    ``weights``: the weight elements of the model, for bits per weight (default: Vela's original weight bytes).
    Raises ``VelaError`` with Vela's own message when it fails or is not installed."""
    options = options or VelaOptions()
    _require()
    system, memory = options.resolved()
    with tempfile.TemporaryDirectory(prefix="ptq_vela_") as work:
        src = os.path.join(work, "model.tflite")
        with open(src, "wb") as f:
            f.write(bytes(int8_tflite))
        out_dir = os.path.join(work, "out")
        cmd = [sys.executable, "-m", "ethosu.vela", src, "--output-dir", out_dir, "--show-cpu-operations"]
        try:
            proc = subprocess.run(
                cmd + options.args(), cwd=work, capture_output=True, text=True, timeout=_TIMEOUT_S, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise VelaError(f"Vela did not finish within {_TIMEOUT_S} s.") from exc
        compiled = os.path.join(out_dir, "model_vela.tflite")
        summary = os.path.join(out_dir, f"model_summary_{system}.csv")
        if proc.returncode != 0 or not os.path.isfile(compiled) or not os.path.isfile(summary):
            text = [line.strip() for line in (proc.stderr + "\n" + proc.stdout).splitlines() if line.strip()]
            errors = [line for line in text if "error" in line.lower()]
            tail = errors[-1] if errors else " | ".join(text[-3:]) or f"exit status {proc.returncode}"
            raise VelaError(f"Vela failed for {options.accelerator} ({system}, {memory}): {tail}")
        with open(compiled, "rb") as f:
            data = f.read()
        with open(summary, newline="") as f:
            row = next(csv.DictReader(f))
    npu, cpu, names = _parse_ops(proc.stdout)
    original = int(float(row.get("total_original_weights") or 0))
    encoded = int(float(row.get("total_npu_encoded_weights") or 0))
    count = weights or original
    figures = VelaFigures(
        accelerator=options.accelerator,
        system_config=system,
        memory_mode=memory,
        optimise=options.optimise,
        weights=count,
        original_weight_bytes=original,
        encoded_weight_bytes=encoded,
        bits_per_weight=8.0 * encoded / count if count else 0.0,
        weights_storage=row.get("weights_storage_area", ""),
        flash_bytes=_kib(row, "off_chip_flash_memory_used") + _kib(row, "on_chip_flash_memory_used"),
        dram_bytes=_kib(row, "dram_memory_used"),
        sram_bytes=_kib(row, "sram_memory_used"),
        npu_ops=npu,
        cpu_ops=cpu,
        cpu_op_names=names,
        cycles=int(float(row.get("cycles_total") or 0)),
        inference_time_s=float(row.get("inference_time") or 0.0),
        macs=int(float(row.get("nn_macs") or 0)),
        vela_version=vela_version(),
    )
    return data, figures
