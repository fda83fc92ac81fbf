"""A flash budget against a uniform sparsity of the same size: ``ternarize(float_model, flash_budget=N,
budget_data=x[:256])`` versus ``ternarize(float_model, sparsity=s)`` with the smallest uniform ``s`` whose ``micro``
file (``encoding="auto"``) also fits ``N`` bytes, on the Fashion-MNIST demo model over several seeds.

Per seed the float ``small_cnn`` trains 6 epochs (Adam 1e-3, batch 128; reused from ``benchmarks/ablation.py``'s
cache when present), then each variant is the plain recipe: ``compile`` with Adam, ``fit`` 4 epochs, ``strip`` with
BatchNorm re-estimation, export ``micro`` (auto); accuracy of that file on TFLM over the 10k test set.

    .venv/bin/python benchmarks/flash_budget.py                     # 40,000 B, seeds 0 1 2

Runs are cached in ``--work_dir``; writes ``benchmarks/results/flash_budget.md``.
"""

from __future__ import annotations

from ptq_keras import quiet

quiet.for_script(__name__)  # TensorFlow's start-up lines off standard error unless --verbose (before it loads)

import datetime
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from examples import common  # noqa: E402
from ptq_keras.tflite.flatbuffer import atomic_write  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("budget", 40_000, "Flash budget of the micro file, bytes.", lower_bound=1)
flags.DEFINE_integer("seeds", 3, "Number of seeds (0 .. N-1).", lower_bound=1)
flags.DEFINE_integer("epochs", 4, "Fine-tuning epochs.", lower_bound=1)
flags.DEFINE_string("work_dir", "out/bench/flash_budget", "Cache of the runs.")
flags.DEFINE_string("float_cache", "out/bench/ablation/small_cnn", "Where benchmarks/ablation.py keeps float models.")
flags.DEFINE_string("output", "benchmarks/results/flash_budget.md", "The table.")

UNIFORM_GRID = tuple(np.round(np.arange(0.5, 0.96, 0.025), 3))
BATCH = 128


def _loss():
    from ptq_keras import keras

    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _float_model(seed: int, x, y):
    return common.float_model("small_cnn", seed, x, y, (FLAGS.float_cache, FLAGS.work_dir), FLAGS.work_dir)



def _uniform_sparsity(float_model, x) -> float:
    """The smallest uniform sparsity of UNIFORM_GRID whose micro file fits the budget (sized like the allocator)."""
    from ptq_keras import budget
    from ptq_keras.core.layers import kernel_attributes

    layers = [layer for layer in float_model.layers if kernel_attributes(layer)]
    for s in UNIFORM_GRID:
        kernels = {
            (layer.name, attr): budget._project(getattr(layer, attr).numpy(), dims, float(s), {})
            for layer in layers
            for attr, dims in kernel_attributes(layer)
        }
        if budget._micro_bytes(float_model, kernels, x)[0] <= FLAGS.budget:
            return float(s)
    raise app.UsageError(f"no uniform sparsity up to {UNIFORM_GRID[-1]} fits {FLAGS.budget:,} B.")


def _run(key: str, seed: int, data) -> dict:
    import ptq_keras
    from ptq_keras import keras
    from ptq_keras import tflite as ptq_tflite

    path = os.path.join(FLAGS.work_dir, f"b{FLAGS.budget}_{common.default_recipe()}", f"{key}_seed{seed}.json")
    if (done := common.cached(path)) is not None:
        return done
    x, y, x_test, y_test = data
    float_model = _float_model(seed, x, y)
    keras.utils.set_random_seed(1000 + seed)
    if key == "budget":
        q = ptq_keras.ternarize(float_model, flash_budget=FLAGS.budget, budget_data=x[:256])
        sparsities = dict(q.ptq_allocation.sparsities)
    else:
        s = _uniform_sparsity(float_model, x[:256])
        q = ptq_keras.ternarize(float_model, sparsity=s)
        sparsities = {"all": s}
    q.compile(keras.optimizers.Adam(), _loss(), ["accuracy"])
    q.fit(x, y, epochs=FLAGS.epochs, batch_size=BATCH, verbose=2)
    plain = ptq_keras.strip(q, batchnorm_data=x)
    micro = ptq_tflite.convert(plain, x[:500], target="micro", encoding="auto")
    result = {
        "key": key,
        "seed": seed,
        "sparsities": sparsities,
        "file_bytes": len(micro),
        "accuracy": common.tflite_accuracy(micro, x_test, y_test, "tflm"),
    }
    atomic_write(path, json.dumps(result, indent=1).encode())
    return result


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    common.quiet_logs()
    started = time.time()
    x, y = common.load_split("fashion_mnist", "train", None, None)
    x_test, y_test = common.load_split("fashion_mnist", "test", None, None)
    data = (x, y, x_test, y_test)
    runs = {key: [] for key in ("budget", "uniform")}
    for seed in range(FLAGS.seeds):
        for key in runs:
            common.log(f"seed {seed}: {key}")
            runs[key].append(_run(key, seed, data))
    lines = [
        f"# Flash budget {FLAGS.budget:,} B against a uniform sparsity (Fashion-MNIST `small_cnn`)",
        "",
        f"Measured {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC on {platform.node()} "
        f"({platform.machine()}, {os.cpu_count()} CPUs; {(time.time() - started) / 60:.0f} min for the runs not "
        f"cached) by `python benchmarks/flash_budget.py --budget={FLAGS.budget} --seeds={FLAGS.seeds} "
        f"--epochs={FLAGS.epochs}`. {FLAGS.epochs} fine-tuning epochs from the "
        f"seed's float model with the library's defaults (ste={common.default_ste()!r}); `micro` file with "
        '`encoding="auto"`, accuracy on TFLM over the 10k test set.',
        "",
        "| seed | flash_budget: sparsities | file bytes | accuracy % | uniform sparsity | file bytes | accuracy % "
        "| budget - uniform |",
        "|---|---|---|---|---|---|---|---|",
    ]
    diffs = []
    for b, u in zip(runs["budget"], runs["uniform"]):
        diff = 100 * (b["accuracy"] - u["accuracy"])
        diffs.append(diff)
        chosen = ", ".join(f"{k} {v:g}" for k, v in b["sparsities"].items())
        lines.append(
            f"| {b['seed']} | {chosen} | {b['file_bytes']:,} | {100 * b['accuracy']:.2f} | "
            f"{u['sparsities']['all']:g} | {u['file_bytes']:,} | {100 * u['accuracy']:.2f} | {diff:+.2f} |"
        )
    sd = float(np.std(diffs, ddof=1)) if len(diffs) > 1 else float("nan")
    lines += ["", f"Paired difference (budget - uniform): {np.mean(diffs):+.2f} +- {sd:.2f} points over "
              f"{len(diffs)} seed(s).", ""]  # fmt: skip
    text = "\n".join(lines)
    atomic_write(FLAGS.output, text.encode())
    print(text)


if __name__ == "__main__":
    app.run(main)
