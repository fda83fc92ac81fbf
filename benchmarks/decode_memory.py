"""Bounded decode memory (``max_decode_bytes``): arena, file bytes, invoke time and bit-exactness of ``micro``
files whose large weights are split along output channels, against the unsplit file and ``int8`` on TFLM.

Models: the Fashion-MNIST demo's int8 file (``make demo`` writes ``out/demo/model_int8.tflite``) and the ternary
Dense 1024 -> 1024 -> 10 of ``benchmarks/encodings.py`` at 70% sparsity. One run; invoke times are ratios to the
int8 file (fastest of ``--repeats`` alternating invokes).

Usage: python benchmarks/decode_memory.py [--output benchmarks/results/decode_memory.md]
"""

from __future__ import annotations

from ptq_keras import quiet

quiet.for_script(__name__)  # TensorFlow's start-up lines off standard error unless --verbose (before it loads)

import argparse
import datetime
import importlib
import importlib.util
import os
import platform
import time

import numpy as np
from tflite_micro import runtime

from ptq_keras.compat import keras
from ptq_keras.tflite import decode, flatbuffer, micro, split

BOUNDS = (None, 65536, 16384, 4096)
_trim = importlib.import_module("ptq_keras.tflite.convert").trim_for_tflm
ENCODINGS = ("lut", "huffman")


def _encodings_module():
    """``benchmarks/encodings.py`` (its name clashes with the standard library's ``encodings``)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "encodings.py")
    spec = importlib.util.spec_from_file_location("bench_encodings", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fastest(pair, x, repeats: int) -> tuple[float, float]:
    times = []
    for _ in range(repeats):
        row = []
        for it in pair:
            it.set_input(x, 0)
            start = time.perf_counter()
            it.invoke()
            row.append(time.perf_counter() - start)
        times.append(row)
    return tuple(np.min(np.array(times), axis=0))


def _output(it, x) -> np.ndarray:
    it.set_input(x, 0)
    it.invoke()
    return np.array(it.get_output(0))


def bench(label: str, int8: bytes, repeats: int) -> list[str]:
    graph = flatbuffer.read(int8).subgraphs[0]
    shape = [max(int(d), 1) for d in graph.tensors[int(graph.inputs[0])].shape]
    rng = np.random.default_rng(0)
    inputs = [rng.integers(-128, 128, size=shape).astype(np.int8) for _ in range(4)]
    arena = 16 << 20
    ref = runtime.Interpreter.from_bytes(int8, arena_size=arena)
    expected = [_output(ref, x) for x in inputs]
    lines = [
        f"### {label}",
        "",
        f"int8: {len(int8):,} B, arena {micro.measure_arena(int8):,} B.",
        "",
        "| encoding | max_decode_bytes | layers split (parts) | file bytes | arena bytes | invoke vs int8 "
        "| bit-exact |",
        "|---|---|---|---|---|---|---|",
    ]
    for encoding in ENCODINGS:
        for bound in BOUNDS:
            model = flatbuffer.read(int8)
            rows = split.split_model(model, bound) if bound else []
            buf = _trim(decode.compress(flatbuffer.write(model), encoding=encoding))  # what target micro writes
            it = runtime.Interpreter.from_bytes(buf, arena_size=arena)
            exact = all(np.array_equal(_output(it, x), e) for x, e in zip(inputs, expected))
            base, mine = _fastest((ref, it), inputs[0], repeats)
            parts = f"{len(rows)} ({sum(r['parts'] for r in rows)})" if rows else "-"
            bound_label = f"{bound:,}" if bound else "none"
            lines.append(
                f"| {encoding} | {bound_label} | {parts} | {len(buf):,} | {micro.measure_arena(buf):,} "
                f"| {mine / base:.2f} | {exact} |"
            )
    return lines + [""]


def test_set_check(int8: bytes, bound: int = 16384) -> str:
    """Whether the split ``micro`` files (every encoding) give the int8 file's outputs on all 10k Fashion-MNIST
    test images, on TFLM."""
    from ptq_keras import data

    x, _ = data.load_numpy("fashion_mnist", "test")
    graph = flatbuffer.read(int8).subgraphs[0]
    q = graph.tensors[int(graph.inputs[0])].quantization
    scale, zero = float(q.scale[0]), int(q.zeroPoint[0])
    images = np.clip(np.round(x.astype(np.float32) / 255.0 / scale) + zero, -128, 127).astype(np.int8)
    arena = 16 << 20
    ref = runtime.Interpreter.from_bytes(int8, arena_size=arena)
    expected = [_output(ref, image[None]) for image in images]
    verdicts = []
    for encoding in ENCODINGS:
        model = flatbuffer.read(int8)
        split.split_model(model, bound)
        it = runtime.Interpreter.from_bytes(_trim(decode.compress(flatbuffer.write(model), encoding=encoding)),
                                            arena_size=arena)  # fmt: skip
        same = sum(np.array_equal(_output(it, image[None]), e) for image, e in zip(images, expected))
        verdicts.append(f"{encoding} {same:,} of {len(images):,} outputs identical")
    return (f"Over the whole Fashion-MNIST test set on TFLM, `max_decode_bytes={bound:,}` against the int8 file: "
            + "; ".join(verdicts) + ".")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=os.path.join("benchmarks", "results", "decode_memory.md"))
    parser.add_argument("--demo_int8", default=os.path.join("out", "demo", "model_int8.tflite"))
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    enc = _encodings_module()
    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(0)
    dense = enc.dense_model()
    enc.set_ternary(dense, 0.7, rng)
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Bounded decode memory (`max_decode_bytes`)",
        "",
        f"{now}; {enc.cpu_name()} ({platform.machine()}), {os.cpu_count()} CPUs, Python {platform.python_version()}. "
        "Command: `python benchmarks/decode_memory.py`. Arena: the smallest TFLM arena that allocates and invokes "
        "(`micro.measure_arena`); bit-exact: 4 random inputs against the int8 file on TFLM.",
        "",
    ]
    if os.path.isfile(args.demo_int8):
        with open(args.demo_int8, "rb") as f:
            demo = f.read()
        lines += bench(f"Fashion-MNIST demo model (`{args.demo_int8}`)", demo, args.repeats)
        lines += [test_set_check(demo), ""]
    else:
        lines += [f"`{args.demo_int8}` is missing: run `make demo` first.", ""]
    lines += bench("Dense 1024 -> 1024 -> 10, ternary at 70%", enc.convert(dense, rng), args.repeats)
    text = "\n".join(lines)
    print(text)
    flatbuffer.atomic_write(args.output, text)


if __name__ == "__main__":
    main()
