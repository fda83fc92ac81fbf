"""Export-path time on the 1.07M-parameter benchmark MLP: one parse and one serialization for all stages, against
the staged path that parses and re-serializes the flatbuffer at every stage (the export path before).

Both run in one process on the same int8 file, alternating, ``--rounds`` times; the table gives the median
seconds per target after the int8 conversion and the ratio. The TFLite converter itself (int8 file from Keras) is
timed once for scale.

Usage: python benchmarks/convert_time.py [--rounds 5] [--output benchmarks/results/convert_time.md]
"""

from __future__ import annotations

from ptq_keras import quiet

quiet.for_script(__name__)  # TensorFlow's start-up lines off standard error unless --verbose (before it loads)

import argparse
import datetime
import importlib
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
from export_size import build  # noqa: E402

from ptq_keras.tflite import decode, flatbuffer  # noqa: E402

convert = importlib.import_module("ptq_keras.tflite.convert")  # the package re-exports a function `convert`


def staged(int8: bytes, target: str) -> bytes:
    """The stages one after the other on bytes: every stage parses and serializes (and aligns) again."""
    if target == "micro":
        convert.check_ternary(int8)
        buf = convert.trim_for_tflm(decode.compress(int8, encoding="auto"))
    else:
        buf = convert.pack(int8, target)
    return convert.strip_names(buf)


def one_pass(int8: bytes, target: str) -> bytes:
    prep = convert.Prepared(plain=None, calibration=None, encoding="auto", strip=True, int8_files={False: int8})
    return convert.convert_prepared(prep, target).tflite


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--output", default=os.path.join("benchmarks", "results", "convert_time.md"))
    args = parser.parse_args()
    model = build(per_tensor=False)
    x = np.random.default_rng(0).uniform(0, 1, (100, 784)).astype(np.float32)
    start = time.perf_counter()
    int8 = convert.int8_tflite(model, x)
    converter_s = time.perf_counter() - start
    convert.check_layers = lambda *a, **k: None  # the Keras-side check is not part of the comparison
    rows = []
    for target in ("micro", "litert"):
        assert staged(int8, target) == one_pass(int8, target), f"{target}: the two paths differ"
        times = {"staged": [], "one pass": []}
        for _ in range(args.rounds):
            for name, fn in (("staged", staged), ("one pass", one_pass)):
                t = time.perf_counter()
                fn(int8, target)
                times[name].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append((target, med["staged"], med["one pass"]))
        print(f"{target}: staged {med['staged']:.3f} s, one pass {med['one pass']:.3f} s", flush=True)
    lines = [
        "# Export-path time: one parse and one serialization vs a parse per stage",
        "",
        f"Measured {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC} on {platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}, by `python benchmarks/convert_time.py "
        f"--rounds {args.rounds}`; median of alternating rounds.",
        "",
        f"Model: the 1.07M-parameter ternary MLP of `export_size.py`. The TFLite int8 conversion from Keras took "
        f"{converter_s:.2f} s once; the stages below start from its output (`micro`: ternary check, encoding "
        "`auto`, TFLM trim, name stripping; `litert`: INT2/INT4 packing, name stripping). Both paths give "
        "byte-identical files.",
        "",
        "| target | staged (parse + serialize per stage) | one pass | ratio |",
        "|---|---|---|---|",
    ]
    lines += [f"| {t} | {a:.3f} s | {b:.3f} s | {b / a:.2f}x |" for t, a, b in rows]
    flatbuffer.atomic_write(args.output, "\n".join(lines) + "\n")
    print(open(args.output).read())


if __name__ == "__main__":
    main()
