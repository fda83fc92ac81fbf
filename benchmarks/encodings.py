"""TFLM_DECODE encodings on ternary int8 models: bytes, bits per weight vs the entropy bound, TFLM invoke
time vs int8, arena with and without alternate decompression memory, bit-exactness vs int8. Every file is what
target ``micro`` wrote when these results were measured (``decode.compress`` then ``trim_for_tflm``; the slim
writer and the default split came later, see micro_size.py).

(a) Dense 1024 -> 1024 -> 10 (~1.06M weights) at sparsity 0.5 / 0.7 / 0.85 / 0.95.
(b) The demo's Fashion-MNIST int8 file (out/demo, from `make demo`) with every encoding.
(c) ResNet-18-shaped (224x224x3, 11.7M weights, random ternary weights) at 0.5 / 0.7 / 0.85 / 0.9 / 0.95: file
    bytes per encoding; at 85% (huffman, huffman_group) and 90% (huffman_group) one TFLM invoke against int8:
    bit-exactness, invoke time, arena. Its int8 conversions (one per sparsity) are cached under out/.

Usage: python benchmarks/encodings.py [--skip-resnet] [--output benchmarks/results/encodings.md]
Prints markdown and writes it to --output.
"""

from __future__ import annotations

from ptq_keras import quiet

quiet.for_script(__name__)  # TensorFlow's start-up lines off standard error unless --verbose (before it loads)

import argparse
import datetime
import importlib
import os
import platform
import sys
import tempfile
import time

import numpy as np
from tflite_micro import __version__ as tflm_version
from tflite_micro import runtime

from ptq_keras.compat import keras, tf
from ptq_keras.tflite import decode, flatbuffer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from examples.common import cpu_name  # noqa: E402

SPARSITIES = (0.5, 0.7, 0.85, 0.95)
ENCODINGS = ("lut", "huffman", "prune", "huffman_group", "auto")
RESNET_SPARSITIES = (0.5, 0.7, 0.85, 0.9, 0.95)
RESNET_INVOKES = ((0.85, "huffman"), (0.85, "huffman_group"), (0.9, "huffman_group"))
LATENCY_BUDGET = 0.5
CACHE = os.path.join("out", "bench_encodings")
PAPER = "955 KB / 939 KB"
WEIGHT_OPS = ("FULLY_CONNECTED", "CONV_2D", "DEPTHWISE_CONV_2D")


# The package re-exports the function ``convert`` under its module's name.
trim_for_tflm = importlib.import_module("ptq_keras.tflite.convert").trim_for_tflm


def micro_file(int8: bytes, encoding: str, latency_budget: float | None = None) -> bytes:
    """The encoded file without the quantization parameters TFLM never reads (target ``micro`` before its slim
    writer and default split)."""
    return trim_for_tflm(decode.compress(int8, encoding=encoding, latency_budget=latency_budget))


# ----------------------------------------------------------------------------- models
def set_ternary(model: keras.Model, sparsity: float, rng: np.random.Generator) -> None:
    """Kernels alpha_c * {-1, 0, +1} per output channel, alpha_c He-scaled for the kept fraction."""
    for layer in model.layers:
        kernel = getattr(layer, "kernel", None)
        if kernel is None:
            continue
        shape = tuple(kernel.shape)
        fan_in = int(np.prod(shape[:-1]))
        p = [(1 - sparsity) / 2, sparsity, (1 - sparsity) / 2]
        signs = rng.choice([-1.0, 0.0, 1.0], size=(fan_in, shape[-1]), p=p)
        alpha = np.sqrt(2.0 / (fan_in * max(1.0 - sparsity, 1e-3))) * rng.uniform(0.8, 1.2, size=(1, shape[-1]))
        kernel.assign((signs * alpha).reshape(shape).astype(np.float32))


def dense_model() -> keras.Model:
    inputs = keras.Input((1024,))
    x = keras.layers.Dense(1024, activation="relu")(inputs)
    return keras.Model(inputs, keras.layers.Dense(10)(x))


def resnet18() -> keras.Model:
    """ResNet-18 shapes (ImageNet): conv7x7/2, maxpool, 4 stages x 2 basic blocks, GAP, Dense 1000; no BN."""

    def block(x, filters: int, stride: int):
        y = keras.layers.Conv2D(filters, 3, stride, padding="same", activation="relu")(x)
        y = keras.layers.Conv2D(filters, 3, 1, padding="same")(y)
        shortcut = x if stride == 1 and x.shape[-1] == filters else keras.layers.Conv2D(filters, 1, stride)(x)
        return keras.layers.ReLU()(keras.layers.Add()([y, shortcut]))

    inputs = keras.Input((224, 224, 3))
    x = keras.layers.Conv2D(64, 7, 2, padding="same", activation="relu")(inputs)
    x = keras.layers.MaxPooling2D(3, 2, padding="same")(x)
    for filters, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        x = block(block(x, filters, stride), filters, 1)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(1000)(x))


def convert(model: keras.Model, rng: np.random.Generator, int8: bool = True, samples: int = 8) -> bytes:
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if int8:
        data = rng.normal(size=(samples, *model.input_shape[1:])).astype(np.float32)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([d[None]] for d in data)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    return converter.convert()


# ----------------------------------------------------------------------------- TFLM measurements
def interpreter(buf: bytes, arena_size: int, alt: int = 0):
    return runtime.Interpreter.from_bytes(buf, arena_size=arena_size, alt_decompression_memory_size=alt)


def run_once(it, x: np.ndarray) -> tuple[np.ndarray, float]:
    it.set_input(x, 0)
    start = time.perf_counter()
    it.invoke()
    return np.array(it.get_output(0)), time.perf_counter() - start


def invoke_seconds(pair: tuple, x: np.ndarray, repeats: int) -> tuple[float, float]:
    """Fastest of ``repeats`` invokes of each interpreter in ``pair``, invoked alternately so that load
    from other processes on a shared machine hits both alike."""
    times = np.array([[run_once(it, x)[1] for it in pair] for _ in range(repeats)])
    return tuple(times.min(axis=0))


def arena_bytes(it) -> int:
    """'Arena allocation total' of the recording allocator (printed by the C++ runtime on stderr)."""
    saved = os.dup(2)
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 2)
        try:
            it.print_allocations()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        log.seek(0)
        text = log.read().decode(errors="replace")
    for line in text.splitlines():
        if "Arena allocation total" in line:
            return int(line.split("total")[1].split()[0])
    raise RuntimeError(f"no arena total in the allocator report: {text[:200]!r}")


def weight_stats(buf: bytes) -> tuple[float, float, int]:
    """(payload bits per weight, entropy bound bits per weight, largest decoded tensor bytes)."""
    rows = decode.describe(buf)
    elements = sum(r["elements"] for r in rows)
    bits = 8.0 * sum(r["payload_bytes"] for r in rows) / elements
    entropy = sum(r["entropy_bound_bits"] * r["elements"] for r in rows) / elements
    return bits, entropy, max(r["decode_scratch_bytes"] for r in rows)


def mix(buf: bytes) -> str:
    rows = decode.describe(buf)
    names = sorted({r["encoding"] for r in rows})
    return "+".join(f"{n}:{sum(r['encoding'] == n for r in rows)}" for n in names)


# ----------------------------------------------------------------------------- benchmarks
def bench_dense(repeats: int) -> list[str]:
    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(0)
    model = dense_model()
    fp32_bytes = len(convert(model, rng, int8=False))
    x = rng.integers(-128, 128, size=(1, 1024)).astype(np.int8)
    arena = 8 << 20
    lines = [
        f"fp32 .tflite: {fp32_bytes:,} bytes. Ratios: fp32 bytes / file bytes; invoke time / int8 invoke time "
        f"(fastest of {repeats} alternating invokes each, one run); arena = 'Arena allocation total' of the TFLM "
        "recording allocator; alt: with `alt_decompression_memory_size` = largest decoded tensor.",
        "",
        "| sparsity | encoding | file bytes | x smaller than fp32 | bits/weight | entropy bound | invoke vs int8 "
        "| arena | arena with alt | bit-exact vs int8 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for sparsity in SPARSITIES:
        set_ternary(model, sparsity, rng)
        int8 = convert(model, rng)
        ref_it = interpreter(int8, arena)
        expected, _ = run_once(ref_it, x)
        int8_time = invoke_seconds((ref_it,), x, repeats)[0]
        lines.append(
            f"| {sparsity:.2f} | int8 | {len(int8):,} | {fp32_bytes / len(int8):.1f} | 8.00 | - "
            f"| 1.00 ({int8_time * 1e6:.0f} us) "
            f"| {arena_bytes(ref_it):,} | - | - |"
        )
        for encoding, budget in [(e, None) for e in ENCODINGS] + [("auto", LATENCY_BUDGET)]:
            buf = micro_file(int8, encoding, budget)
            bits, entropy, largest = weight_stats(buf)
            it = interpreter(buf, arena)
            got, _ = run_once(it, x)
            base_time, time_ = invoke_seconds((ref_it, it), x, repeats)
            ratio = time_ / base_time
            alt_it = interpreter(buf, arena, alt=largest + 64)
            alt_got, _ = run_once(alt_it, x)
            exact = np.array_equal(got, expected) and np.array_equal(alt_got, expected)
            label = f"auto ({mix(buf)})" if encoding == "auto" else encoding
            if budget is not None:
                label = f"auto, latency_budget={budget} ({mix(buf)})"
            lines.append(
                f"| {sparsity:.2f} | {label} | {len(buf):,} | {fp32_bytes / len(buf):.1f} | {bits:.2f} "
                f"| {entropy:.2f} | {ratio:.2f} | {arena_bytes(it):,} | {arena_bytes(alt_it):,} | {exact} |"
            )
    return lines


def resnet_int8(sparsity: float) -> bytes:
    """The int8 ResNet-18-shaped model with random ternary weights, converted once and cached under out/."""
    path = os.path.join(CACHE, f"resnet18_ternary{round(sparsity * 100)}_int8.tflite")
    if not os.path.exists(path):
        rng = np.random.default_rng(round(sparsity * 100))
        keras.utils.set_random_seed(1)
        model = resnet18()
        set_ternary(model, sparsity, rng)
        flatbuffer.atomic_write(path, convert(model, rng, samples=2))
    with open(path, "rb") as f:
        return f.read()


def bench_resnet() -> list[str]:
    lines = [
        f"Paper (ternary ResNet-18, entropy coded, not runnable as published): {PAPER}.",
        "",
        "| sparsity | encoding | file bytes | bits/weight | entropy bound |",
        "|---|---|---|---|---|",
    ]
    kept = {}
    for sparsity in RESNET_SPARSITIES:
        int8 = resnet_int8(sparsity)
        lines.append(f"| {sparsity:.2f} | int8 | {len(int8):,} | 8.000 | - |")
        kept[(sparsity, "int8")] = int8
        for encoding in ENCODINGS:
            buf = micro_file(int8, encoding)
            bits, entropy, _ = weight_stats(buf)
            label = f"auto ({mix(buf)})" if encoding == "auto" else encoding
            lines.append(f"| {sparsity:.2f} | {label} | {len(buf):,} | {bits:.3f} | {entropy:.3f} |")
            if (sparsity, encoding) in RESNET_INVOKES:
                kept[(sparsity, encoding)] = buf
    x = np.random.default_rng(2).integers(-128, 128, size=(1, 224, 224, 3)).astype(np.int8)
    arena = 64 << 20
    lines += [
        "",
        "One TFLM invoke of the encoded file against the int8 file (invoke time: fastest of 2 more, alternating; "
        "arena: the recording allocator's total, decoded tensors and the group chain inside):",
        "",
        "| sparsity | encoding | file bytes | KB (1000 B) | bit-exact vs int8 | invoke s (int8 s) | arena (int8) |",
        "|---|---|---|---|---|---|---|",
    ]
    for sparsity, encoding in RESNET_INVOKES:
        buf = kept[(sparsity, encoding)]
        int8_it, encoded_it = interpreter(kept[(sparsity, "int8")], arena), interpreter(buf, arena)
        expected, _ = run_once(int8_it, x)
        got, _ = run_once(encoded_it, x)
        int8_time, time_ = invoke_seconds((int8_it, encoded_it), x, 2)
        lines.append(
            f"| {sparsity:.2f} | {encoding} | {len(buf):,} | {len(buf) / 1000:.1f} | {np.array_equal(got, expected)} "
            f"| {time_:.2f} ({int8_time:.2f}) | {arena_bytes(encoded_it):,} ({arena_bytes(int8_it):,}) |"
        )
    return lines


def bench_demo(path: str, repeats: int) -> list[str]:
    """The Fashion-MNIST demo's int8 file (``make demo``), re-encoded with every encoding."""
    if not os.path.isfile(path):
        return [f"`{path}` is missing: run `make demo` first."]
    with open(path, "rb") as f:
        int8 = f.read()
    graph = flatbuffer.read(int8).subgraphs[0]
    shape = [max(int(d), 1) for d in graph.tensors[int(graph.inputs[0])].shape]
    x = np.random.default_rng(3).integers(-128, 128, size=shape).astype(np.int8)
    arena = 4 << 20
    ref_it = interpreter(int8, arena)
    expected, _ = run_once(ref_it, x)
    lines = [
        f"`{path}` (small_cnn, 224,800 weights, sparsity 0.7 after training): {len(int8):,} bytes as int8.",
        "",
        "| encoding | file bytes | bits/weight | entropy bound | invoke vs int8 | arena (int8 "
        f"{arena_bytes(ref_it):,}) | bit-exact vs int8 |",
        "|---|---|---|---|---|---|---|",
    ]
    for encoding in ENCODINGS:
        buf = micro_file(int8, encoding)
        bits, entropy, _ = weight_stats(buf)
        it = interpreter(buf, arena)
        got, _ = run_once(it, x)
        base_time, time_ = invoke_seconds((ref_it, it), x, repeats)
        label = f"auto ({mix(buf)})" if encoding == "auto" else encoding
        lines.append(
            f"| {label} | {len(buf):,} | {bits:.2f} | {entropy:.2f} | {time_ / base_time:.2f} | {arena_bytes(it):,} "
            f"| {np.array_equal(got, expected)} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=os.path.join("benchmarks", "results", "encodings.md"))
    parser.add_argument("--skip-resnet", action="store_true", help="only the ~1M-weight dense model")
    parser.add_argument("--repeats", type=int, default=20, help="invokes per timing (fastest counts)")
    parser.add_argument("--demo_int8", default=os.path.join("out", "demo", "model_int8.tflite"),
                        help="the demo's int8 file for section (b)")  # fmt: skip
    args = parser.parse_args()
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# TFLM_DECODE encodings of ternary weights",
        "",
        f"{now}; {cpu_name()} ({platform.machine()}), {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, TensorFlow {tf.__version__}, tflite-micro {tflm_version}. "
        "Command: `python benchmarks/encodings.py`.",
        "",
        "## (a) Dense 1024 -> 1024 -> 10 (1,058,816 weights)",
        "",
        *bench_dense(args.repeats),
    ]
    lines += ["", "## (b) The Fashion-MNIST demo model", "", *bench_demo(args.demo_int8, args.repeats)]
    if not args.skip_resnet:
        lines += ["", "## (c) ResNet-18-shaped, 224x224x3, 11.7M ternary weights", "", *bench_resnet()]
    text = "\n".join(lines) + "\n"
    print(text)
    flatbuffer.atomic_write(args.output, text)


if __name__ == "__main__":
    main()
