"""Ternary weights on Arm Ethos-U NPUs: Vela's encoded bits per weight, flash, SRAM and estimated inference time
of PTQ models at several sparsities, against the plain int8 model of the same architecture and the ``micro`` file
with Huffman-coded weights (stock TFLM on a Cortex-M without an NPU).

Per model a float model trains ``--float_epochs`` on Fashion-MNIST (``examples/train.py``'s ``run``); its
post-training int8 file is the plain int8 row. Each PTQ row fine-tunes it ``--finetune_epochs`` at one sparsity with
the library defaults and exports ``int8`` and ``micro`` (``encoding="huffman"``). Every int8 file is compiled by
Vela for each ``--accelerators`` entry (``ptq_keras.tflite.ethosu``, Vela's default system per NPU family). The
accuracy column is the int8 file's on TFLM over the test set (Vela compiles it without loss); the short training
makes it indicative only (see ``accuracy_size.md`` for the accuracy comparison over seeds).

    .venv/bin/python benchmarks/ethos_u.py                  # small_cnn and ds_cnn, 0.5 0.7 0.85 0.9
    .venv/bin/python benchmarks/ethos_u.py --quick          # smoke run

Training runs are cached in ``--work_dir``; a rerun only compiles. Writes ``benchmarks/results/ethos_u.md``.
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

from absl import app, flags  # noqa: E402

from examples import common, recipe  # noqa: E402
from ptq_keras.tflite import ethosu  # noqa: E402
from ptq_keras.tflite.flatbuffer import atomic_write  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["small_cnn", "ds_cnn"], "Models of ptq_keras.models.")
flags.DEFINE_list("sparsities", ["0.5", "0.7", "0.85", "0.9"], "Sparsities of the PTQ rows.")
flags.DEFINE_list("accelerators", ["ethos-u55-128", "ethos-u85-256"], f"From {list(ethosu.ACCELERATORS)}.")
flags.DEFINE_integer("float_epochs", 2, "Epochs of the float model.", lower_bound=1)
flags.DEFINE_integer("finetune_epochs", 1, "Epochs of every PTQ fine-tuning.", lower_bound=1)
flags.DEFINE_bool("quick", False, "Smoke run: 2048 examples, one epoch each.")
flags.DEFINE_string("work_dir", "out/bench/ethos_u", "Cache of the training runs.")
flags.DEFINE_string("output", "benchmarks/results/ethos_u.md", "The markdown table (--quick: into --work_dir).")


def _run(model: str, key: str, **options) -> dict:
    out_dir = os.path.join(FLAGS.work_dir + ("_quick" if FLAGS.quick else ""), model, key)
    path = os.path.join(out_dir, "bench.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    epochs = options.pop("epochs")
    cfg = recipe.Config(model=model, batch_size=128, learning_rate=1e-3, limit=2048 if FLAGS.quick else None,
                       measure=False, eval_tflite=False, seed=0, out_dir=out_dir, encoding="huffman",
                       epochs=1 if FLAGS.quick else epochs, **options)  # fmt: skip
    res = recipe.run(cfg)
    out = {"model": res["model"], "keras_accuracy": res["keras_accuracy"], "files": {}}
    for target, row in res["export"].items():
        out["files"][target] = {k: row[k] for k in ("file", "file_bytes", "bits_per_weight")}
    atomic_write(path, json.dumps(out, indent=1).encode())
    return out


def _row(label: str, sparsity, run: dict, x_test, y_test, accelerator: str) -> dict:
    with open(run["files"]["int8"]["file"], "rb") as f:
        int8 = f.read()
    _, figures = ethosu.compile(int8, ethosu.VelaOptions(accelerator), weights=_weights(int8))
    micro = run["files"].get("micro")
    if "int8_accuracy" not in run:  # once per run, not per accelerator
        run["int8_accuracy"] = common.tflite_accuracy(int8, x_test, y_test, "tflm")
    return {
        "label": label,
        "sparsity": sparsity,
        "accuracy": run["int8_accuracy"],
        "vela": figures.to_dict(),
        "micro_bytes": micro["file_bytes"] if micro else None,
        "micro_bits": micro["bits_per_weight"] if micro else None,
    }


def _weights(int8: bytes) -> int:
    from ptq_keras.tflite import report

    return report.weight_payload(int8)["weights"]


def _markdown(tables: dict, meta: dict) -> str:
    lines = [
        "# Ternary weights on Arm Ethos-U (Vela)",
        "",
        f"Measured {meta['date']} on {meta['machine']} by `{meta['command']}`; Vela {meta['vela']}."
        + (" **--quick smoke run: not meaningful.**" if meta["quick"] else ""),
        "",
        f"Fashion-MNIST; float model {meta['float_epochs']} epochs, each PTQ row fine-tuned {meta['finetune_epochs']} "
        "epochs from it (library defaults). Vela's figures: `encoded B` its losslessly encoded weights (with its "
        "per-channel scale and bias words), `bits/w` = 8 x encoded / weights, `flash` the read-only data (weights "
        "and command stream), `SRAM` the NPU scratch, `time` its estimate at the system's clock. `micro` = the "
        'TFLM file with Huffman-coded weights (`encoding="huffman"`, for a Cortex-M without an NPU): whole-file '
        "bytes and weight bits/w. Accuracy: the int8 file Vela compiles, TFLM, full test set (short training: "
        "indicative only).",
    ]
    for (model, accelerator), rows in tables.items():
        plain = rows[0]["vela"]
        first = rows[0]["vela"]
        lines += [
            "",
            f"## {model} on {accelerator} ({first['system_config']}, {first['memory_mode']})",
            "",
            "| row | accuracy % | weights | encoded B | bits/w | x plain int8 | flash B | SRAM B | NPU/CPU ops "
            "| time us | speed-up | micro file B | micro bits/w |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            v = r["vela"]
            micro = "-" if r["micro_bytes"] is None else f"{r['micro_bytes']:,}"
            micro_bits = "-" if r["micro_bits"] is None else f"{r['micro_bits']:.2f}"
            storage = v["flash_bytes"] or v["dram_bytes"]
            lines.append(
                f"| {r['label']} | {100 * r['accuracy']:.2f} | {v['weights']:,} | {v['encoded_weight_bytes']:,} "
                f"| {v['bits_per_weight']:.2f} | {v['encoded_weight_bytes'] / plain['encoded_weight_bytes']:.3f} "
                f"| {storage:,} | {v['sram_bytes']:,} | {v['npu_ops']}/{v['cpu_ops']} "
                f"| {v['inference_time_s'] * 1e6:,.0f} | {plain['inference_time_s'] / v['inference_time_s']:.2f}x "
                f"| {micro} | {micro_bits} |"
            )
    lines.append("")
    return "\n".join(lines)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    from ptq_keras import models

    common.quiet_logs()
    if not ethosu.available():
        raise app.UsageError(ethosu.missing_message())
    for accelerator in FLAGS.accelerators:
        if accelerator not in ethosu.ACCELERATORS:
            raise app.UsageError(f"--accelerators: unknown {accelerator!r}; choose from {list(ethosu.ACCELERATORS)}.")
    for model in FLAGS.models:
        if model not in models.MODELS:
            raise app.UsageError(f"--models: unknown model {model!r}; choose from {sorted(models.MODELS)}.")
    started = time.time()
    x_test, y_test = common.load_split("fashion_mnist", "test", None, 2048 if FLAGS.quick else None)
    tables = {}
    for model in FLAGS.models:
        common.log(f"{model}: float model")
        base = _run(model, "float", method="float", epochs=FLAGS.float_epochs, export=("int8",))
        runs = [("plain int8 (float model)", None, base)]
        for s in map(float, FLAGS.sparsities):
            common.log(f"{model}: PTQ {s:g}")
            run = _run(model, f"ptq{s:g}", method="ptq", sparsity=s, epochs=FLAGS.finetune_epochs,
                       init_from=base["model"], export=("int8", "micro"))  # fmt: skip
            runs.append((f"PTQ {s:g}", s, run))
        for accelerator in FLAGS.accelerators:
            common.log(f"{model}: Vela for {accelerator}")
            tables[(model, accelerator)] = [_row(label, s, run, x_test, y_test, accelerator) for label, s, run in runs]
    meta = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}; {(time.time() - started) / 60:.0f} min)",
        "command": common.command_line("benchmarks/ethos_u.py", sys.argv[1:]),
        "vela": ethosu.vela_version(),
        "quick": FLAGS.quick,
        "float_epochs": 1 if FLAGS.quick else FLAGS.float_epochs,
        "finetune_epochs": 1 if FLAGS.quick else FLAGS.finetune_epochs,
    }
    output = os.path.join(FLAGS.work_dir + "_quick", "ethos_u.md") if FLAGS.quick else FLAGS.output
    text = _markdown(tables, meta)
    atomic_write(output, text.encode())
    rows = {f"{m}/{a}": r for (m, a), r in tables.items()}
    atomic_write(os.path.splitext(output)[0] + ".json", json.dumps({"meta": meta, "tables": rows}, indent=1).encode())
    common.log(f"wrote {output}")
    print(text)


if __name__ == "__main__":
    app.run(main)
