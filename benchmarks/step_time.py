"""PTQ training step time against the float model, measured in one run (batch 128).

Both models train on the same data with ``model.fit``; rounds alternate (float, PTQ, float, PTQ, ...) so that load
from other processes hits both alike, and the report gives the median time per step and the ratio. Target: at most
1.2x. Run: ``.venv/bin/python benchmarks/step_time.py`` (or ``make bench-step``); writes
``benchmarks/results/step_time.md``.
"""

from __future__ import annotations

from ptq_keras import quiet

quiet.for_script(__name__)  # TensorFlow's start-up lines off standard error unless --verbose (before it loads)

import os
import platform
import statistics
import time

import numpy as np
from absl import app, flags

import ptq_keras
from ptq_keras import keras

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "small_cnn", "Model from ptq_keras.models.")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_integer("steps", 40, "Training steps per timed round.")
flags.DEFINE_integer("rounds", 5, "Timed rounds per model (alternating).")
flags.DEFINE_string("out", "benchmarks/results/step_time.md", "Markdown report path.")


def _compiled(model):
    model.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _round(model, x, y) -> float:
    start = time.perf_counter()
    model.fit(x, y, batch_size=FLAGS.batch_size, epochs=1, verbose=0, shuffle=False)
    return (time.perf_counter() - start) / (len(x) // FLAGS.batch_size)


def main(argv):
    del argv
    from ptq_keras import models

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.random((FLAGS.batch_size * FLAGS.steps, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, len(x))
    variants = {"float": _compiled(models.build(FLAGS.model, (28, 28, 1), 10))}
    base = variants["float"]
    variants["ptq (mask every step)"] = _compiled(ptq_keras.ternarize(base, sparsity=0.7))
    variants["ptq (mask every 100 steps)"] = _compiled(ptq_keras.ternarize(base, sparsity=0.7, frequency=100))
    times = {name: [] for name in variants}
    for model in variants.values():  # warm-up: tracing and the first steps are not timed
        _round(model, x[: 4 * FLAGS.batch_size], y[: 4 * FLAGS.batch_size])
    for r in range(FLAGS.rounds):
        for name, model in variants.items():
            times[name].append(_round(model, x, y))
        print(f"round {r + 1}/{FLAGS.rounds}: " + ", ".join(f"{n} {t[-1] * 1e3:.1f} ms" for n, t in times.items()),
              flush=True)
    median = {name: statistics.median(t) for name, t in times.items()}
    lines = [
        f"# PTQ training step time vs float ({FLAGS.model}, batch {FLAGS.batch_size})",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}; {FLAGS.rounds} alternating rounds of {FLAGS.steps} steps, median.",
        "Command: `.venv/bin/python benchmarks/step_time.py`",
        "",
        "| variant | ms / step | ratio to float |",
        "|---|---|---|",
    ]
    for name, value in median.items():
        lines.append(f"| {name} | {value * 1e3:.1f} | {value / median['float']:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(os.path.dirname(FLAGS.out), exist_ok=True)
    with open(FLAGS.out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    app.run(main)
