"""Where the bytes of a ``micro`` file go, and what the slim file saves, on the models microcontrollers run.

For each model (``small_cnn``, ``ds_cnn``, ``ds_resnet`` on Fashion-MNIST) and sparsity: the ``int8`` file and the
``micro`` file (``encoding="auto"`` and ``"lut"``) as ``export`` writes them, and the same ``micro`` content with
names, signatures and metadata kept and serialized by the stock flatbuffers writer (one copy of every vector and
table per use: the layout the exporter wrote before the slim file). Each file's bytes are split into weights,
biases, scales, zero points, names, metadata and structure (``slim.breakdown``). At ``--check_sparsity`` the
``micro`` file ``export`` writes by default is run on TFLM against the ``int8`` file over the whole test set.

The models are fine-tuned briefly (``--float_epochs``, ``--ptq_epochs`` on ``--train_limit`` images): file bytes
depend on the support and the sparsity, hardly on accuracy. Trained models are cached in ``--work_dir``.

Usage: python benchmarks/micro_size.py [--models=ds_cnn] [--sparsities=0.5,0.7,0.9]
Writes ``benchmarks/results/micro_size.md`` (``--output``).
"""

from __future__ import annotations

from ptq_keras import quiet

quiet.for_script(__name__)  # TensorFlow's start-up lines off standard error unless --verbose (before it loads)

import datetime
import os
import platform
import sys
import time

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from examples import common  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["small_cnn", "ds_cnn", "ds_resnet"], "Models (ptq_keras.models names).")
flags.DEFINE_list("sparsities", ["0.5", "0.7", "0.9"], "Sparsities.")
flags.DEFINE_integer("float_epochs", 2, "Epochs of float training.")
flags.DEFINE_integer("ptq_epochs", 1, "Epochs of PTQ fine-tuning.")
flags.DEFINE_integer("train_limit", 20000, "Training images used.")
flags.DEFINE_float("check_sparsity", 0.7, "Sparsity whose micro file is run against int8 over the test set.")
flags.DEFINE_integer("check_limit", None, "Test images of the bit-exactness check (default: all).")
flags.DEFINE_string("work_dir", "out/bench/micro_size", "Cache of the trained models.")
flags.DEFINE_string("output", "benchmarks/results/micro_size.md", "The markdown report.")

PARTS = ("weights", "biases", "scales", "zero_points", "names", "metadata", "structure")


def _plain(name: str, sparsity: float, x: np.ndarray, y: np.ndarray):
    import ptq_keras
    from ptq_keras import keras

    folder = os.path.join(FLAGS.work_dir, name)
    path = os.path.join(folder, f"ptq_{sparsity}_e{FLAGS.ptq_epochs}.h5")
    if os.path.exists(path):
        return keras.models.load_model(path, compile=False)
    model = common.float_model(name, 0, x, y, caches=(folder,), save_dir=folder, epochs=FLAGS.float_epochs)
    common.log(f"{name} {sparsity}: PTQ fine-tuning, {FLAGS.ptq_epochs} epoch(s)")
    qmodel = ptq_keras.ternarize(model, sparsity=sparsity)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    qmodel.compile(keras.optimizers.Adam(5e-4), loss, ["accuracy"])
    qmodel.fit(x, y, epochs=FLAGS.ptq_epochs, batch_size=128, verbose=2)
    plain = ptq_keras.strip(qmodel, batchnorm_data=x[:4096])
    plain.save(path + ".tmp.h5")
    os.replace(path + ".tmp.h5", path)
    return plain


def _mismatches(a: bytes, b: bytes, x: np.ndarray) -> int:
    """Test images whose outputs differ between two files on TFLM."""
    from ptq_keras.tflite import predict

    first, second = (predict(buf, x, "tflm").reshape(len(x), -1) for buf in (a, b))
    return int(np.sum(np.any(first != second, axis=1)))


def _merge_decodes(buf: bytes, group: int) -> bytes:
    """``buf`` with every ``group`` consecutive ``TFLM_DECODE`` ops made one (their input pairs and outputs in
    order, at the first one's place): TFLM decodes several tensors in one op, so the file holds fewer ops, but
    each decoded tensor then lives from that op on."""
    from ptq_keras.tflite import flatbuffer, slim

    model = flatbuffer.read(buf)
    graph = model.subgraphs[0]
    ops = list(graph.operators)
    decodes = [i for i, op in enumerate(ops) if flatbuffer.builtin_name(model, op.opcodeIndex) == "TFLM_DECODE"]
    groups = [decodes[i : i + group] for i in range(0, len(decodes), group)]
    first = {members[0]: members for members in groups}
    merged = {i for members in groups for i in members[1:]}
    kept = []
    for i, op in enumerate(ops):
        if i in merged:
            continue
        if i in first:
            op.inputs = np.concatenate([ops[j].inputs for j in first[i]]).astype(np.int32)
            op.outputs = np.concatenate([ops[j].outputs for j in first[i]]).astype(np.int32)
        kept.append(op)
    graph.operators = kept
    return slim.write(model)


def _encodings(buf: bytes) -> str:
    from ptq_keras.tflite import decode

    counts: dict[str, int] = {}
    for row in decode.describe(buf):
        counts[row["encoding"]] = counts.get(row["encoding"], 0) + 1
    return ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))


def main(argv) -> None:
    del argv
    common.quiet_logs()
    from ptq_keras.tflite import convert, flatbuffer, micro, predict, slim

    started = time.time()
    x, y = common.load_split("fashion_mnist", "train", None, FLAGS.train_limit)
    x_test, _ = common.load_split("fashion_mnist", "test", None, FLAGS.check_limit)
    calibration = x[:200]
    sizes, parts, checks, merges = [], [], [], []
    for name in FLAGS.models:
        for sparsity in (float(s) for s in FLAGS.sparsities):
            plain = _plain(name, sparsity, x, y)
            int8 = convert(plain, calibration, target="int8")
            whole = dict(encoding="auto", max_decode_bytes=None)
            auto = convert(plain, calibration, target="micro", **whole)
            lut = convert(plain, calibration, target="micro", encoding="lut", max_decode_bytes=None)
            default = convert(plain, calibration, target="micro", encoding="auto")  # max_decode_bytes="auto"
            named = convert(plain, calibration, target="micro", keep_names=True, **whole)
            stock = flatbuffer.write(flatbuffer.read(named))  # the same content, no sharing, names kept
            sizes.append((name, sparsity, len(int8), len(stock), len(auto), len(lut), _encodings(auto), len(default)))
            common.log(f"{name} {sparsity}: int8 {len(int8):,} B, micro {len(auto):,} B (stock layout {len(stock):,}"
                       f", split by default {len(default):,})")  # fmt: skip
            if sparsity == FLAGS.check_sparsity:
                files = [("int8", int8), ("micro, stock layout", stock), ("micro", auto)]
                if default != auto:
                    files.append(("micro, default split", default))
                for label, buf in files:
                    parts.append((name, label, slim.breakdown(buf)))
                for group in (1, 2, 3, 1000):
                    buf = auto if group == 1 else _merge_decodes(auto, group)
                    same = np.array_equal(*(predict(b, x_test[:100], "tflm") for b in (buf, int8)))
                    merges.append((name, group, len(buf), micro.measure_arena(buf), same))
                common.log(f"{name} {sparsity}: micro vs int8 on TFLM over {len(x_test):,} test images ...")
                checks.append((name, sparsity, len(x_test), _mismatches(int8, default, x_test)))
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Where the bytes of a `micro` file go",
        "",
        f"`{common.command_line('benchmarks/micro_size.py', sys.argv[1:])}`: {now}; {platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}; {(time.time() - started) / 60:.0f} min "
        f"(models trained {FLAGS.float_epochs} float + {FLAGS.ptq_epochs} PTQ epoch(s) on "
        f"{FLAGS.train_limit:,} Fashion-MNIST images; bytes depend on the support, hardly on accuracy).",
        "",
        "*stock layout*: the same `micro` content with names, signatures and metadata, serialized by the stock "
        "flatbuffers writer (what the exporter wrote before the slim file, except that the value table of a "
        "ternary LUT layer was one copy per channel then). *micro*: the slim file `export` writes "
        "(`encoding=\"auto\"`) without a split (`max_decode_bytes=None`); *lut*: the same with `encoding=\"lut\"`; "
        "*micro, default split*: with the default `max_decode_bytes=\"auto\"` (layers whose decoded weights exceed "
        "half the int8 arena, at least 16 KiB, are split: bytes traded for RAM).",
        "",
        "| model | sparsity | int8 B | micro, stock layout B | micro B | micro / stock | micro lut B | "
        "micro, default split B | encodings |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, sparsity, int8_b, stock_b, auto_b, lut_b, mix, default_b in sizes:
        lines.append(f"| {name} | {sparsity} | {int8_b:,} | {stock_b:,} | {auto_b:,} | {auto_b / stock_b:.2f} | "
                     f"{lut_b:,} | {default_b:,} | {mix} |")  # fmt: skip
    for name in FLAGS.models:
        rows = {s: b for n, s, _, _, b, _, _, _ in sizes if n == name}
        if len(rows) > 1:
            low, high = min(rows), max(rows)
            lines.append("")
            lines.append(f"{name}: micro {rows[low]:,} B at {low} vs {rows[high]:,} B at {high} "
                         f"({1 - rows[high] / rows[low]:.1%} smaller).")  # fmt: skip
    lines += [
        "",
        f"## Parts of the files at sparsity {FLAGS.check_sparsity} (bytes; `slim.breakdown`)",
        "",
        "| model | file | total | " + " | ".join(p.replace("_", " ") for p in PARTS) + " |",
        "|---|---|---|" + "---|" * len(PARTS),
    ]
    for name, label, p in parts:
        lines.append(f"| {name} | {label} | {p['file_bytes']:,} | " + " | ".join(f"{p[k]:,}" for k in PARTS) + " |")
    lines += [
        "",
        f"## One `TFLM_DECODE` op for several weight tensors (sparsity {FLAGS.check_sparsity}, unsplit `micro` file)",
        "",
        "TFLM decodes several (encoded, value table) pairs in one op. Grouping consecutive DECODE ops saves their "
        "operator tables, but every decoded tensor of a group lives from the group's op on, so the arena grows. "
        "Arena: `micro.measure_arena`; bit-exact: 100 test images against `int8` on TFLM.",
        "",
        "| model | DECODE ops grouped by | file B | arena B | bit-exact |",
        "|---|---|---|---|---|",
    ]
    for name, group, size, arena, same in merges:
        label = "1 (one per weight: the export)" if group == 1 else ("all" if group >= 1000 else str(group))
        lines.append(f"| {name} | {label} | {size:,} | {arena:,} | {'yes' if same else 'no'} |")
    lines += ["", "## The `micro` file `export` writes by default, on TFLM against `int8`", ""]
    for name, sparsity, count, bad in checks:
        verdict = "bit-exact" if bad == 0 else f"{bad} outputs differ"
        lines.append(f"- {name} {sparsity}: {verdict} over {count:,} Fashion-MNIST test images.")
    text = "\n".join(lines) + "\n"
    print(text)
    flatbuffer.atomic_write(FLAGS.output, text)


if __name__ == "__main__":
    app.run(main)
