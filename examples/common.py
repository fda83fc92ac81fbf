"""Flags and helpers shared by examples/train.py and examples/evaluate.py (and the benchmarks)."""

from __future__ import annotations

import numpy as np
from absl import flags, logging

from ptq_keras import data, quiet
from ptq_keras.core.log import script_logger

quiet.define_flag()
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


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo where there is one, else the platform's machine type."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


_PROGRESS = script_logger("examples")


def log(message: str) -> None:
    """A progress line ``[HH:MM:SS] message`` through the ``ptq_keras.examples`` logger (standard output)."""
    _PROGRESS.info(message)


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


def float_model(name: str, seed: int, x: np.ndarray, y: np.ndarray, caches=(), save_dir: str | None = None,
                epochs: int = 6, batch_size: int = 128):  # fmt: skip
    """The benchmarks' float starting point: model ``name`` trained ``epochs`` with Adam 1e-3 from ``seed``, loaded
    from ``<cache>/float_seed<seed>.h5`` of the first of ``caches`` holding one, else trained (and saved to
    ``save_dir``)."""
    import os

    from ptq_keras import keras, models

    for folder in caches:
        path = os.path.join(folder, f"float_seed{seed}.h5")
        if os.path.exists(path):
            return keras.models.load_model(path, compile=False)
    keras.utils.set_random_seed(seed)
    model = models.build(name, x.shape[1:], 10)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(keras.optimizers.Adam(1e-3), loss, ["accuracy"])
    model.fit(x, y, epochs=epochs, batch_size=batch_size, verbose=2)
    if save_dir:
        os.makedirs(save_dir, exist_ok=True)
        path = os.path.join(save_dir, f"float_seed{seed}.h5")
        model.save(path + ".tmp.h5")
        os.replace(path + ".tmp.h5", path)
    return model


def default_ste() -> str:
    """The library's default straight-through estimator (cached benchmark runs record it: a change retrains)."""
    from ptq_keras.core.options import DEFAULTS

    return DEFAULTS["ste"]


def default_min_kept() -> float:
    """The library's default ``min_kept`` (cached benchmark runs record it: a change retrains)."""
    from ptq_keras.core.options import DEFAULTS

    return DEFAULTS["min_kept"]


def default_recipe() -> str:
    """The library defaults that decide a run's result, as a cache key: the STE and ``min_kept``."""
    return f"{default_ste()}_k{default_min_kept():g}"


def command_line(script: str, argv: list[str]) -> str:
    """``python <script> <argv>`` as a results file records it: paths inside the repository written relative to
    its root (a run from another checkout or a worktree records the same command)."""
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    prefixes = {os.getcwd() + os.sep, root + os.sep}
    args = []
    for arg in argv:
        for prefix in prefixes:
            arg = arg.replace(prefix, "")
        args.append(arg)
    return " ".join(["python", script, *args])


def cached(path: str) -> dict | None:
    """The JSON result cached at ``path``, or None."""
    import json
    import os

    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)
