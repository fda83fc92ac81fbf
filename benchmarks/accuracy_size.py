"""Accuracy against file size on real Fashion-MNIST: float, int8, tfmot QAT, tfmot pruning, TWN and PTQ.

One command, every row the same model (``small_cnn``) and the same epoch budget: a float model trains for
``--float_epochs``; the float row continues it for ``--finetune_epochs`` more (``examples/train.py --resume``), and
every compressed row fine-tunes that same ``--float_epochs`` model for ``--finetune_epochs``. Accuracy is over the
whole 10k test set, in Keras and on the exported file (TFLM: the ``micro`` target for ternary rows, ``int8``
otherwise; the float row's fp32 .tflite on TFLM too).

    .venv/bin/python benchmarks/accuracy_size.py            # 30-60 minutes on 2 cores
    .venv/bin/python benchmarks/accuracy_size.py --quick    # smoke run, minutes, not for the record

Writes ``benchmarks/results/accuracy_size.md`` and ``.png`` (``--results_dir``); the runs go to ``--work_dir``.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import json
import os
import platform
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ptq_keras.tflite.flatbuffer import atomic_write  # noqa: E402

from examples import common, train  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_bool("quick", False, "Smoke run: 2048 examples per split, one epoch each; numbers are not meaningful.")
flags.DEFINE_integer("float_epochs", 8, "Epochs of the float model every row starts from.", lower_bound=1)
flags.DEFINE_integer("finetune_epochs", 3, "Epochs every row trains after that (the float row too).", lower_bound=1)
flags.DEFINE_float("finetune_learning_rate", 5e-4, "Adam learning rate of the fine-tuning rows.")
flags.DEFINE_list("ptq_sparsities", ["0.5", "0.7", "0.85", "0.9"], "Sparsities of the PTQ rows.")
flags.DEFINE_float("prune_sparsity", 0.7, "Sparsity of the tfmot pruning row.")
flags.DEFINE_string("work_dir", "out/bench/accuracy_size", "Where the runs (models, .tflite files, logs) go.")
flags.DEFINE_string("results_dir", "benchmarks/results", "Where accuracy_size.md and .png go (--quick: --work_dir).")

TERNARY_TARGETS = ("int8", "micro", "litert")


@dataclasses.dataclass
class Row:
    name: str
    keras_accuracy: float
    file_target: str
    tflm_accuracy: float
    files: dict  # target -> bytes
    encodings: list
    bits_per_weight: float
    arena_bytes: int | None
    step_time_s: float | None
    keras_accuracy_before_bn: float | None = None


def _config(**overrides) -> train.Config:
    quick = FLAGS.quick
    values = dict(
        model="small_cnn",
        batch_size=128,
        ramp_epochs=1,
        limit=2048 if quick else None,
        measure=True,
        eval_tflite=False,
        encoding="auto",
        seed=0,
    )
    values.update(overrides)
    return train.Config(**values)


def _row_from_run(name: str, res: dict, file_target: str, x_test, y_test) -> Row:
    export = res["export"]
    main = export[file_target]
    common.log(f"{name}: measuring {file_target} file accuracy on TFLM over {len(x_test)} test images")
    return Row(
        name=name,
        keras_accuracy=res["keras_accuracy"],
        file_target=file_target,
        tflm_accuracy=common.tflite_accuracy(main["file"], x_test, y_test, "tflm"),
        files={t: export[t]["file_bytes"] for t in export},
        encodings=main["encodings"],
        bits_per_weight=main["bits_per_weight"],
        arena_bytes=main["arena_bytes"],
        step_time_s=res["step_time_s"],
        keras_accuracy_before_bn=res.get("stripped_accuracy"),
    )


def _float_rows(work: str, x_test, y_test) -> tuple[list[Row], str]:
    """Train the float base model; continue it to the full budget (float row) and export int8 (int8 row)."""
    from ptq_keras import keras

    convert = importlib.import_module("ptq_keras.tflite.convert")  # the package re-exports a function `convert`

    base_dir = os.path.join(work, "float_base")
    full_dir = os.path.join(work, "float")
    float_cfg = dict(method="float", learning_rate=1e-3)
    train.run(_config(**float_cfg, epochs=FLAGS.float_epochs, out_dir=base_dir, export=()))
    shutil.rmtree(full_dir, ignore_errors=True)
    shutil.copytree(base_dir, full_dir)
    epochs = FLAGS.float_epochs + FLAGS.finetune_epochs
    res = train.run(_config(**float_cfg, epochs=epochs, out_dir=full_dir, resume=True, export=("int8",)))
    rows = [_row_from_run("int8 post-training quantization", res, "int8", x_test, y_test)]
    model = keras.models.load_model(res["model"], compile=False)
    fp32 = convert.float_tflite(model)
    fp32_path = os.path.join(full_dir, "tflite", "model_fp32.tflite")
    atomic_write(fp32_path, fp32)
    common.log("float32: measuring the fp32 .tflite on TFLM")
    rows.insert(
        0,
        Row(
            name="float32",
            keras_accuracy=res["keras_accuracy"],
            file_target="fp32",
            tflm_accuracy=common.tflite_accuracy(fp32, x_test, y_test, "tflm"),
            files={"fp32": len(fp32)},
            encodings=[],
            bits_per_weight=32.0,
            arena_bytes=None,
            step_time_s=res["step_time_s"],
        ),
    )
    return rows, os.path.join(base_dir, "model.h5")


def _finetune_rows(work: str, init_from: str, x_test, y_test) -> list[Row]:
    runs = [
        ("tfmot int8 QAT", "int8", dict(method="tfmot_qat", export=("int8",))),
        (
            f"tfmot pruning {FLAGS.prune_sparsity:.0%} + int8",
            "int8",
            dict(method="tfmot_prune", sparsity=FLAGS.prune_sparsity, export=("int8",)),
        ),
        ("TWN ternary", "micro", dict(method="twn", export=TERNARY_TARGETS)),
    ]
    for s in FLAGS.ptq_sparsities:
        ptq = dict(method="ptq", sparsity=float(s), export=TERNARY_TARGETS)
        runs.append((f"PTQ sparsity {float(s):g}", "micro", ptq))
    rows = []
    for name, target, options in runs:
        slug = name.split(" +")[0].lower().replace(" ", "_").replace("%", "")
        cfg = _config(
            **options,
            epochs=FLAGS.finetune_epochs,
            learning_rate=FLAGS.finetune_learning_rate,
            init_from=init_from,
            out_dir=os.path.join(work, slug),
        )
        common.log(f"row {name!r}: {cfg.method}, {cfg.epochs} epochs from {init_from}")
        rows.append(_row_from_run(name, train.run(cfg), target, x_test, y_test))
    return rows


def _pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats in both size (smaller) and accuracy (higher), by size."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -1.0
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def _plot(rows: list[Row], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(row.files[row.file_target] / 1024, 100 * row.tflm_accuracy) for row in rows]
    front = _pareto(points)
    fig, ax = plt.subplots(figsize=(8, 5))
    for row, (kb, acc) in zip(rows, points):
        ax.scatter(kb, acc, s=40, color="tab:red" if row.file_target == "micro" else "tab:blue", zorder=3)
        ax.annotate(row.name, (kb, acc), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "--", color="gray", label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("file bytes of the deployed .tflite (KiB, log scale)")
    ax.set_ylabel("test accuracy on TFLM (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(handles=[
        plt.Line2D([], [], marker="o", ls="", color="tab:blue", label="int8 / fp32 file"),
        plt.Line2D([], [], marker="o", ls="", color="tab:red", label="ternary micro file (TFLM_DECODE)"),
        plt.Line2D([], [], ls="--", color="gray", label="Pareto front"),
    ], fontsize=8, loc="best")  # fmt: skip
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def _markdown(rows: list[Row], meta: dict) -> str:
    float_row = rows[0]
    fp32_bytes = float_row.files["fp32"]
    lines = [
        "# Accuracy vs size: Fashion-MNIST, small_cnn",
        "",
        f"Measured {meta['date']} on {meta['machine']} by `{meta['command']}`"
        + (" (**--quick smoke run: not meaningful**)" if meta["quick"] else "")
        + ".",
        "",
        f"Every row: `small_cnn` (225k parameters), Adam, batch 128, {meta['train_examples']} training images. "
        f"A float model trains for {meta['float_epochs']} epochs; the float row continues it for "
        f"{meta['finetune_epochs']} more, every other row fine-tunes it for {meta['finetune_epochs']} epochs "
        f"(learning rate {meta['finetune_lr']:g}; PTQ and pruning ramp the sparsity cubically over the first epoch, "
        "then the PTQ mask freezes and its STE becomes `masked`; ternary models are stripped and their BatchNorm "
        "statistics re-estimated over 200 training batches). Accuracy over the whole "
        f"{meta['test_examples']}-image test set.",
        "",
        "| row | Keras acc | file acc (TFLM) | deployed file | file bytes | x smaller than fp32 file | bits/weight "
        "| TFLM arena bytes | train step time vs float | other targets (bytes) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        keras_acc = f"{100 * row.keras_accuracy:.2f}%"
        if row.keras_accuracy_before_bn is not None:
            keras_acc += f" ({100 * row.keras_accuracy_before_bn:.2f}% before BN re-estimation)"
        size = row.files[row.file_target]
        deployed = row.file_target + (f" ({', '.join(row.encodings)})" if row.encodings else "")
        others = ", ".join(f"{t} {b:,}" for t, b in row.files.items() if t != row.file_target) or "-"
        step = f"{row.step_time_s / float_row.step_time_s:.2f}x" if row.step_time_s and float_row.step_time_s else "-"
        lines.append(
            f"| {row.name} | {keras_acc} | {100 * row.tflm_accuracy:.2f}% | {deployed} | {size:,} "
            f"| {fp32_bytes / size:.1f}x | {row.bits_per_weight:.2f} "
            f"| {row.arena_bytes if row.arena_bytes is not None else '-'} | {step} | {others} |"
        )
    lines += [
        "",
        "- Deployed file: `micro` = int8 graph whose ternary weights are TFLM_DECODE encoded (runs on the TFLM "
        "interpreter only; encoding `auto`: per tensor the smallest of 2-bit LUT, Huffman and PRUNE, the chosen "
        "ones in brackets); `int8` = stock full-integer TFLite; `fp32` = float TFLite. `litert` (other targets) "
        "= INT2 fully connected + INT4 convolution weights, LiteRT only.",
        "- Bits/weight: weight payload bits of the deployed file per weight (scales, biases and the flatbuffer "
        "structure are in the file bytes, not here).",
        "- TFLM arena: smallest tensor arena with which the TFLM interpreter allocates and invokes the file "
        "(decoded TFLM_DECODE weights live in the arena).",
        f"- Step time: median wall time of a training step of the row's training model over its run, divided by "
        f"the float model's ({1000 * float_row.step_time_s:.1f} ms); measured on a machine shared with other jobs, "
        "so expect +-20% noise."
        if float_row.step_time_s
        else "- Step time: not measured.",
        "- Plot: `accuracy_size.png` (TFLM accuracy against deployed file bytes, Pareto front dashed).",
        "",
    ]
    return "\n".join(lines)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    common.quiet_logs()
    if FLAGS.quick:
        FLAGS.float_epochs, FLAGS.finetune_epochs = 1, 1
    for s in FLAGS.ptq_sparsities:
        if not 0.0 <= float(s) < 1.0:
            raise app.UsageError(f"--ptq_sparsities: {s} is outside [0, 1).")
    work = FLAGS.work_dir + ("_quick" if FLAGS.quick else "")
    os.makedirs(work, exist_ok=True)
    results_dir = work if FLAGS.quick else FLAGS.results_dir  # smoke results stay out of the record
    os.makedirs(results_dir, exist_ok=True)
    limit = 2048 if FLAGS.quick else None
    x_train, _ = common.load_split("fashion_mnist", "train", None, limit)
    x_test, y_test = common.load_split("fashion_mnist", "test", None, limit)
    started = datetime.datetime.now(datetime.UTC)
    rows, init_from = _float_rows(work, x_test, y_test)
    rows += _finetune_rows(work, init_from, x_test, y_test)
    minutes = (datetime.datetime.now(datetime.UTC) - started).total_seconds() / 60
    meta = {
        "date": started.strftime("%Y-%m-%d %H:%M UTC") + f" ({minutes:.0f} min)",
        "machine": f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()})",
        "command": "python benchmarks/accuracy_size.py" + (" --quick" if FLAGS.quick else ""),
        "quick": FLAGS.quick,
        "float_epochs": FLAGS.float_epochs,
        "finetune_epochs": FLAGS.finetune_epochs,
        "finetune_lr": FLAGS.finetune_learning_rate,
        "train_examples": len(x_train),
        "test_examples": len(x_test),
    }
    stem = "accuracy_size"
    md_path = os.path.join(results_dir, stem + ".md")
    atomic_write(md_path, _markdown(rows, meta).encode())
    atomic_write(
        os.path.join(work, "rows.json"),
        json.dumps({"meta": meta, "rows": [dataclasses.asdict(r) for r in rows]}, indent=1).encode(),
    )
    _plot(rows, os.path.join(results_dir, stem + ".png"), f"Fashion-MNIST small_cnn, {meta['date']}")
    common.log(f"wrote {md_path} and {stem}.png")
    print(open(md_path).read())


if __name__ == "__main__":
    app.run(main)
