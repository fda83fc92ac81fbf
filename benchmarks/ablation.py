"""Ablation over several seeds: the plain four lines, each PTQ option and each related method against float.

This is the measurement behind ptq_keras' defaults. For each model and seed a float model trains
(``--float_epochs``, Adam 1e-3), then every variant fine-tunes a copy of it for
``--epochs`` epochs exactly as a user would write it::

    q = ptq_keras.ternarize(model, sparsity=0.7)                 # + the variant's options
    q.compile(keras.optimizers.Adam(), loss, ["accuracy"])       # Adam's default learning rate
    q.fit(x, y, epochs=4, batch_size=128)
    plain = ptq_keras.strip(q, batchnorm_data=x)

and reports the test accuracy of ``plain`` (and of ``strip(q)`` without BatchNorm re-estimation) against its float
model: mean and standard deviation of the difference over the seeds, one table per model and sparsity. Variants
that change the optimizer say so (``sgd_*``: SGD 0.01 with momentum 0.9; ``*cosine``: Adam on a cosine decay from
1e-3 to 0 over the fine-tuning steps).

    .venv/bin/python benchmarks/ablation.py --variants=defaults,ramp        # small_cnn at 0.7, seeds 0 1 2
    .venv/bin/python benchmarks/ablation.py --models=small_cnn,ds_cnn --sparsities=0.7,0.85 \
        --variants=defaults,taylor,greg,psg,srfp                            # the related methods
    .venv/bin/python benchmarks/ablation.py --quick                         # smoke run, numbers meaningless

Each variant-seed run takes about 4-5 minutes for small_cnn on 2 cores. Every finished run is cached as JSON in
``--work_dir`` (float models per model and seed, shared by the sparsities); a rerun only trains what is missing
and rewrites the table from every cached run asked for. Writes ``benchmarks/results/ablation.md``
(``--results_name``; ``--quick``: into ``--work_dir``).
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

FLAGS = flags.FLAGS
flags.DEFINE_integer("seeds", 3, "Number of seeds (0 .. N-1).", lower_bound=1)
flags.DEFINE_list("variants", None, "Variants to run (default: all).")
flags.DEFINE_list("models", ["small_cnn"], "Models of ptq_keras.models.")
flags.DEFINE_integer("float_epochs", 6, "Epochs of the float model.", lower_bound=1)
flags.DEFINE_integer("epochs", 4, "Fine-tuning epochs of every variant.", lower_bound=1)
flags.DEFINE_list("sparsities", ["0.7"], "Target sparsities.")
flags.DEFINE_bool("quick", False, "Smoke run: 2048 training examples, one epoch each; numbers are not meaningful.")
flags.DEFINE_string("work_dir", "out/bench/ablation", "Cache of float models and finished runs.")
flags.DEFINE_string("results_dir", "benchmarks/results", "Where the table goes (--quick: --work_dir).")
flags.DEFINE_string("results_name", "ablation", "File name of the table: <results_name>.md.")

BATCH = 128


def _variants():
    import ptq_keras

    def ternarize(**options):
        def build(model, steps, sparsity):
            return ptq_keras.ternarize(model, sparsity=sparsity, **options)

        return _uses_default_ste(build, "ste" not in options, "min_kept" not in options)

    def ramp(model, steps, sparsity):
        schedule = ptq_keras.PolynomialDecay(0.0, sparsity, 0, steps)  # tfmot's defaults otherwise
        return ptq_keras.ternarize(model, sparsity=schedule)

    def distill(ternarize_options=None, **options):
        def build(model, steps, sparsity):
            q = ptq_keras.ternarize(model, sparsity=sparsity, **(ternarize_options or {}))
            return ptq_keras.distill(q, model, **options)

        return _uses_default_ste(build, "ste" not in (ternarize_options or {}))

    def keras3(model, steps, sparsity, backend="tensorflow"):
        # The same float model as a Keras 3 model (Keras 3 reads tf_keras .h5 files), ternarized with the defaults.
        import tempfile

        import keras

        if keras.backend.backend() != backend:
            raise app.UsageError(f"this variant runs Keras 3 on {backend}: run with KERAS_BACKEND={backend}.")

        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "float.h5")
            model.save(path)
            twin = keras.saving.load_model(path, compile=False)
        keras.utils.set_random_seed(int(np.random.randint(1 << 30)))
        return ptq_keras.ternarize(twin, sparsity=sparsity)

    def kept_depthwise(**options):
        # the depthwise kernels and the stem (the first conv) in float: they export as int8
        def build(model, steps, sparsity):
            return ptq_keras.ternarize(model, sparsity=sparsity, precision="mixed", **options)

        return _uses_default_ste(build, True)

    def allocated(rule):
        def build(model, steps, sparsity):
            overrides = {name: {"sparsity": s} for name, s in rule(model, sparsity).items()}
            return ptq_keras.ternarize(model, sparsity=sparsity, overrides=overrides, min_kept=0)

        return _uses_default_ste(build, True, False)  # min_kept=0: the overrides allocate

    # key: (label, build, the baseline of the paired column: the same seed's run of that variant)
    return {
        "defaults": ("the four plain lines (defaults: selection='tensor', freeze_at=0.5, "
                     f"ste='{common.default_ste()}')", ternarize(), None),
        "psg": ("ste='psg' (PSG, Kim et al. 2020)", ternarize(ste="psg"), "defaults"),
        "identity": ("ste='identity' (plain straight-through)", ternarize(ste="identity"), "defaults"),
        "greg": ("regularizer='greg' (GReg, Wang et al. 2021)", ternarize(regularizer="greg"), "defaults"),
        "srfp": ("soft_decay=0.9 (SRFP, Cai et al. 2020)", ternarize(soft_decay=0.9), "defaults"),
        "taylor": ("criterion='taylor' (Yu et al. 2020)", ternarize(criterion="taylor"), "defaults"),
        "sgd_defaults": ("the defaults, compiled with SGD(0.01, momentum=0.9)", ternarize(), None),
        "sgd_psg": ("ste='psg', compiled with SGD(0.01, momentum=0.9)", ternarize(ste="psg"), "sgd_defaults"),
        "distill": ("ptq_keras.distill(q, float model) (defaults: temperature=1, alpha=0.5)", distill(), "defaults"),
        "distill_t4_a09": ("ptq_keras.distill(q, float model, temperature=4, alpha=0.9)",
                           distill(temperature=4.0, alpha=0.9), "defaults"),
        "distill_t2_a05": ("ptq_keras.distill(q, float model, temperature=2, alpha=0.5)",
                           distill(temperature=2.0, alpha=0.5), "defaults"),
        "distill_psg": ("ptq_keras.distill(q, float model) with ste='psg'", distill({"ste": "psg"}), "psg"),
        "distill_a05": ("ptq_keras.distill(q, float model, temperature=4, alpha=0.5)", distill(alpha=0.5),
                        "defaults"),
        "selection_channel": ("selection='channel'", ternarize(selection="channel"), "defaults"),
        "ramp": ("sparsity=PolynomialDecay(0, s, 0, steps) (tfmot defaults)", _uses_default_ste(ramp, True),
                 "defaults"),
        "int8_activations": ("activations='int8'", ternarize(activations="int8"), "defaults"),
        "never_frozen": ("freeze_at=None (never frozen)", ternarize(freeze_at=None), "defaults"),
        "ste_masked": ("ste='masked' from the start", ternarize(ste="masked"), "defaults"),
        "no_decay": ("decay=0 (no discrepancy term)", ternarize(decay=0.0), "defaults"),
        "granularity_tensor": ("granularity='tensor' (one scale per layer)", ternarize(granularity="tensor"),
                               "defaults"),
        "min_kept0": ("min_kept=0 (every layer at the target sparsity, the default before min_kept)",
                      ternarize(min_kept=0), "defaults"),
        "min_kept2": ("min_kept=2 (small fan-in layers keep 2 weights per channel)", ternarize(min_kept=2), "defaults"),
        "min_kept8": ("min_kept=8 (small fan-in layers keep 8 weights per channel)", ternarize(min_kept=8), "defaults"),
        "erk": ("per-layer sparsities by Erdos-Renyi-Kernel (Evci et al. 2020), the same total of zeros",
                allocated(_erk), "defaults"),
        "keep_dw_int8": ("`precision='mixed'`: the defaults with the depthwise kernels (each SeparableConv2D's "
                         "depthwise half included) and the stem conv kept in float, so they export as int8.",
                         kept_depthwise(), "defaults"),
        "cosine": ("The defaults, compiled with Adam whose learning rate follows a cosine decay from 1e-3 to 0 over "
                   "the fine-tuning steps.", _cosine(ternarize()), "defaults"),
        "keep_dw_int8_cosine": ("The depthwise kernels and the stem kept in float (as keep_dw_int8), compiled with "
                                "Adam on the cosine decay (as cosine).", _cosine(kept_depthwise()), "defaults"),
        "keras3": ("the defaults on the same model as a Keras 3 model (TensorFlow backend)",
                   _uses_default_ste(keras3, True), "defaults"),
        "keras3_jax": ("the defaults on the same model as a Keras 3 model on JAX (KERAS_BACKEND=jax)",
                       _uses_default_ste(lambda m, t, s: keras3(m, t, s, "jax"), True), "defaults"),
    }  # fmt: skip


def _kernels(model) -> dict:
    """{layer name: (kernel shape as (..., fan-in, outputs), fan-in per output channel)} of the ternarizable layers."""
    out = {}
    for layer in model.layers:
        kind = type(layer).__name__
        if kind == "DepthwiseConv2D":
            shape = tuple(layer.depthwise_kernel.shape)
            out[layer.name] = (shape, int(np.prod(shape[:2])))
        elif kind in ("Conv2D", "Dense"):
            shape = tuple(layer.kernel.shape)
            out[layer.name] = (shape, int(np.prod(shape[:-1])))
    return out


def _erk(model, sparsity: float) -> dict:
    """Erdos-Renyi-Kernel densities (sum of the kernel's dimensions / their product, scaled to the total; layers
    that would exceed density 1 stay dense and the rest is rescaled)."""
    kernels = _kernels(model)
    size = {k: int(np.prod(shape)) for k, (shape, _) in kernels.items()}
    raw = {k: sum(shape) / np.prod(shape) for k, (shape, _) in kernels.items()}
    dense: set = set()
    while True:
        budget = (1 - sparsity) * sum(size.values()) - sum(size[k] for k in dense)
        eps = budget / sum(raw[k] * size[k] for k in size if k not in dense)
        over = {k for k in size if k not in dense and eps * raw[k] > 1}
        if not over:
            return {k: 0.0 if k in dense else float(1 - eps * raw[k]) for k in size}
        dense |= over


def _cosine(build):
    """``build`` compiled with Adam on ``CosineDecay(1e-3, steps)`` (from Adam's default learning rate to 0 over the
    fine-tuning steps) instead of Adam's constant default."""
    build.cosine = True
    return build


def _uses_default_ste(build, uses: bool, uses_min_kept: bool = True):
    # a cached run of it is stale once the library's default STE (or min_kept, where it uses it) changes
    build.uses_default_ste = uses
    build.uses_default_min_kept = uses_min_kept
    return build


def _accuracy(model, x, y) -> float:
    logits = model.predict(x, batch_size=512, verbose=0)
    return float(np.mean(np.argmax(logits, axis=1) == y))


def _float_model(name: str, seed: int, x, y, x_test, y_test, work: str):
    """The seed's float model (``common.float_model``, cached in ``work``) and its test accuracy (cached beside it)."""
    model = common.float_model(name, seed, x, y, (work,), work, epochs=1 if FLAGS.quick else FLAGS.float_epochs,
                               batch_size=BATCH)  # fmt: skip
    meta_path = os.path.join(work, f"float_seed{seed}.h5.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            return model, json.load(f)["accuracy"]
    accuracy = _accuracy(model, x_test, y_test)
    with open(meta_path + ".tmp", "w") as f:
        json.dump({"accuracy": accuracy}, f)
    os.replace(meta_path + ".tmp", meta_path)
    return model, accuracy


def _run_variant(key, build, name, sparsity, seed, data, work):
    import ptq_keras
    from ptq_keras import keras

    x, y, x_test, y_test = data
    run_dir = os.path.join(work, f"s{sparsity:g}")
    cache = os.path.join(run_dir, f"{key}_seed{seed}.json")
    if os.path.exists(cache):
        with open(cache) as f:
            cached = json.load(f)
        # runs from before the STE (min_kept) was recorded trained with the default of that time, "identity" (0)
        recipe = (cached.get("default_ste", "identity"), cached.get("default_min_kept", 0))
        today = (common.default_ste() if build.uses_default_ste else recipe[0],
                 common.default_min_kept() if build.uses_default_min_kept else recipe[1])  # fmt: skip
        if recipe == today:
            return cached
        print(f"{cache}: trained with another default STE or min_kept than today's; training again", flush=True)
    float_model, float_acc = _float_model(name, seed, x, y, x_test, y_test, work)
    keras.utils.set_random_seed(1000 + seed)
    epochs = 1 if FLAGS.quick else FLAGS.epochs
    steps = epochs * -(-len(x) // BATCH)
    q = build(float_model, steps, sparsity)
    if ptq_keras.compat.is_keras3(q):
        import keras  # the Keras 3 model compiles with Keras 3's optimizer and loss
    if key.startswith("sgd_"):
        optimizer = keras.optimizers.SGD(0.01, momentum=0.9)
    elif getattr(build, "cosine", False):
        optimizer = keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(1e-3, steps))
    else:
        optimizer = keras.optimizers.Adam()
    q.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    start = time.time()
    q.fit(x, y, epochs=epochs, batch_size=BATCH, verbose=2)
    seconds = time.time() - start
    stripped = ptq_keras.strip(q)
    before_bn = _accuracy(stripped, x_test, y_test)
    plain = ptq_keras.strip(q, batchnorm_data=x)
    result = {
        "variant": key,
        "seed": seed,
        "default_ste": common.default_ste(),
        "default_min_kept": common.default_min_kept(),
        "float_accuracy": float_acc,
        "accuracy": _accuracy(plain, x_test, y_test),
        "accuracy_before_bn": before_bn,
        "sparsity": float(np.mean([r.sparsity for r in ptq_keras.summary(plain, print_fn=None).layers if r.ternary])),
        "zeros": _zeros(plain),
        "micro_bytes": len(_convert()(plain, x[:256], target="micro", encoding="auto")),
        "train_seconds": seconds,
    }
    os.makedirs(run_dir, exist_ok=True)
    with open(cache + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(cache + ".tmp", cache)
    return result


def _convert():
    from ptq_keras.tflite import convert

    return convert


def _zeros(model) -> float:
    """Fraction of zeros over all ternary kernels (weighted by size)."""
    import ptq_keras

    layers = [r for r in ptq_keras.summary(model, print_fn=None).layers if r.ternary]
    return float(sum(r.sparsity * r.params for r in layers) / sum(r.params for r in layers))


def _stats(runs) -> dict:
    diff = np.array([100 * (r["accuracy"] - r["float_accuracy"]) for r in runs])
    return {
        "accuracy": float(np.mean([100 * r["accuracy"] for r in runs])),
        "diff": float(diff.mean()),
        "sd": float(np.std(diff, ddof=1)) if len(diff) > 1 else float("nan"),
        "worst": float(diff.min()),
        "raw": float(np.mean([100 * (r["accuracy_before_bn"] - r["float_accuracy"]) for r in runs])),
    }


def _mean_of(runs, key: str, fmt: str) -> str:
    """The mean of a field over the runs that recorded it (runs cached before it was recorded lack it): '-' if none."""
    values = [r[key] for r in runs if key in r]
    return fmt.format(np.mean(values)) if values else "-"


def _markdown(sections, names, baselines, meta) -> str:
    lines = [
        "# Ablation over seeds: the plain four lines, the options and the related methods against float",
        "",
        f"Measured {meta['date']} on {meta['machine']} by `{meta['command']}`"
        + (" (**--quick smoke run: not meaningful**)" if meta["quick"] else "")
        + ".",
        "",
        f"Fashion-MNIST. Per model and seed, a float model trains {meta['float_epochs']} epochs (Adam 1e-3, batch "
        f"{BATCH}); every variant fine-tunes it {meta['epochs']} epochs with `fit` at Adam's default learning rate "
        "(unless the variant names another optimizer or schedule), "
        "then `strip(q, batchnorm_data=x)`. Accuracy over the 10k test set; the difference to the float model of "
        "the same seed, mean and standard deviation over the seeds. Differences under about one sd (or one point "
        "for one seed) are noise.",
        "",
    ]
    for (model, sparsity), rows in sections.items():
        lines += [
            f"## {model}, sparsity {sparsity:g}",
            "",
            "| variant | seeds | accuracy (mean) | vs float, mean | sd | worst seed | vs its baseline, same seed: "
            "mean +- sd | without BN re-estimation: vs float | zeros (all ternary weights) | micro file bytes |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for key, runs in rows.items():
            st = _stats(runs)
            base = {r["seed"]: r["accuracy"] for r in rows.get(baselines[key], [])}
            paired = [100 * (r["accuracy"] - base[r["seed"]]) for r in runs if r["seed"] in base]
            vs = "-" if not paired else f"{np.mean(paired):+.2f}" + (
                f" +- {np.std(paired, ddof=1):.2f}" if len(paired) > 1 else ""
            ) + f" (vs {baselines[key]})"
            lines.append(
                f"| {names[key]} | {len(runs)} | {st['accuracy']:.2f}% | {st['diff']:+.2f} | {st['sd']:.2f} "
                f"| {st['worst']:+.2f} | {vs} | {st['raw']:+.2f} | {_mean_of(runs, 'zeros', '{:.3f}')} "
                f"| {_mean_of(runs, 'micro_bytes', '{:,.0f}')} |"
            )
        floats = sorted({(r["seed"], r["float_accuracy"]) for runs in rows.values() for r in runs})
        lines += ["", "Float models: " + ", ".join(f"seed {s} {100 * a:.2f}%" for s, a in floats) + ".", ""]
    return "\n".join(lines)


def main(argv):
    del argv
    from ptq_keras import data, models

    variants = _variants()
    keys = FLAGS.variants or list(variants)
    unknown = sorted(set(keys) - set(variants))
    if unknown:
        raise app.UsageError(f"unknown --variants {unknown}; known: {sorted(variants)}")
    for name in FLAGS.models:
        if name not in models.MODELS:
            raise app.UsageError(f"--models: unknown model {name!r}; choose from {sorted(models.MODELS)}.")
    sparsities = [float(s) for s in FLAGS.sparsities]
    if not all(0.0 < s < 1.0 for s in sparsities):
        raise app.UsageError(f"--sparsities {FLAGS.sparsities}: each must be in (0, 1).")
    limit = 2048 if FLAGS.quick else None
    x, y = data.load_numpy("fashion_mnist", "train", limit=limit)
    x_test, y_test = data.load_numpy("fashion_mnist", "test", limit=limit)
    x, x_test = (x / 255.0).astype("float32"), (x_test / 255.0).astype("float32")
    start = time.time()
    sections = {}
    for name in FLAGS.models:
        work = os.path.join(FLAGS.work_dir, "quick" if FLAGS.quick else "", name)
        os.makedirs(work, exist_ok=True)
        for sparsity in sparsities:
            rows = sections.setdefault((name, sparsity), {})
            for key in keys:
                rows[key] = []
                for seed in range(FLAGS.seeds):
                    print(f"[{time.strftime('%H:%M:%S')}] {name} s{sparsity:g} {key} seed {seed}", flush=True)
                    build = variants[key][1]
                    r = _run_variant(key, build, name, sparsity, seed, (x, y, x_test, y_test), work)
                    print(f"  -> {100 * r['accuracy']:.2f}% (float {100 * r['float_accuracy']:.2f}%)", flush=True)
                    rows[key].append(r)
    meta = {
        "epochs": FLAGS.epochs,
        "float_epochs": FLAGS.float_epochs,
        "quick": FLAGS.quick,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}; {int(time.time() - start)} s for the runs not cached)",
        "command": common.command_line("benchmarks/ablation.py", sys.argv[1:]),
    }
    names = {k: variants[k][0] for k in keys}
    baselines = {k: variants[k][2] for k in keys}
    out_dir = os.path.join(FLAGS.work_dir, "quick") if FLAGS.quick else FLAGS.results_dir
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, FLAGS.results_name + ".md")
    with open(path + ".tmp", "w") as f:
        f.write(_markdown(sections, names, baselines, meta))
    os.replace(path + ".tmp", path)
    print(open(path).read())


if __name__ == "__main__":
    app.run(main)
