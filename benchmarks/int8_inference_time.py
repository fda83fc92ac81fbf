"""Inference time of a stripped ``activations="int8"`` model that computes the int8 kernels' rounding, against the
same model computing plain fake quantization and against the stripped float-activation model, in one run.

``strip`` links each activation quantizer to the requantization of its int8 op (``ptq_keras.activations.link``), so
that the Keras model agrees with the exported file to the LSB; that emulation is elementwise float64 work on every
int8 tensor. Rounds alternate between the variants so that load from other processes hits them alike; the report
gives the median time per batch of ``predict`` and the ratios. Run: ``.venv/bin/python
benchmarks/int8_inference_time.py``; writes ``benchmarks/results/int8_inference_time.md``.
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
flags.DEFINE_list("models", ["small_cnn", "ds_cnn"], "Models from ptq_keras.models.")
flags.DEFINE_integer("batch_size", 256, "Batch size of predict.")
flags.DEFINE_integer("batches", 20, "Batches per timed round.")
flags.DEFINE_integer("rounds", 5, "Timed rounds per variant (alternating).")
flags.DEFINE_string("out", "benchmarks/results/int8_inference_time.md", "Markdown report path.")


def _stripped(base, x, y, activations):
    q = ptq_keras.ternarize(base, sparsity=0.7, activations=activations)
    q.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    q.fit(x[:1024], y[:1024], batch_size=128, epochs=1, verbose=0)  # learns the activation ranges
    return ptq_keras.strip(q)


def _unlinked(plain):
    """The same stripped model computing plain fake quantization at every quantizer."""
    from ptq_keras import activations as act

    for layer in plain.layers:
        if act.is_activation_quantizer(layer):
            layer.requant = layer.mean_input = None
    return plain


def _round(model, x) -> float:
    start = time.perf_counter()
    model.predict(x, batch_size=FLAGS.batch_size, verbose=0)
    return (time.perf_counter() - start) / (len(x) // FLAGS.batch_size)


def _measure(name):
    from ptq_keras import models

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.random((FLAGS.batch_size * FLAGS.batches, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, len(x))
    base = models.build(name, (28, 28, 1), 10)
    variants = {
        "activations=None (float activations)": _stripped(base, x, y, None),
        'activations="int8", plain fake quantization': _unlinked(_stripped(base, x, y, "int8")),
        'activations="int8", the int8 kernels\' rounding (strip\'s default)': _stripped(base, x, y, "int8"),
    }
    times = {label: [] for label in variants}
    for model in variants.values():  # warm-up: tracing is not timed
        _round(model, x[: 2 * FLAGS.batch_size])
    for r in range(FLAGS.rounds):
        for label, model in variants.items():
            times[label].append(_round(model, x))
        print(f"{name} round {r + 1}/{FLAGS.rounds}: " + ", ".join(f"{t[-1] * 1e3:.1f} ms" for t in times.values()),
              flush=True)
    return {label: statistics.median(t) for label, t in times.items()}


def main(argv):
    del argv
    rows = {name: _measure(name) for name in FLAGS.models}
    lines = [
        "# Inference time of the stripped int8-activation model: the int8 kernels' rounding against plain fake "
        "quantization",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.machine()}, {os.cpu_count()} "
        f"CPUs, Python {platform.python_version()}; `predict` on batches of {FLAGS.batch_size}, {FLAGS.rounds} "
        f"alternating rounds of {FLAGS.batches} batches, median. Command: `.venv/bin/python "
        "benchmarks/int8_inference_time.py`",
        "",
        "| model | variant | ms / batch | ratio to float activations |",
        "|---|---|---|---|",
    ]
    for name, medians in rows.items():
        first = next(iter(medians.values()))
        for label, seconds in medians.items():
            lines.append(f"| {name} | {label} | {seconds * 1e3:.1f} | {seconds / first:.2f}x |")
    lines += ["", "The exported files are the same for both `int8` variants (the converter reads plain fake "
              "quantization)."]
    os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
    with open(FLAGS.out + ".tmp", "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(FLAGS.out + ".tmp", FLAGS.out)
    print("\n".join(lines))


if __name__ == "__main__":
    app.run(main)
