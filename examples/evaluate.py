"""Top-1 accuracy of a trained model over a tfds split: a Keras .h5 / SavedModel, or a .tflite file on the
TensorFlow Lite Micro interpreter or LiteRT.

    python examples/evaluate.py --model_path=out/ptq70/model.h5
    python examples/evaluate.py --model_path=out/ptq70/tflite/model_micro.tflite          # TFLM
    python examples/evaluate.py --model_path=out/ptq70/tflite/model_int8.tflite --runtime=litert

Images are fed as float in [0, 1]; an integer .tflite input is quantized with its input tensor's scale and zero point.
"""

from __future__ import annotations

from ptq_keras import quiet

quiet.for_script(__name__)  # TensorFlow's start-up lines off standard error unless --verbose (before it loads)

import importlib
import json
import os
import sys

if __package__ in (None, ""):  # run as a script: make `examples` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
from absl import app, flags

from examples import common
from ptq_keras.tflite.flatbuffer import atomic_write

RUNTIMES = ("auto", "tflm", "litert")

FLAGS = flags.FLAGS
flags.DEFINE_string("model_path", None, "A Keras .h5 file or SavedModel directory, or a .tflite file.")
flags.DEFINE_string("split", "test", "tfds split to evaluate on (any tfds split spec, e.g. 'test[:1000]').")
flags.DEFINE_enum(
    "runtime",
    "auto",
    RUNTIMES,
    ".tflite runtime: tflm (TFLM Python interpreter), litert, or auto (TFLM when it runs the file, else LiteRT).",
)
flags.DEFINE_string("output_json", None, "Also write the result as JSON to this path.")


def check_model_path(path: str | None) -> str:
    """``'tflite'`` or ``'keras'``; a ValueError that says what to pass for anything else."""
    if not path:
        raise ValueError("--model_path is required: a .h5 file, a SavedModel directory or a .tflite file.")
    if not os.path.exists(path):
        raise ValueError(f"--model_path {path!r} does not exist.")
    if path.endswith(".tflite"):
        return "tflite"
    if path.endswith((".h5", ".hdf5")) or os.path.isfile(os.path.join(path, "saved_model.pb")):
        return "keras"
    raise ValueError(f"--model_path {path!r} is neither a .h5 file, a SavedModel directory nor a .tflite file.")


def choose_runtime(tflite: bytes, runtime: str) -> str:
    """The runtime for ``tflite``: ``runtime`` if it can run the file, else a ValueError naming one that can."""
    # ptq_keras.tflite re-exports the function `verify`, which shadows the module of the same name.
    verify = importlib.import_module("ptq_keras.tflite.verify")
    available = [r for r in verify.runtimes_for(tflite) if r in ("tflm", "litert")]
    if runtime == "auto":
        if not available:
            raise ValueError("neither TFLM nor LiteRT runs this file.")
        return "tflm" if "tflm" in available else "litert"
    if runtime not in available:
        raise ValueError(f"--runtime={runtime} cannot run this {verify.detect_target(tflite)} file; use {available}.")
    return runtime


def evaluate(
    model_path: str,
    *,
    dataset: str = "fashion_mnist",
    split: str = "test",
    data_dir: str | None = None,
    runtime: str = "auto",
    batch_size: int = 128,
    limit: int | None = None,
) -> dict:
    """``{"accuracy", "examples", "runtime", ...}`` of ``model_path`` over ``split``."""
    kind = check_model_path(model_path)
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; choose one of {list(RUNTIMES)}.")
    x, y = common.load_split(dataset, split, data_dir, limit)
    result = {"model_path": model_path, "dataset": dataset, "split": split, "examples": int(len(x))}
    if kind == "tflite":
        with open(model_path, "rb") as f:
            buf = f.read()
        result["runtime"] = choose_runtime(buf, runtime)
        result["file_bytes"] = len(buf)
        result["accuracy"] = common.tflite_accuracy(buf, x, y, result["runtime"])
        return result
    import ptq_keras
    from ptq_keras import keras

    with ptq_keras.custom_object_scope():
        model = keras.models.load_model(model_path, compile=False)
    logits = model.predict(x, batch_size=batch_size, verbose=0)
    result["runtime"] = "keras"
    result["accuracy"] = float(np.mean(np.argmax(logits, axis=1) == y))
    return result


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; all settings are --flags (see --helpfull).")
    common.quiet_logs()
    try:
        if check_model_path(FLAGS.model_path) == "tflite":
            with open(FLAGS.model_path, "rb") as f:
                choose_runtime(f.read(), FLAGS.runtime)
    except ValueError as exc:
        raise app.UsageError(str(exc)) from None
    result = evaluate(
        FLAGS.model_path,
        dataset=FLAGS.dataset,
        split=FLAGS.split,
        data_dir=FLAGS.data_dir,
        runtime=FLAGS.runtime,
        batch_size=FLAGS.batch_size,
        limit=FLAGS.limit,
    )
    common.log(
        f"{result['model_path']}: accuracy {result['accuracy']:.4f} over {result['examples']} {result['dataset']} "
        f"{result['split']} examples ({result['runtime']})"
    )
    if FLAGS.output_json:
        atomic_write(FLAGS.output_json, json.dumps(result, indent=1).encode())


if __name__ == "__main__":
    app.run(main)
