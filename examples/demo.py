"""End-to-end demo on real Fashion-MNIST: float CNN -> ternarize -> fine-tune -> strip -> summary -> export -> verify.

Run it with ``make demo`` (which installs everything first) or ``.venv/bin/python examples/demo.py``.
Everything it measures goes to ``--out_dir`` (``out/demo``): the .tflite files, the C array, ``report.json``
and ``demo_results.json``.
"""

from __future__ import annotations

from ptq_keras import quiet

quiet.for_script(__name__)  # TensorFlow's start-up lines off standard error unless --verbose (before it loads)

import json
import os
import platform
import time
import warnings

from absl import app, flags
from absl import logging as absl_logging

import ptq_keras
from ptq_keras import keras
from ptq_keras.core.log import script_logger

FLAGS = flags.FLAGS
quiet.define_flag()
flags.DEFINE_integer("float_epochs", 6, "Epochs of float training.")
flags.DEFINE_integer("ptq_epochs", 4, "Epochs of PTQ fine-tuning from the float model.")
flags.DEFINE_float(
    "freeze_at", 0.5, "Fraction of the PTQ fine-tuning after which the support freezes (then the STE is masked)."
)
flags.DEFINE_bool("distill", False, "Distill from the float model while fine-tuning (ptq_keras.distill).")
flags.DEFINE_float("sparsity", 0.7, "Target fraction of zero weights in every ternarized layer.")
flags.DEFINE_float("learning_rate", 1e-3, "Adam learning rate of the float training.")
flags.DEFINE_float("finetune_learning_rate", 5e-4, "Adam learning rate of the PTQ fine-tuning.")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_integer("limit", None, "Use only the first N training examples (a quick run).")
flags.DEFINE_string("out_dir", "out/demo", "Where the models, .tflite files and reports go.")
flags.DEFINE_list(
    "targets",
    ["int8", "micro", "litert", "ethos-u"],
    "Export targets (int8, micro, litert, int4, ethos-u; ethos-u is skipped with a note when Vela is not installed).",
)
flags.DEFINE_string("encoding", "lut", "Weight encoding of the micro target: lut, huffman, prune or auto.")
flags.DEFINE_float("decay", 1e-3, "Strength of the discrepancy term of PTQ.")
flags.DEFINE_bool("export", True, "Export .tflite files and verify them on the interpreters.")


_PROGRESS = script_logger("demo", tag="demo")


def _log(message: str) -> None:
    """A progress line ``[demo HH:MM:SS] message`` through the ``ptq_keras.demo`` logger (standard output)."""
    _PROGRESS.info(message)


def _compile(model, learning_rate):
    model.compile(
        keras.optimizers.Adam(learning_rate),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )


def _train(model, learning_rate, epochs, x, y, x_test, y_test) -> tuple[float, float]:
    """Compile and fit ``model``; return (training seconds, test accuracy)."""
    _compile(model, learning_rate)
    start = time.time()
    model.fit(x, y, epochs=epochs, batch_size=FLAGS.batch_size, verbose=2)
    seconds = time.time() - start
    return seconds, model.evaluate(x_test, y_test, verbose=0)[1]


def main(argv):
    del argv
    from ptq_keras import data, models

    if not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)  # tfds' and SavedModel's INFO lines
    # The demo writes .h5 on purpose (what ptq-convert and the firmware tests read); tf_keras calls it legacy.
    warnings.filterwarnings("ignore", message="You are saving your model as an HDF5 file", category=UserWarning)

    keras.utils.set_random_seed(FLAGS.seed)
    os.makedirs(FLAGS.out_dir, exist_ok=True)
    _log("loading Fashion-MNIST (offline, from the dataset-fashion-mnist package)")
    x_train, y_train = data.load_numpy("fashion_mnist", "train", limit=FLAGS.limit)
    x_test, y_test = data.load_numpy("fashion_mnist", "test")
    x_train, x_test = x_train.astype("float32") / 255.0, x_test.astype("float32") / 255.0
    _log(f"train {x_train.shape}, test {x_test.shape}")

    model = models.build("small_cnn", x_train.shape[1:], 10)
    _log(f"training the float model for {FLAGS.float_epochs} epochs")
    float_time, float_acc = _train(model, FLAGS.learning_rate, FLAGS.float_epochs, x_train, y_train, x_test, y_test)
    _log(f"float test accuracy {float_acc:.4f}")

    qmodel = ptq_keras.ternarize(model, sparsity=FLAGS.sparsity, decay=FLAGS.decay, freeze_at=FLAGS.freeze_at)
    trained = ptq_keras.distill(qmodel, model) if FLAGS.distill else qmodel
    _log(f"PTQ fine-tuning at sparsity {FLAGS.sparsity} for {FLAGS.ptq_epochs} epochs")
    ptq_time, qat_acc = _train(
        trained, FLAGS.finetune_learning_rate, FLAGS.ptq_epochs, x_train, y_train, x_test, y_test
    )

    plain = ptq_keras.strip(qmodel)
    _compile(plain, FLAGS.finetune_learning_rate)
    stripped_acc = plain.evaluate(x_test, y_test, verbose=0)[1]
    ptq_keras.recalibrate_batchnorm(plain, x_train, steps=200)
    recal_acc = plain.evaluate(x_test, y_test, verbose=0)[1]
    _log(
        f"ternary test accuracy: QAT model {qat_acc:.4f}, stripped {stripped_acc:.4f}, "
        f"after BatchNorm re-estimation {recal_acc:.4f} (float {float_acc:.4f})"
    )
    report = ptq_keras.summary(plain)
    plain.save(os.path.join(FLAGS.out_dir, "ternary_stripped.h5"))
    model.save(os.path.join(FLAGS.out_dir, "float.h5"))

    results = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "train_examples": int(len(x_train)),
        "float_epochs": FLAGS.float_epochs,
        "ptq_epochs": FLAGS.ptq_epochs,
        "freeze_at": FLAGS.freeze_at,
        "distill": FLAGS.distill,
        "sparsity_target": FLAGS.sparsity,
        "float_test_accuracy": float_acc,
        "qat_test_accuracy": qat_acc,
        "stripped_test_accuracy": stripped_acc,
        "stripped_bn_recalibrated_test_accuracy": recal_acc,
        "per_layer_sparsity": {r.name: r.sparsity for r in report.layers if r.ternary},
        "size_bytes": report.totals_bytes,
        "size_ratio_vs_fp32": report.ratios,
        "seconds_per_epoch": {
            "float": float_time / max(FLAGS.float_epochs, 1),
            "ptq": ptq_time / max(FLAGS.ptq_epochs, 1),
        },
    }

    if FLAGS.export:
        from ptq_keras import tflite as ptq_tflite
        from ptq_keras.tflite import ethosu

        targets = list(FLAGS.targets)
        if "ethos-u" in targets and not ethosu.available():
            _log(f"skipping target ethos-u: {ethosu.missing_message()}")
            targets.remove("ethos-u")
        _log(f"exporting {targets} (micro encoding {FLAGS.encoding}) to {FLAGS.out_dir}")
        exported = ptq_tflite.export(
            plain,
            x_train[:500],
            FLAGS.out_dir,
            targets=tuple(targets),
            encoding=FLAGS.encoding,
            c_array=True,
            float_model=model,  # the ethos-u line compares with the float model's plain int8 file on the same NPU
            progress=_log,
        )
        print(exported.summary(), flush=True)
        results["export"] = exported.report.to_dict()
        results["verify"] = {}
        for target in targets:
            _log(f"verifying {exported.files[target]} on the full test set ({len(x_test)} images)")
            parity = ptq_tflite.verify(plain, exported.files[target], x_test, num_samples=len(x_test), min_top1=0.99)
            print(parity, flush=True)
            results["verify"][target] = parity.to_dict()
            if not parity.ok:
                raise SystemExit(f"parity check failed for {target}")

    with open(os.path.join(FLAGS.out_dir, "demo_results.json"), "w") as f:
        json.dump(results, f, indent=2, default=float)
    _log(
        f"done: float {float_acc:.4f} vs ternary {recal_acc:.4f} at sparsity {FLAGS.sparsity}; "
        f"results in {FLAGS.out_dir}/demo_results.json"
    )


if __name__ == "__main__":
    app.run(main)
