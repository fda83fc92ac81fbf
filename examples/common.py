"""Flags and helpers shared by examples/train.py and examples/evaluate.py (and the benchmarks)."""

from __future__ import annotations

import time

import numpy as np
from absl import flags, logging

from ptq_keras import data

flags.DEFINE_string("dataset", "fashion_mnist", "tensorflow-datasets name of an image classification dataset.")
flags.DEFINE_string(
    "data_dir",
    None,
    "tfds data directory (default: $TFDS_DATA_DIR or ~/tensorflow_datasets). Nothing is downloaded: Fashion-MNIST "
    "is prepared from the dataset-fashion-mnist package, other datasets must be prepared there already.",
)
flags.DEFINE_integer("batch_size", 128, "Batch size (training and Keras evaluation).", lower_bound=1)
flags.DEFINE_integer(
    "limit", None, "Use only the first N examples of each split (a quick run); default: whole splits.", lower_bound=1
)

# Where each export target runs when its accuracy is measured: TFLM for the microcontroller files, LiteRT for the
# INT2/INT4 file that only LiteRT runs.
RUNTIME_OF_TARGET = {"int8": "tflm", "micro": "tflm", "int4": "tflm", "litert": "litert", "float": "litert"}


def quiet_logs() -> None:
    """Hide tfds' INFO lines unless --verbosity was given."""
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def load_split(dataset: str, split: str, data_dir: str | None, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    """``(x float32 in [0, 1] [N, H, W, C], y int64)`` of a tfds split, in file order."""
    x, y = data.load_numpy(dataset, split, data_dir, limit=limit)
    return x.astype(np.float32) / 255.0, y


def tflite_accuracy(tflite, x: np.ndarray, y: np.ndarray, runtime: str) -> float:
    """Top-1 accuracy of a .tflite (bytes or path) over ``x`` (float in [0, 1]) on ``runtime`` (``tflm``,
    ``litert``); inputs are quantized with the input tensor's scale and zero point."""
    from ptq_keras import tflite as ptq_tflite

    outputs = ptq_tflite.predict(tflite, x, runtime=runtime)
    return float(np.mean(np.argmax(outputs.reshape(len(x), -1), axis=1) == y))
