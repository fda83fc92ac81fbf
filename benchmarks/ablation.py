"""Ablation of the PTQ options at sparsity 0.7 on real Fashion-MNIST, to choose defaults by measurement.

Every variant fine-tunes the same float ``small_cnn`` for the same epochs (``examples/train.py``'s ``run``) and
changes one option against the baseline (threshold ``sparsity``, STE ``identity``, no normalization, no decay,
per-channel selection and scale, sparsity ramped over the first epoch). BatchNorm re-estimation is measured in
every run: the accuracy before and after it.

    .venv/bin/python benchmarks/ablation.py --float_model=out/bench/accuracy_size/float_base/model.h5
    .venv/bin/python benchmarks/ablation.py --quick

Without ``--float_model`` a float model is trained first (``--float_epochs``). Writes
``benchmarks/results/ablation.md`` (``--quick``: into ``--work_dir``).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ptq_keras.tflite.flatbuffer import atomic_write  # noqa: E402

from examples import common, train  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_bool("quick", False, "Smoke run: 2048 examples per split, one epoch; numbers are not meaningful.")
flags.DEFINE_string("float_model", None, "Float small_cnn .h5 to fine-tune (default: train one first).")
flags.DEFINE_integer("float_epochs", 8, "Epochs of the float model when --float_model is not given.", lower_bound=1)
flags.DEFINE_integer("finetune_epochs", 3, "Fine-tuning epochs of every variant.", lower_bound=1)
flags.DEFINE_float("target_sparsity", 0.7, "Target sparsity of every variant.")
flags.DEFINE_string("work_dir", "out/bench/ablation", "Where the runs go.")
flags.DEFINE_string("results_dir", "benchmarks/results", "Where ablation.md goes (--quick: --work_dir).")

# (name, options changed against the baseline)
VARIANTS = (
    ("baseline", {}),
    ("ste=masked", {"ste": "masked"}),
    ("ste=clipped", {"ste": "clipped"}),
    # Per-channel L2 normalization cannot change a per-channel top-k: it matters with a layer-wide selection.
    ("normalize + selection=tensor", {"normalize": True, "selection": "tensor"}),
    ("decay=0.01", {"decay": 0.01}),
    ("decay=0.1", {"decay": 0.1}),
    ("selection=tensor", {"selection": "tensor"}),
    ("granularity=tensor", {"granularity": "tensor"}),
    ("no ramp (target from step 0, never frozen)", {"ramp_epochs": 0}),
    ("threshold=l2 (no sparsity target)", {"threshold": "l2"}),
)


def _run(name: str, options: dict, init_from: str, work: str, limit) -> dict:
    slug = "".join(c if c.isalnum() else "_" for c in name.split(" (")[0])
    cfg = train.Config(
        model="small_cnn",
        method="ptq",
        sparsity=FLAGS.target_sparsity,
        epochs=FLAGS.finetune_epochs,
        learning_rate=5e-4,
        init_from=init_from,
        export=(),
        limit=limit,
        out_dir=os.path.join(work, slug),
        **{"ramp_epochs": 1, **options},
    )
    common.log(f"variant {name!r}: {options or 'baseline options'}")
    res = train.run(cfg)
    from ptq_keras import keras

    model = keras.models.load_model(res["model"], compile=False)
    kernels = [model.get_layer(name).kernel.numpy() for name, stats in res["layers"].items() if stats["scale"]]
    return {
        "name": name,
        "options": options,
        "accuracy": res["keras_accuracy"],
        "accuracy_before_bn": res["stripped_accuracy"],
        "qat_accuracy": res["qat_accuracy"],
        "sparsity": sum(int((k == 0).sum()) for k in kernels) / sum(k.size for k in kernels),
        "step_time_s": res["step_time_s"],
    }


def _markdown(rows: list[dict], meta: dict) -> str:
    base = rows[0]
    lines = [
        f"# PTQ ablation: Fashion-MNIST, small_cnn, sparsity {meta['sparsity']:g}",
        "",
        f"Measured {meta['date']} on {meta['machine']} by `{meta['command']}`"
        + (" (**--quick smoke run: not meaningful**)" if meta["quick"] else "")
        + ".",
        "",
        f"Every variant fine-tunes the same float model ({meta['init_from']}) for {meta['epochs']} epochs (Adam 5e-4, "
        f"batch 128, {meta['train_examples']} training images) and changes one option against the baseline: "
        "threshold `sparsity` (exact top-k per channel), STE `identity`, no normalization, no decay, per-channel "
        "scale, sparsity ramped cubically over the first epoch, then the mask frozen and the STE `masked`. "
        f"Accuracy of the stripped ternary Keras model over the {meta['test_examples']}-image test set, after and "
        "before re-estimating BatchNorm statistics (200 training batches).",
        "",
        "| variant | accuracy | vs baseline | before BN re-estimation | BN re-estimation gain | QAT model | "
        "achieved sparsity | step time vs baseline |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        step = f"{r['step_time_s'] / base['step_time_s']:.2f}x" if r["step_time_s"] and base["step_time_s"] else "-"
        lines.append(
            f"| {r['name']} | {100 * r['accuracy']:.2f}% | {100 * (r['accuracy'] - base['accuracy']):+.2f} "
            f"| {100 * r['accuracy_before_bn']:.2f}% | {100 * (r['accuracy'] - r['accuracy_before_bn']):+.2f} "
            f"| {100 * r['qat_accuracy']:.2f}% | {r['sparsity']:.3f} | {step} |"
        )
    best = max(rows, key=lambda r: r["accuracy"])
    lines += [
        "",
        f"Best variant in this run: **{best['name']}** ({100 * best['accuracy']:.2f}%). One seed per variant: "
        "differences under about 0.3 points are within run-to-run noise.",
        "",
    ]
    return "\n".join(lines)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    common.quiet_logs()
    if FLAGS.float_model is not None and not os.path.exists(FLAGS.float_model):
        raise app.UsageError(f"--float_model {FLAGS.float_model!r} does not exist.")
    if FLAGS.quick:
        FLAGS.float_epochs, FLAGS.finetune_epochs = 1, 1
    limit = 2048 if FLAGS.quick else None
    work = FLAGS.work_dir + ("_quick" if FLAGS.quick else "")
    results_dir = work if FLAGS.quick else FLAGS.results_dir
    os.makedirs(results_dir, exist_ok=True)
    started = datetime.datetime.now(datetime.UTC)
    init_from = FLAGS.float_model
    if init_from is None:
        float_dir = os.path.join(work, "float")
        cfg = train.Config(method="float", epochs=FLAGS.float_epochs, export=(), limit=limit, out_dir=float_dir)
        init_from = train.run(cfg)["model"]
    rows = [_run(name, options, init_from, work, limit) for name, options in VARIANTS]
    x_train, _ = common.load_split("fashion_mnist", "train", None, limit)
    x_test, _ = common.load_split("fashion_mnist", "test", None, limit)
    minutes = (datetime.datetime.now(datetime.UTC) - started).total_seconds() / 60
    meta = {
        "date": started.strftime("%Y-%m-%d %H:%M UTC") + f" ({minutes:.0f} min)",
        "machine": f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()})",
        "command": "python benchmarks/ablation.py" + (" --quick" if FLAGS.quick else ""),
        "quick": FLAGS.quick,
        "sparsity": FLAGS.target_sparsity,
        "epochs": FLAGS.finetune_epochs,
        "init_from": f"`{os.path.relpath(init_from)}`",
        "train_examples": len(x_train),
        "test_examples": len(x_test),
    }
    path = os.path.join(results_dir, "ablation.md")
    atomic_write(path, _markdown(rows, meta).encode())
    atomic_write(os.path.join(work, "rows.json"), json.dumps({"meta": meta, "rows": rows}, indent=1).encode())
    common.log(f"wrote {path}")
    print(open(path).read())


if __name__ == "__main__":
    app.run(main)
