"""Accuracy against file size on real Fashion-MNIST, over several seeds: float, int8, tfmot QAT, tfmot pruning
(int8 and entropy-coded ``micro`` files), TWN and PTQ (defaults, ``precision="mixed"``, with distillation, with
int8 activations), on ``small_cnn``, ``ds_cnn`` and ``ds_resnet``.

Per model and seed a float model trains ``--float_epochs`` (``examples/train.py``'s ``run``, Adam 1e-3, batch
128); it is the float row, and its post-training int8 file the int8 row. Every other row fine-tunes that float
model for ``--finetune_epochs`` with the library's defaults (Adam 1e-3; tfmot pruning ramps its sparsity over the
first epoch, as tfmot's guide does; PTQ uses plain ``fit`` with the defaults: ``freeze_at=0.5``, no ramp). Ternary
models are stripped and their BatchNorm statistics re-estimated. Every file's accuracy is measured over the whole
10k test set on the TFLM interpreter. The pruning rows export two files: the stock ``int8`` file and the ``micro``
file with ``encoding="auto"`` (PRUNE or Huffman coded int8 weights), so the baseline gets entropy-coded bytes too.

    .venv/bin/python benchmarks/accuracy_size.py                                 # three models, seeds 0 1 2
    .venv/bin/python benchmarks/accuracy_size.py --models=small_cnn --seeds=1
    .venv/bin/python benchmarks/accuracy_size.py --quick                         # smoke run, minutes
    .venv/bin/python benchmarks/accuracy_size.py --models=ds_cnn --only_seeds=2 --results_name=ds_cnn_seed2
    .venv/bin/python benchmarks/accuracy_size.py --jobs=2                        # one process per core

Every finished run is cached (``--work_dir/<model>/seed<N>/<row>/``); a rerun trains only what is missing, so an
interrupted benchmark continues where it stopped. Writes ``benchmarks/results/accuracy_size.md``, ``.json`` and ``.png``
(``--results_name`` renames them; ``--quick`` writes into ``--work_dir``).
"""

from __future__ import annotations

from ptq_keras import quiet

quiet.for_script(__name__)  # TensorFlow's start-up lines off standard error unless --verbose (before it loads)

import dataclasses
import datetime
import json
import os
import platform
import shutil
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)
README = os.path.join(_ROOT, "README.md")  # --update_readme

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from examples import common, recipe  # noqa: E402
from ptq_keras.tflite.flatbuffer import atomic_write  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["small_cnn", "ds_cnn", "ds_resnet"], "Models of ptq_keras.models.")
flags.DEFINE_integer("seeds", 3, "Number of seeds (0 .. N-1).", lower_bound=1)
flags.DEFINE_list("only_seeds", None, "Only these of the seeds 0 .. N-1 (one model's seeds split between processes, "
                  "e.g. one per core, each with its own --results_name; then --cached_only renders them all).")
flags.DEFINE_bool("quick", False, "Smoke run: 2048 examples per split, one epoch each; numbers are not meaningful.")
flags.DEFINE_integer("float_epochs", 6, "Epochs of the float model every row starts from.", lower_bound=1)
flags.DEFINE_integer("finetune_epochs", 4, "Epochs every compressed row fine-tunes.", lower_bound=1)
flags.DEFINE_list("ptq_sparsities", ["0.5", "0.7", "0.85", "0.9"], "Sparsities of the PTQ rows.")
flags.DEFINE_list("prune_sparsities", ["0.5", "0.7", "0.85", "0.9"], "Sparsities of the tfmot pruning rows.")
flags.DEFINE_list("mixed_sparsities", ["0.7", "0.85"],
                  "Sparsities of the PTQ rows with precision='mixed' (depthwise kernels and the stem int8).")
flags.DEFINE_float("variant_sparsity", 0.7, "Sparsity of the PTQ + distillation and PTQ + int8 activation rows.")
flags.DEFINE_list("identity_sparsities", [],
                  "Sparsities of extra PTQ rows with ste='identity' (the default STE before 'psg'; the ablation "
                  "compares the STEs over seeds, so none by default).")
flags.DEFINE_list("rows", None, "Only these row keys (default: all; see --helpfull for the list in the log).")
flags.DEFINE_bool("cached_only", False, "Train nothing: render the table from the runs already cached (a row shows "
                  "how many seeds it has).")
flags.DEFINE_integer("jobs", 1, "Train in this many processes, each with one TensorFlow thread (pinned to one CPU "
                     "core while N is no more than the cores), one (model, seed) at a time, the slowest first; then "
                     "render the cache as --cached_only does (each process logs to <work_dir>/<model>/seed<N>/"
                     "log.txt).", lower_bound=1)
flags.DEFINE_bool("update_readme", False, "Also write the headline table (the part of the results between the README's "
                  "headline markers) into README.md.")
flags.DEFINE_string("work_dir", "out/bench/accuracy_size", "Cache of the runs (models, .tflite files, results).")
flags.DEFINE_string("results_dir", "benchmarks/results", "Where accuracy_size.md and .png go (--quick: --work_dir).")
flags.DEFINE_string("results_name", "accuracy_size", "File name of the results: <results_name>.md, .json and .png.")

BASELINE_KINDS = ("float", "int8", "qat", "prune", "twn")


def _row_specs() -> list[tuple[str, str, str, dict, tuple]]:
    """(key, label, kind, recipe.Config options, file targets) of every fine-tuned row."""
    rows = [("qat", "tfmot int8 QAT", "qat", dict(method="tfmot_qat"), ("int8",))]
    for s in map(float, FLAGS.prune_sparsities):
        options = dict(method="tfmot_prune", sparsity=s, ramp_epochs=1)
        rows.append((f"prune{s:g}", f"tfmot pruning {s:g}", "prune", options, ("int8", "micro")))
    rows.append(("twn", "TWN", "twn", dict(method="twn"), ("micro",)))
    for s in map(float, FLAGS.ptq_sparsities):
        rows.append((f"ptq{s:g}", f"PTQ {s:g}", "ptq", dict(method="ptq", sparsity=s), ("micro",)))
    for s in map(float, FLAGS.mixed_sparsities):
        rows.append((f"ptq{s:g}_mixed", f"PTQ {s:g}, precision='mixed'", "ptq",
                     dict(method="ptq", sparsity=s, precision="mixed"), ("micro",)))  # fmt: skip
    for s in map(float, FLAGS.identity_sparsities):
        rows.append((f"ptq{s:g}_identity", f"PTQ {s:g}, ste='identity'", "ptq",
                     dict(method="ptq", sparsity=s, ste="identity"), ("micro",)))  # fmt: skip
    v = FLAGS.variant_sparsity
    rows.append((f"ptq{v:g}_distill", f"PTQ {v:g} + distill", "ptq", dict(method="ptq", sparsity=v, distill=True),
                 ("micro",)))  # fmt: skip
    rows.append((f"ptq{v:g}_act8", f"PTQ {v:g} + int8 activations", "ptq",
                 dict(method="ptq", sparsity=v, activations="int8"), ("micro",)))  # fmt: skip
    return rows


def _config(model: str, seed: int, out_dir: str, **options) -> recipe.Config:
    values = dict(
        model=model,
        batch_size=128,
        learning_rate=1e-3,
        limit=2048 if FLAGS.quick else None,
        measure=seed == 0,  # TFLM arena bisection once per row
        eval_tflite=False,
        encoding="auto",
        seed=seed,
        out_dir=out_dir,
    )
    values.update(options)
    return recipe.Config(**values)


def _cached(path: str, compute) -> dict:
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    result = compute()
    atomic_write(path, json.dumps(result, indent=1).encode())
    return result


def _files(res: dict, targets, x_test, y_test) -> dict:
    """Per exported target: bytes, encodings, bits/weight, arena and TFLM accuracy over the test set."""
    out = {}
    for target in targets:
        row = res["export"][target]
        accuracy = common.tflite_accuracy(row["file"], x_test, y_test, "tflm")
        out[target] = {k: row[k] for k in ("file_bytes", "encodings", "bits_per_weight", "arena_bytes")}
        out[target]["accuracy"] = accuracy
    return out


def _float_run(model: str, seed: int, work: str, x_test, y_test) -> dict:
    import importlib

    from ptq_keras import keras

    convert = importlib.import_module("ptq_keras.tflite.convert")  # the package re-exports a function `convert`

    def compute():
        epochs = 1 if FLAGS.quick else FLAGS.float_epochs
        res = recipe.run(_config(model, seed, work, method="float", epochs=epochs, export=("int8",)))
        fp32 = convert.float_tflite(keras.models.load_model(res["model"], compile=False))
        path = os.path.join(work, "tflite", "model_fp32.tflite")
        atomic_write(path, fp32)
        res["export"]["fp32"] = {"file": path, "file_bytes": len(fp32), "encodings": [], "bits_per_weight": 32.0,
                                 "arena_bytes": None}  # fmt: skip
        return {"keras_accuracy": res["keras_accuracy"], "model": res["model"],
                "files": _files(res, ("fp32", "int8"), x_test, y_test)}  # fmt: skip

    return _cached(os.path.join(work, "bench.json"), compute)


def _finetune_run(model: str, seed: int, spec, init_from: str, work: str, x_test, y_test) -> dict:
    key, _, _, options, targets = spec

    epochs = 1 if FLAGS.quick else FLAGS.finetune_epochs
    export = ("int8", "micro") if "micro" in targets else ("int8",)
    cfg = _config(model, seed, work, **options, epochs=epochs, init_from=init_from, export=export)
    ste = recipe.ste_for(cfg) if cfg.method in ("ptq", "twn") else None
    min_kept = cfg.min_kept if cfg.method == "ptq" else None

    def compute():
        checkpointed = os.path.exists(os.path.join(work, "checkpoints", "state.json"))
        try:  # a run killed after a checkpoint (or while exporting) continues from it
            res = recipe.run(dataclasses.replace(cfg, resume=checkpointed))
        except ValueError as exc:
            if not str(exc).startswith("--resume:"):
                raise
            res = recipe.run(cfg)  # no checkpoint, or one of another run: train afresh
        return {
            "ste": ste,
            "min_kept": min_kept,
            "keras_accuracy": res["keras_accuracy"],
            "keras_accuracy_before_bn": res.get("stripped_accuracy"),
            "files": _files(res, targets, x_test, y_test),
        }

    path = os.path.join(work, "bench.json")
    if os.path.exists(path) and ste is not None:
        with open(path) as f:
            if not _same_recipe(json.load(f), ste, min_kept):  # a library default changed: this run is stale
                common.log(f"{path}: trained with another STE or min_kept than today's defaults; training again")
                os.remove(path)
                shutil.rmtree(os.path.join(work, "checkpoints"), ignore_errors=True)
    return _cached(path, compute)


def _is_cached(model: str, seed: int, spec, work: str) -> bool:
    """Whether the row has a result trained with today's default STE (``--cached_only``)."""
    path = os.path.join(work, "bench.json")
    if not os.path.exists(path):
        return False
    options = spec[3]
    if options["method"] not in ("ptq", "twn"):
        return True
    cfg = _config(model, seed, work, **options)
    with open(path) as f:
        return _same_recipe(json.load(f), recipe.ste_for(cfg), cfg.min_kept if cfg.method == "ptq" else None)


def _same_recipe(cached: dict, ste: str, min_kept) -> bool:
    """Whether a cached run trained with this STE and ``min_kept`` (runs from before ``min_kept`` existed: 0)."""
    return cached.get("ste", ste) == ste and cached.get("min_kept", 0 if min_kept is not None else None) == min_kept


def _mean_sd(values) -> tuple[float, float]:
    values = np.asarray(values, dtype=float)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else float("nan")


def _points(model: str, runs: dict) -> list[dict]:
    """One point per (row, file target), aggregated over the seeds: runs = {(key, label, kind): [result, ...]}."""
    points = []
    for (key, label, kind), results in runs.items():
        for target in results[0]["files"]:
            files = [r["files"][target] for r in results]
            acc, sd = _mean_sd([100 * f["accuracy"] for f in files])
            keras_acc, keras_sd = _mean_sd([100 * r["keras_accuracy"] for r in results])
            encodings = sorted({e for f in files for e in f["encodings"]})
            points.append({
                "model": model, "key": key, "label": label, "kind": kind, "target": target, "seeds": len(results),
                "bytes": float(np.mean([f["file_bytes"] for f in files])), "accuracy": acc, "sd": sd,
                "keras_accuracy": keras_acc, "keras_sd": keras_sd, "encodings": encodings,
                "bits_per_weight": float(np.mean([f["bits_per_weight"] for f in files])),
                "arena_bytes": files[0]["arena_bytes"],
                "per_seed": [100 * f["accuracy"] for f in files],
                "seed_ids": [r.get("seed") for r in results],
            })  # fmt: skip
    return points


def _differences(point: dict, reference: dict) -> list[float]:
    """``point``'s accuracy minus ``reference``'s, per seed both have (none for points without per-seed ids)."""
    ref = dict(zip(reference.get("seed_ids", []), reference["per_seed"]))
    return [a - ref[s] for s, a in zip(point.get("seed_ids", []), point["per_seed"]) if s is not None and s in ref]


def paired(point: dict, reference: dict) -> tuple[float, float]:
    """Mean and sd over the seeds both have of ``point``'s accuracy minus ``reference``'s on the same seed (nan
    when they share no seed or the points predate per-seed ids)."""
    diffs = _differences(point, reference)
    return _mean_sd(diffs) if diffs else (float("nan"), float("nan"))


def vs_float(point: dict, reference: dict) -> str:
    """The "vs float" cell: the paired difference (mean +- sd over seeds), or the difference of the means for
    results without per-seed ids; the reference row itself: +0.00."""
    if point is reference:
        return "+0.00"
    mean, sd = paired(point, reference)
    if np.isnan(mean):
        return f"{point['accuracy'] - reference['accuracy']:+.2f}"
    return _fmt(mean, sd, signed=True)


# The paired comparisons each model's section lists: (row key, key of the row it is compared with), `micro` files.
# Keys that a run does not have (other --ptq_sparsities, --variant_sparsity) are skipped.
COMPARISONS = (
    ("ptq0.7_mixed", "ptq0.7"),
    ("ptq0.85_mixed", "ptq0.85"),
    ("ptq0.7_mixed", "prune0.7"),
    ("ptq0.5", "twn"),
    ("ptq0.7", "twn"),
    ("ptq0.9", "prune0.9"),
    ("ptq0.7_distill", "ptq0.7"),
    ("ptq0.7_act8", "ptq0.7"),
)


def comparisons(points: list[dict]) -> list[str]:
    """Markdown lines of the :data:`COMPARISONS` this model's points have: the paired accuracy difference (mean
    +- sd over the seeds both rows have) and the difference in file bytes."""
    by_key = {p["key"]: p for p in points if p["target"] == "micro"}
    lines = []
    for key, other in COMPARISONS:
        a, b = by_key.get(key), by_key.get(other)
        if a is None or b is None:
            continue
        diffs = _differences(a, b)
        if not diffs:
            continue
        extra = a["bytes"] - b["bytes"]
        lines.append(f"- {a['label']} against {b['label']}: {_fmt(*_mean_sd(diffs), signed=True)} points over "
                     f"{len(diffs)} seed{'s' if len(diffs) > 1 else ''}, {extra:+,.0f} B ({extra / b['bytes']:+.0%} "
                     "of its file)")  # fmt: skip
    return lines


def dominated(points: list[dict]) -> list[tuple[dict, dict]]:
    """(PTQ point, baseline point) pairs where the baseline file is no larger and more accurate by more than one
    standard deviation (the larger of the two)."""
    out = []
    for p in (p for p in points if p["kind"] == "ptq"):
        for b in (b for b in points if b["kind"] in BASELINE_KINDS):
            margin = np.nanmax([p["sd"], b["sd"], 0.0])
            if b["bytes"] <= p["bytes"] and b["accuracy"] - p["accuracy"] > margin:
                out.append((p, b))
    return out


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats in both size (smaller) and accuracy (higher), by size."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -np.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


_COLORS = {"float": "black", "int8": "tab:blue", "qat": "tab:cyan", "prune": "tab:green", "twn": "tab:orange",
           "ptq": "tab:red"}  # fmt: skip


def label_offsets(ax, xy: list[tuple[float, float]], labels: list[str], height: float = 9.0) -> list[tuple]:
    """Offsets in points, ``(0, -k * height)``, that keep the labels of ``xy`` (data coordinates of ``ax``) from
    overlapping: from the top point down, a label that would cover one already placed moves down a line at a time
    (character width estimated at 3.4 points, for the plot's 6-point font)."""
    ax.autoscale_view()  # the limits the plot will have (they update lazily)
    to_points = ax.transData + ax.figure.dpi_scale_trans.inverted()
    anchors = [tuple(to_points.transform(p) * 72) for p in xy]  # points from the figure's corner
    placed, offsets = [], [(0.0, 0.0)] * len(xy)
    for i in sorted(range(len(xy)), key=lambda i: -anchors[i][1]):
        x, y = anchors[i]
        width = 3.4 * len(labels[i])
        for step in range(12):
            top = y - step * height
            if not any(x < px + pw and px < x + width and abs(top - py) < height for px, py, pw in placed):
                break
        placed.append((x, top, width))
        offsets[i] = (0.0, top - y)
    return offsets


def _plot(by_model: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(by_model), figsize=(6.5 * len(by_model), 5.5), squeeze=False)
    for ax, (model, points) in zip(axes[0], by_model.items()):
        xy = [(p["bytes"] / 1024, p["accuracy"]) for p in points]
        for p, (kb, acc) in zip(points, xy):
            marker = "s" if p["target"] == "micro" else "o"
            ax.errorbar(kb, acc, yerr=0 if np.isnan(p["sd"]) else p["sd"], fmt=marker, color=_COLORS[p["kind"]],
                        capsize=3, zorder=3)  # fmt: skip
        front = pareto(xy)
        ax.plot([xy[i][0] for i in front], [xy[i][1] for i in front], "--", color="gray", lw=1)
        ax.set_xscale("log")
        plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
        ax.xaxis.set_major_formatter(plain)
        ax.autoscale_view()
        low, high = ax.get_xlim()
        if high / low < 10:  # less than a decade: label the minor ticks too
            ax.xaxis.set_minor_formatter(plain)
            ax.tick_params(axis="x", which="minor", labelsize=7)
        labels = [f"{p['label']} ({p['target']})" for p in points]
        for (kb, acc), text, (dx, dy) in zip(xy, labels, label_offsets(ax, xy, labels)):
            arrow = {"arrowstyle": "-", "lw": 0.4, "color": "gray"} if dy < 0 else None
            ax.annotate(text, (kb, acc), textcoords="offset points", xytext=(4 + dx, 3 + dy), fontsize=6,
                        arrowprops=arrow)  # fmt: skip
        ax.set_xlabel("file bytes (KiB, log scale)")
        ax.set_ylabel("test accuracy on TFLM (%), mean +- sd over seeds")
        ax.set_title(f"{model}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    handles = [plt.Line2D([], [], marker="o", ls="", color=c, label=k) for k, c in _COLORS.items()]
    handles += [plt.Line2D([], [], marker="s", ls="", color="gray", label="micro file (TFLM_DECODE)"),
                plt.Line2D([], [], ls="--", color="gray", label="Pareto front (means)")]  # fmt: skip
    fig.legend(handles=handles, fontsize=7, loc="lower center", ncol=len(handles), frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.05, 1, 1))  # the legend below the panels
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def _fmt(mean: float, sd: float, signed: bool = False) -> str:
    return f"{mean:{'+' if signed else ''}.2f}" + ("" if np.isnan(sd) else f" ± {sd:.2f}")


def _markdown(by_model: dict, meta: dict) -> str:
    lines = [
        "# Accuracy vs size: Fashion-MNIST, mean and standard deviation over seeds",
        "",
        f"Measured {meta['date']} on {meta['machine']} by `{meta['command']}`"
        + (" (**--quick smoke run: not meaningful**)" if meta["quick"] else "")
        + ".",
        "",
        f"Per model and seed a float model trains {meta['float_epochs']} epochs (Adam 1e-3, batch 128, "
        f"{meta['train_examples']} training images); every compressed row fine-tunes it {meta['finetune_epochs']} "
        "epochs (Adam 1e-3; tfmot pruning ramps over the first epoch; PTQ with the library defaults; ternary models "
        "stripped and BatchNorm re-estimated). File accuracy: TFLM interpreter over the "
        f"{meta['test_examples']}-image test set. `micro` files use `encoding=\"auto\"` (per tensor the smallest of "
        "2-bit LUT, PRUNE and Huffman; the pruning baseline's int8 weights get PRUNE or Huffman).",
        "",
    ]
    for model, points in by_model.items():
        reference = next(p for p in points if p["kind"] == "float")
        fp32 = reference["bytes"]
        lines += [
            f"## {model}",
            "",
            f"<!-- --8<-- [start:{model}] -->",
            "",
            "| row | file | seeds | file bytes | x smaller than fp32 | bits/weight | TFLM accuracy % | vs float "
            "| Keras accuracy % | TFLM arena bytes |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for p in sorted(points, key=lambda p: -p["bytes"]):
            target = p["target"] + (f" ({', '.join(p['encodings'])})" if p["encodings"] else "")
            lines.append(
                f"| {p['label']} | {target} | {p['seeds']} | {p['bytes']:,.0f} | {fp32 / p['bytes']:.1f}x "
                f"| {p['bits_per_weight']:.2f} | {_fmt(p['accuracy'], p['sd'])} | {vs_float(p, reference)} "
                f"| {_fmt(p['keras_accuracy'], p['keras_sd'])} | {p['arena_bytes'] or '-'} |"
            )
        beaten = dominated(points)
        lines.append("")
        if beaten:
            lines.append("Baseline files no larger than a PTQ file and more accurate beyond one standard deviation:")
            lines += [
                f"- {p['label']} ({p['target']}, {p['bytes']:,.0f} B, {_fmt(p['accuracy'], p['sd'])}%) is beaten by "
                f"{b['label']} ({b['target']}, {b['bytes']:,.0f} B, {_fmt(b['accuracy'], b['sd'])}%)"
                for p, b in beaten
            ]
        else:
            lines.append("No baseline file is both no larger than a PTQ file and more accurate beyond one sd.")
        paired_lines = comparisons(points)
        if paired_lines:
            lines += ["", "Paired on the same seeds (accuracy difference, `micro` files):", "", *paired_lines]
        lines += [f"<!-- --8<-- [end:{model}] -->", ""]
    lines += ["## The README's table", "", "<!-- --8<-- [start:headline] -->", "",
              *headline(by_model, meta.get("parameters", {})), "", "<!-- --8<-- [end:headline] -->", ""]  # fmt: skip
    lines += [
        "- vs float: per seed, the file's TFLM accuracy minus the float model's of the same seed; mean ± sd over "
        "the seeds (the spread of a paired difference, smaller than the rows' own)."
        if any(p.get("seed_ids") for points in by_model.values() for p in points)
        else "- vs float: the mean TFLM accuracy minus the float model's (results without per-seed ids).",
        "- bits/weight: weight payload bits of the file per weight (scales, biases and the flatbuffer structure "
        "are in the file bytes, not here). TFLM arena: seed 0's file (decoded TFLM_DECODE weights live in it).",
        f"- Plot: `{meta['results_name']}.png` (TFLM accuracy against file bytes, error bars one sd, Pareto front of "
        "the means dashed).",
        "",
    ]
    return "\n".join(lines)


# The README's table: (key, file target, label) per row, PTQ rows in bold.
HEADLINE_ROWS = (
    ("float", "fp32", "float32 .tflite"),
    ("int8", "int8", "int8, post-training"),
    ("prune0.7", "micro", "tfmot pruning 0.7, entropy-coded `micro`"),
    ("ptq0.5", "micro", "PTQ 0.5, `micro`"),
    ("ptq0.7", "micro", "PTQ 0.7, `micro`"),
    ("ptq0.7_mixed", "micro", "PTQ 0.7, `precision=\"mixed\"`, `micro`"),
    ("ptq0.85_mixed", "micro", "PTQ 0.85, `precision=\"mixed\"`, `micro`"),
    ("ptq0.9", "micro", "PTQ 0.9, `micro`"),
)
README_MARKERS = ("<!-- headline table: benchmarks/accuracy_size.py --cached_only --update_readme -->",
                  "<!-- end of headline table -->")  # fmt: skip


_KINDS = {"ds_cnn": "depthwise", "ds_resnet": "residual, depthwise"}  # what the README says of a model


def headline(by_model: dict, parameters: dict) -> list[str]:
    """The README's table from the results (``{model: points}``): the rows of :data:`HEADLINE_ROWS` each model
    has, with its bytes, ratio to fp32, TFLM accuracy (mean +- sd) and difference to float."""
    lines = ["| model | file | bytes | smaller than fp32 | TFLM accuracy % | vs float |", "|---|---|---|---|---|---|"]
    for model, points in by_model.items():
        by_key = {(p["key"], p["target"]): p for p in points}
        fp32 = next((p for p in points if p["kind"] == "float"), None)
        if fp32 is None:
            continue
        notes = [f"{parameters[model] / 1000:.0f}k parameters"] if model in parameters else []
        notes += [_KINDS[model]] if model in _KINDS else []
        name = f"`{model}`" + (f" ({', '.join(notes)})" if notes else "")
        for key, target, label in HEADLINE_ROWS:
            p = by_key.get((key, target))
            if p is None:
                continue
            accuracy = _fmt(p["accuracy"], p["sd"]).replace("±", "+-")
            delta = vs_float(p, fp32).replace("±", "+-")
            cells = [label, f"{p['bytes']:,.0f}", f"{fp32['bytes'] / p['bytes']:.1f}x", accuracy, delta]
            if p["kind"] == "ptq":
                cells = [f"**{c}**" for c in cells]
            lines.append(f"| {name} | ".replace("|  |", "| |") + " | ".join(cells) + " |")
            name = ""
    return lines


def replace_headline(readme: str, table: list[str]) -> str:
    """``readme`` with the lines between :data:`README_MARKERS` replaced by ``table``."""
    start, end = README_MARKERS
    if start not in readme or end not in readme:
        raise ValueError(f"README.md has no headline markers ({start!r} ... {end!r}): put them around its table.")
    head, rest = readme.split(start, 1)
    _, tail = rest.split(end, 1)
    return head + start + "\n\n" + "\n".join(table) + "\n\n" + end + tail


def _parameters(names) -> dict:
    from ptq_keras import models

    return {name: int(models.MODELS[name]().count_params()) for name in names}


# Relative time of one row on a CPU core (depthwise convolutions train slowly there): the slowest pieces go first.
_ROW_COST = {"ds_cnn": 3.0, "ds_resnet": 2.0}
# The flags a --jobs process gets from its parent (the others it is given per piece).
_FORWARDED = ("float_epochs", "finetune_epochs", "ptq_sparsities", "prune_sparsities", "mixed_sparsities",
              "variant_sparsity", "identity_sparsities", "rows", "quick", "work_dir")  # fmt: skip


def pieces(models: list[str], seeds: list[int]) -> list[tuple[str, int]]:
    """(model, seed) pieces of a ``--jobs`` run, the slowest model first, seeds in order within a model."""
    ranked = sorted(models, key=lambda m: -_ROW_COST.get(m, 1.0))
    return [(m, s) for m in ranked for s in seeds]


def _piece_command(model: str, seed: int, parts_dir: str) -> list[str]:
    forwarded = [FLAGS[name].serialize() for name in _FORWARDED if FLAGS[name].present]
    verbose = ["--verbose"] if quiet.verbose_requested(sys.argv) else []
    return [sys.executable, os.path.abspath(__file__), *forwarded, *verbose, f"--models={model}",
            f"--seeds={FLAGS.seeds}", f"--only_seeds={seed}", f"--results_name={model}_seed{seed}",
            f"--results_dir={parts_dir}"]  # fmt: skip


def progress(todo: list[tuple[str, int]], work: str, keys: list[str]) -> str:
    """How many of the runs (``keys`` of each (model, seed) piece) have a result in the cache."""
    done = sum(os.path.exists(os.path.join(work, m, f"seed{s}", k, "bench.json")) for m, s in todo for k in keys)
    return f"{done} of {len(todo) * len(keys)} runs cached"


def run_pieces(todo: list[tuple[str, int]], work: str, jobs: int, keys: list[str] | None = None,
               every: float = 600.0) -> None:  # fmt: skip
    """Train every piece in its own process, ``jobs`` at a time, each with one TensorFlow thread and, while ``jobs``
    is no more than the cores this process may use, pinned to one of them (more processes than cores run unpinned:
    pinned round robin, the pieces left on one core would wait while another core idles); with ``keys`` (the run
    keys of a piece), log how many runs are cached every ``every`` seconds. Raises if a piece fails (its log names
    why)."""
    import concurrent.futures
    import subprocess
    import threading

    finished = threading.Event()

    def report():
        while not finished.wait(every):
            common.log(f"--jobs: {progress(todo, work, keys)}, {_elapsed(started)}")

    started = time.time()
    if keys:
        threading.Thread(target=report, daemon=True).start()

    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if jobs > len(cores):
        cores = []
    free = list(range(jobs))
    lock = threading.Lock()
    env = dict(os.environ, TF_NUM_INTRAOP_THREADS="1", TF_NUM_INTEROP_THREADS="1")

    def one(piece):
        model, seed = piece
        with lock:
            slot = free.pop(0)
        log_path = os.path.join(work, model, f"seed{seed}", "log.txt")
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        common.log(f"{model} seed {seed}: started in process slot {slot} (log: {log_path})")
        try:
            with open(log_path, "a") as log:
                child = subprocess.Popen(_piece_command(model, seed, os.path.join(work, "parts")), stdout=log,
                                         stderr=subprocess.STDOUT, env=env)  # fmt: skip
                if cores:  # before TensorFlow starts its threads, which inherit it
                    os.sched_setaffinity(child.pid, {cores[slot % len(cores)]})
                rc = child.wait()
        finally:
            with lock:
                free.append(slot)
        common.log(f"{model} seed {seed}: " + ("done" if rc == 0 else f"FAILED (exit {rc}; see {log_path})"))
        return piece, rc

    try:
        with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
            failed = [piece for piece, rc in pool.map(one, todo) if rc != 0]
    finally:
        finished.set()
    if failed:
        raise RuntimeError(f"--jobs: {len(failed)} piece(s) failed: {failed}; their logs are in {work}/<model>/"
                           "seed<N>/log.txt; a rerun trains only what is not cached.")  # fmt: skip


def _elapsed(started: float) -> str:
    minutes = (time.time() - started) / 60
    return f"{minutes:.0f} min so far" if minutes < 120 else f"{minutes / 60:.1f} h so far"


def seed_list(seeds: int, only) -> list[int]:
    """The seeds to run: ``0 .. seeds-1``, or those of ``only`` (``--only_seeds``), in order."""
    if not only:
        return list(range(seeds))
    try:
        chosen = sorted({int(s) for s in only})
    except ValueError:
        raise app.UsageError(f"--only_seeds: {only} are not all integers (e.g. --only_seeds=0,2).") from None
    outside = [s for s in chosen if not 0 <= s < seeds]
    if outside:
        raise app.UsageError(f"--only_seeds: {outside} outside 0 .. {seeds - 1}; raise --seeds or drop them.")
    return chosen


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    from ptq_keras import models

    common.quiet_logs()
    for s in FLAGS.ptq_sparsities + FLAGS.prune_sparsities + [FLAGS.variant_sparsity]:
        if not 0.0 <= float(s) < 1.0:
            raise app.UsageError(f"sparsity {s} is outside [0, 1).")
    for model in FLAGS.models:
        if model not in models.MODELS:
            raise app.UsageError(f"--models: unknown model {model!r}; choose from {sorted(models.MODELS)}.")
    if not FLAGS.results_name or os.sep in FLAGS.results_name:
        raise app.UsageError(f"--results_name: {FLAGS.results_name!r} is not a file name (e.g. accuracy_size_ds_cnn).")
    started = time.time()
    seeds = seed_list(FLAGS.seeds, FLAGS.only_seeds)
    if FLAGS.update_readme:
        with open(README, encoding="utf-8") as f:
            try:
                replace_headline(f.read(), [])
            except ValueError as e:
                raise app.UsageError(f"--update_readme: {e}") from None
    specs = _row_specs()
    keys = ["float"] + [s[0] for s in specs]
    if FLAGS.rows:
        unknown = sorted(set(FLAGS.rows) - set(keys))
        if unknown:
            raise app.UsageError(f"--rows: unknown {unknown}; known: {keys}")
        specs = [s for s in specs if s[0] in FLAGS.rows]
    work = FLAGS.work_dir + ("_quick" if FLAGS.quick else "")
    if FLAGS.jobs > 1 and not FLAGS.cached_only:
        run_pieces(pieces(FLAGS.models, seeds), work, FLAGS.jobs, ["float"] + [s[0] for s in specs])
        FLAGS.cached_only = True  # the table, from what the processes cached
    results_dir = work if FLAGS.quick else FLAGS.results_dir  # smoke results stay out of the record
    os.makedirs(results_dir, exist_ok=True)
    limit = 2048 if FLAGS.quick else None
    x_train, _ = common.load_split("fashion_mnist", "train", None, limit)
    x_test, y_test = common.load_split("fashion_mnist", "test", None, limit)
    done, total = 0, len(FLAGS.models) * len(seeds) * len(specs)  # fine-tuned rows (cached ones count too)
    by_model = {}
    for model in FLAGS.models:
        runs: dict = {}
        for seed in seeds:
            seed_dir = os.path.join(work, model, f"seed{seed}")
            if FLAGS.cached_only and not os.path.exists(os.path.join(seed_dir, "float", "bench.json")):
                common.log(f"{model} seed {seed}: no cached float model; skipped (--cached_only)")
                continue
            common.log(f"{model} seed {seed}: float model")
            base = _float_run(model, seed, os.path.join(seed_dir, "float"), x_test, y_test)
            float_files = base["files"]
            runs.setdefault(("float", "float32", "float"), []).append(
                {**base, "seed": seed, "files": {"fp32": float_files["fp32"]}}
            )
            runs.setdefault(("int8", "int8 post-training", "int8"), []).append(
                {**base, "seed": seed, "files": {"int8": float_files["int8"]}}
            )
            for spec in specs:
                if FLAGS.cached_only and not _is_cached(model, seed, spec, os.path.join(seed_dir, spec[0])):
                    continue
                done += 1
                common.log(f"{model} seed {seed}: {spec[1]} [row {done} of {total}, {_elapsed(started)}]")
                res = _finetune_run(model, seed, spec, base["model"], os.path.join(seed_dir, spec[0]), x_test, y_test)
                runs.setdefault(spec[:3], []).append({**res, "seed": seed})
        if runs:
            by_model[model] = _points(model, runs)
    if not by_model:  # only --cached_only gets here
        raise app.UsageError(f"--cached_only: no cached float model of {FLAGS.models} in {work}; run without "
                             "--cached_only first (or pass the --work_dir that has them).")  # fmt: skip
    minutes = (time.time() - started) / 60
    meta = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}; {minutes:.0f} min for the runs not cached)",
        "command": common.command_line("benchmarks/accuracy_size.py", sys.argv[1:]),
        "quick": FLAGS.quick,
        "float_epochs": 1 if FLAGS.quick else FLAGS.float_epochs,
        "finetune_epochs": 1 if FLAGS.quick else FLAGS.finetune_epochs,
        "train_examples": len(x_train),
        "test_examples": len(x_test),
        "results_name": FLAGS.results_name,
    }
    name = FLAGS.results_name
    meta["parameters"] = _parameters(by_model)
    md_path = os.path.join(results_dir, f"{name}.md")
    atomic_write(md_path, _markdown(by_model, meta).encode())
    atomic_write(os.path.join(results_dir, f"{name}.json"),
                 json.dumps({"meta": meta, "points": by_model}, indent=1).encode())  # fmt: skip
    if FLAGS.update_readme:
        with open(README, encoding="utf-8") as f:
            text = replace_headline(f.read(), headline(by_model, meta["parameters"]))
        atomic_write(README, text.encode())
        common.log(f"updated the headline table of {README}")
    _plot(by_model, os.path.join(results_dir, f"{name}.png"), f"Fashion-MNIST, {meta['date']}")
    common.log(f"wrote {md_path}, {name}.json and {name}.png")
    print(open(md_path).read())


if __name__ == "__main__":
    app.run(main)
