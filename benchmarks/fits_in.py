"""Fits in: the accuracy a model reaches under (flash, RAM) budgets of small microcontrollers.

Per model and seed the float model trains 6 epochs (Adam 1e-3, batch 128; reused from ``benchmarks/ablation.py``'s
cache when present). Per budget ``(F, R)`` and ``channel_sparsity`` ``c``: ``ternarize(float_model,
flash_budget=F, ram_budget=R, budget_data=x[:256], channel_sparsity=c)``, ``fit`` 4 epochs with Adam, ``strip``
with BatchNorm re-estimation, ``export`` of the ``micro`` file (``encoding="auto"``, ``ram_budget=R``); the file's
bytes, its measured TFLM arena, its MACs and its accuracy on TFLM over the 10k test set. A budget the allocator or
the RAM fit refuses is reported with the reason (the smallest size reached). The float model's plain int8 file is
the reference row.

    .venv/bin/python benchmarks/fits_in.py                       # small_cnn and ds_cnn, three budgets, seed 0
    .venv/bin/python benchmarks/fits_in.py --models=small_cnn --seeds=2

Runs are cached in ``--work_dir``; writes ``benchmarks/results/fits_in.md``.
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
flags.DEFINE_list("models", ["small_cnn", "ds_cnn"], "Models (ptq_keras.models).")
flags.DEFINE_list("budgets", ["65536:65536", "32768:32768", "131072:16384"], "flash:RAM budgets in bytes.")
flags.DEFINE_list("channel_sparsities", ["0", "0.25"], "channel_sparsity values tried per budget.")
flags.DEFINE_integer("seeds", 1, "Number of seeds (0 .. N-1).", lower_bound=1)
flags.DEFINE_integer("epochs", 4, "Fine-tuning epochs.", lower_bound=1)
flags.DEFINE_string("work_dir", "out/bench/fits_in", "Cache of the runs.")
flags.DEFINE_string("float_cache", "out/bench/ablation", "Where benchmarks/ablation.py keeps float models.")
flags.DEFINE_string("output", "benchmarks/results/fits_in.md", "The table.")

BATCH = 128



def _float(model: str, seed: int, data):
    x, y = data[:2]
    return common.float_model(model, seed, x, y, (os.path.join(FLAGS.float_cache, model),
                                                  os.path.join(FLAGS.work_dir, model)),
                              os.path.join(FLAGS.work_dir, model))  # fmt: skip


def _reference(model: str, seed: int, data) -> dict:
    from ptq_keras import tflite as ptq_tflite

    path = os.path.join(FLAGS.work_dir, model, f"int8_seed{seed}.json")
    if (done := common.cached(path)) is not None:
        return done
    x, _, x_test, y_test = data
    float_model = _float(model, seed, data)
    result = ptq_tflite.export(float_model, x[:500], os.path.join(FLAGS.work_dir, model, f"int8_seed{seed}"),
                               targets=("int8",))  # fmt: skip
    rep = result.report.targets["int8"]
    out = {"file_bytes": rep.file_bytes, "arena_bytes": rep.arena_bytes,
           "accuracy": common.tflite_accuracy(result.files["int8"], x_test, y_test, "tflm")}  # fmt: skip
    atomic_write(path, json.dumps(out).encode())
    return out


def _run(model: str, seed: int, flash: int, ram: int, channel_sparsity: float, data) -> dict:
    import ptq_keras
    from ptq_keras import keras
    from ptq_keras import tflite as ptq_tflite

    key = f"f{flash}_r{ram}_c{channel_sparsity:g}_{common.default_recipe()}_seed{seed}"
    path = os.path.join(FLAGS.work_dir, model, key + ".json")
    if (done := common.cached(path)) is not None:
        return done
    x, y, x_test, y_test = data
    float_model = _float(model, seed, data)
    keras.utils.set_random_seed(1000 + seed)
    result = {"model": model, "seed": seed, "flash": flash, "ram": ram, "channel_sparsity": channel_sparsity}
    try:
        q = ptq_keras.ternarize(float_model, flash_budget=flash, ram_budget=ram, budget_data=x[:256],
                                channel_sparsity=channel_sparsity)  # fmt: skip
    except ValueError as exc:
        result.update(fits=False, why=str(exc))
    else:
        q.compile(keras.optimizers.Adam(), keras.losses.SparseCategoricalCrossentropy(from_logits=True), ["accuracy"])
        q.fit(x, y, epochs=FLAGS.epochs, batch_size=BATCH, verbose=2)
        plain = ptq_keras.strip(q, batchnorm_data=x)
        out_dir = os.path.join(FLAGS.work_dir, model, key)
        exported = ptq_tflite.export(plain, x[:500], out_dir, targets=("micro",), encoding="auto", ram_budget=ram)
        rep = exported.report.targets["micro"]
        result.update(
            fits=rep.file_bytes <= flash and rep.arena_bytes <= ram,
            sparsities=dict(q.ptq_allocation.sparsities),
            file_bytes=rep.file_bytes,
            arena_bytes=rep.arena_bytes,
            keep_int8=rep.keep_int8,
            max_decode_bytes=rep.max_decode_bytes,
            macs=rep.macs or None,
            macs_unreduced=rep.macs_unreduced,
            removed_channels=sum(r["removed"] for r in rep.dead_channels),
            accuracy=common.tflite_accuracy(exported.files["micro"], x_test, y_test, "tflm"),
        )
    atomic_write(path, json.dumps(result, indent=1).encode())
    return result


def _budgets() -> list[tuple[int, int]]:
    out = []
    for item in FLAGS.budgets:
        flash, _, ram = item.partition(":")
        if not flash.isdigit() or not ram.isdigit():
            raise app.UsageError(f"--budgets: {item!r} is not flash:RAM in bytes (e.g. 65536:32768).")
        out.append((int(flash), int(ram)))
    return out


def _kb(n: int) -> str:
    return f"{n / 1024:g} KB"


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    common.quiet_logs()
    started = time.time()
    budgets = _budgets()
    channel_sparsities = [float(c) for c in FLAGS.channel_sparsities]
    x, y = common.load_split("fashion_mnist", "train", None, None)
    x_test, y_test = common.load_split("fashion_mnist", "test", None, None)
    data = (x, y, x_test, y_test)
    lines = [
        "# Fits in: accuracy under (flash, RAM) budgets (Fashion-MNIST)",
        "",
        f"Measured {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC on {platform.node()} "
        f"({platform.machine()}, {os.cpu_count()} CPUs; {{minutes}} min for the runs not cached) by `python "
        f"benchmarks/fits_in.py --models={','.join(FLAGS.models)} --budgets={','.join(FLAGS.budgets)} "
        f"--channel_sparsities={','.join(FLAGS.channel_sparsities)} --seeds={FLAGS.seeds} --epochs={FLAGS.epochs}`. "
        f"`ternarize(float_model, flash_budget=F, ram_budget=R, budget_data=x[:256], channel_sparsity=c)`, "
        f"{FLAGS.epochs} epochs of `fit` (library defaults, ste={common.default_ste()!r}), `strip` with BatchNorm "
        "re-estimation, "
        '`export(..., targets=("micro",), encoding="auto", ram_budget=R)`; accuracy of the file on TFLM over the '
        "10k test set; arena measured on TFLM. Accuracy is the mean over seeds (+- sd with several).",
        "",
        "| model | flash, RAM | channel_sparsity | per-layer sparsity | micro file | TFLM arena | MACs | accuracy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model in FLAGS.models:
        refs = [_reference(model, seed, data) for seed in range(FLAGS.seeds)]
        ref = refs[0]
        acc = np.mean([r["accuracy"] for r in refs])
        lines.append(f"| {model} | float model's int8 file | - | - | {ref['file_bytes']:,} B | "
                     f"{ref['arena_bytes']:,} B | - | {100 * acc:.2f}% |")  # fmt: skip
        for flash, ram in budgets:
            for c in channel_sparsities:
                runs = []
                for seed in range(FLAGS.seeds):
                    common.log(f"{model} seed {seed}: flash {flash:,} B, RAM {ram:,} B, channel_sparsity {c:g}")
                    runs.append(_run(model, seed, flash, ram, c, data))
                budget = f"{_kb(flash)}, {_kb(ram)}"
                if not all(r["fits"] for r in runs):
                    why = next(r.get("why") for r in runs if not r["fits"]) or "the trained file exceeded a budget"
                    why = why.split(": ", 1)[-1].split(". ")[0].split(" (")[0]  # the first clause: what was reached
                    lines.append(f"| {model} | {budget} | {c:g} | does not fit: {why} | | | | |")
                    continue
                r = runs[0]
                accs = [100 * run["accuracy"] for run in runs]
                spread = f" +- {np.std(accs, ddof=1):.2f}" if len(accs) > 1 else ""
                chosen = ", ".join(f"{k} {v:g}" for k, v in r["sparsities"].items())
                ram_note = [] if r["max_decode_bytes"] is None else [f"split at {r['max_decode_bytes']:,} B"]
                ram_note += [f"{r['keep_int8']} weight(s) int8"] if r["keep_int8"] else []
                macs = f"{r['macs']:,}" if r["macs"] else "-"
                if r["macs"] and r["macs_unreduced"] and r["macs"] < r["macs_unreduced"]:
                    macs += f" ({r['macs'] / r['macs_unreduced']:.2f}x, {r['removed_channels']} channels removed)"
                lines.append(
                    f"| {model} | {budget} | {c:g} | {chosen} | {r['file_bytes']:,} B | {r['arena_bytes']:,} B"
                    f"{' (' + ', '.join(ram_note) + ')' if ram_note else ''} | {macs} | {np.mean(accs):.2f}%{spread} |"
                )
    text = "\n".join(lines).replace("{minutes}", f"{(time.time() - started) / 60:.0f}") + "\n"
    atomic_write(FLAGS.output, text.encode())
    print(text)


if __name__ == "__main__":
    app.run(main)
