"""Export targets of a weight-dominated ternary model: bytes vs fp32, bits per weight, TFLM arena, invoke time.

Model: Dense 784 -> 1024 -> 256 -> 10 (1.07M parameters), random ternary kernels at 70% sparsity
(alpha_c * {-1, 0, +1} per output channel). Target ``int4`` needs one scale per Dense kernel, so it is exported
from the same codes with one alpha per layer (its int8 twin is timed as its reference). One run; the invoke
times are ratios to the int8 file on the same interpreter (best of 20 invokes), not absolute numbers.

Usage: python benchmarks/export_size.py [--output benchmarks/results/export_size.md]
"""

from __future__ import annotations

from ptq_keras import quiet

quiet.for_script(__name__)  # TensorFlow's start-up lines off standard error unless --verbose (before it loads)

import argparse
import datetime
import importlib
import os
import platform
import tempfile
import time

import numpy as np
from tflite_micro import __version__ as tflm_version

import ptq_keras
from ptq_keras.compat import keras, tf
from ptq_keras.tflite import flatbuffer

# The package re-exports the functions convert and verify under the names of their modules.
ptq_convert = importlib.import_module("ptq_keras.tflite.convert")
ptq_report = importlib.import_module("ptq_keras.tflite.report")
ptq_verify = importlib.import_module("ptq_keras.tflite.verify")

SPARSITY = 0.7
LAYERS = (1024, 256, 10)
SEED = 0


def build(per_tensor: bool) -> keras.Model:
    """The benchmark MLP with ternary kernels (same codes for both scale layouts)."""
    rng = np.random.default_rng(SEED)
    model = keras.Sequential(
        [keras.Input((784,), name="pixels")]
        + [keras.layers.Dense(n, activation="relu" if i < len(LAYERS) - 1 else None) for i, n in enumerate(LAYERS)],
        name="mlp_1m",
    )
    for layer in model.layers:
        fan_in, units = layer.kernel.shape
        p = [(1 - SPARSITY) / 2, SPARSITY, (1 - SPARSITY) / 2]
        codes = rng.choice([-1.0, 0.0, 1.0], size=(fan_in, units), p=p)
        alpha = np.sqrt(2.0 / (fan_in * (1 - SPARSITY))) * rng.uniform(0.8, 1.2, size=(1, units))
        if per_tensor:
            alpha = np.full_like(alpha, alpha.mean())
        layer.kernel.assign((codes * alpha).astype(np.float32))
        layer.bias.assign(rng.uniform(-0.05, 0.05, units).astype(np.float32))
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=os.path.join("benchmarks", "results", "export_size.md"))
    args = parser.parse_args()
    started = time.perf_counter()
    x = np.random.default_rng(1).uniform(0, 1, (164, 784)).astype(np.float32)
    calibration, check = x[:100], x[100:]

    channel = build(per_tensor=False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        result = ptq_convert.export(channel, calibration, tmp, targets=("int8", "micro", "litert"), progress=print)
        report = result.report
        parity = {t: ptq_verify.verify(channel, result.files[t], check) for t in ("int8", "micro", "litert")}
        int8 = open(result.files["int8"], "rb").read()
    rows += [(t, report.targets[t], parity[t]) for t in ("int8", "micro", "litert")]
    fp32 = ptq_convert.float_tflite(channel)
    for encoding in ("huffman", "auto"):
        print(f"micro with encoding={encoding} ...", flush=True)
        buf = ptq_convert.convert(channel, calibration, target="micro", encoding=encoding)
        extra = ptq_report.build(channel, fp32, {"micro": buf}, int8_reference=int8).targets["micro"]
        rows.append((f"micro ({encoding})", extra, ptq_verify.verify(channel, buf, check, int8=int8)))

    tensor = build(per_tensor=True)
    print("int4 (one scale per Dense kernel) ...", flush=True)
    int8_tensor = ptq_convert.convert(tensor, calibration, target="int8")
    int4 = ptq_convert.convert(tensor, calibration, target="int4")
    extra = ptq_report.build(tensor, ptq_convert.float_tflite(tensor), {"int4": int4}, int8_reference=int8_tensor)
    rows.append(("int4", extra.targets["int4"], ptq_verify.verify(tensor, int4, check, int8=int8_tensor)))

    md = render(report, rows, time.perf_counter() - started)
    print(md)
    flatbuffer.atomic_write(args.output, md)


def _parity(p) -> str:
    worst = {}
    for step in p.steps[1:]:
        worst[step.runtime] = max(worst.get(step.runtime, 0.0), step.max_lsb)
    label = ", ".join(f"{k} {v:g}" for k, v in worst.items())
    return ("ok: " if p.ok else "FAIL: ") + label


def render(report, rows, seconds: float) -> str:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}"
    fp32_params = report.fp32_param_bytes
    lines = [
        "# Export targets: size, arena and speed (1M-parameter ternary MLP)",
        "",
        f"Date: {now}. Machine: {machine}. Python {platform.python_version()}, TensorFlow {tf.__version__}, "
        f"tflite-micro {tflm_version}, ptq_keras {ptq_keras.__version__}. Run time {seconds:.0f} s.",
        "",
        f"Model: Dense 784 -> 1024 -> 256 -> 10, {report.fp32_params:,} parameters ({fp32_params:,} B fp32), "
        f"random ternary kernels at {SPARSITY:.0%} sparsity. fp32 .tflite: {report.fp32_tflite_bytes:,} B. "
        "A dense 2-bit code bounds the weight part at 16x vs fp32; the entropy of ternary symbols at 70% "
        "sparsity is 1.18 bits/weight (27x).",
        "",
        "| target | bytes | x fp32 .tflite | x fp32 params | weight bits/w | TFLM arena B | decoded B "
        "| arena B, decoded weights in alt memory | TFLM invoke vs int8 | LiteRT invoke vs int8 (XNNPACK / ref) "
        "| parity vs int8, max LSB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, t, p in rows:
        arena = "-" if t.arena_bytes is None else f"{t.arena_bytes:,}"
        decoded = "-" if t.decoded_weight_bytes is None else f"{t.decoded_weight_bytes:,}"
        alt = "-"
        if t.arena_bytes_alt_decompression is not None:
            alt = f"{t.arena_bytes_alt_decompression:,} (+{t.alt_decompression_bytes:,})"
        tflm = f"{t.invoke_ratio['tflm']:.2f}x" if "tflm" in t.invoke_ratio else "-"
        litert = (
            f"{t.invoke_ratio['litert']:.2f}x / {t.invoke_ratio['litert_ref']:.2f}x"
            if "litert" in t.invoke_ratio
            else "-"
        )
        lines.append(
            f"| {name} | {t.file_bytes:,} | {t.ratio_fp32_tflite:.2f}x | {t.ratio_fp32_params:.2f}x | "
            f"{t.bits_per_weight:.2f} | {arena} | {decoded} | {alt} | {tflm} | {litert} | {_parity(p)} |"
        )
    lines += [
        "",
        "Notes: `micro` is TFLM only (TFLM_DECODE), `litert` is LiteRT only (INT2 FULLY_CONNECTED); `int4` runs on "
        "both and is exported from the same codes with one scale per Dense kernel. The TFLM arena is the smallest "
        "that allocates and invokes (bisection on the TFLM Python interpreter); `decoded B` are the weight copies "
        "TFLM unpacks into it. Parity: the int8 file vs each target on each runtime over 64 inputs (micro must be "
        "bit-exact); the int8 row compares LiteRT reference kernels with TFLM.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
