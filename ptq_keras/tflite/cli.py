"""``ptq-convert``: export a saved (ternarized or stripped) Keras model to TFLite targets from the command line.

    ptq-convert --model q.h5 --data fashion_mnist --targets int8,micro,litert --out_dir out --c_array

``--data``: a tensorflow-datasets name (read offline with ``ptq_keras.data.load``) or a ``.npy`` file of input
samples. uint8 samples are divided by 255 (``--uint8_scale``), the usual preprocessing of image models.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
from absl import app, flags, logging

from .convert import ENCODINGS, TARGETS
from .ethosu import ACCELERATORS, DEFAULT_ACCELERATOR, OPTIMISE

# A FlagValues of its own: importing this module registers nothing in absl's global flags (scripts that define
# --model or --out_dir themselves can be imported next to it); ``run`` adds these flags to the global ones.
FLAGS = flags.FlagValues()
flags.DEFINE_string(
    "model",
    None,
    "Keras model: .h5 file or SavedModel folder (tf_keras), or .keras file (Keras 3); ternarized or stripped.",
    flag_values=FLAGS,
)
flags.DEFINE_string(
    "data", None, "Representative inputs: a tfds dataset name or a .npy file of samples.", flag_values=FLAGS
)
flags.DEFINE_list(
    "targets", ["int8", "micro", "litert"], f"Comma-separated targets, from {list(TARGETS)}.", flag_values=FLAGS
)
flags.DEFINE_string("out_dir", "out", "Folder for the .tflite files, the report and the C array.", flag_values=FLAGS)
flags.DEFINE_bool(
    "c_array",
    False,
    "Also write <name>_data.cc/.h (16-byte aligned array, arena size) for firmware.",
    flag_values=FLAGS,
)
flags.DEFINE_bool(
    "firmware",
    False,
    "Also write <name>_firmware/: a TFLM firmware project (op resolver, C array, main, Makefile) that runs the "
    "model under QEMU on emulated Cortex-M (docs/FIRMWARE.md).",
    flag_values=FLAGS,
)
flags.DEFINE_enum(
    "encoding", "lut", list(ENCODINGS), "Weight encoding of target micro (TFLM_DECODE).", flag_values=FLAGS
)
flags.DEFINE_string(
    "max_decode_bytes",
    "auto",
    "Target micro: split weight tensors larger than this many bytes along output channels, so TFLM decodes at most "
    "that much at a time (bounds the arena); 'auto': half the int8 file's arena, at least 16384; 'none': no split.",
    flag_values=FLAGS,
)
flags.DEFINE_bool(
    "verbose",
    False,
    "Keep TensorFlow's start-up log and notices on standard error (PTQ_VERBOSE=1 does the same).",
    flag_values=FLAGS,
)
flags.DEFINE_integer(
    "ram_budget",
    None,
    "Target micro: the TFLM arena (bytes) the file must run in; the split bound, and if needed weights kept plain "
    "int8, are chosen by measuring the arena (instead of --max_decode_bytes).",
    lower_bound=1,
    flag_values=FLAGS,
)
flags.DEFINE_integer("num_samples", 100, "Calibration samples taken from --data.", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer(
    "verify_samples", 200, "Samples for the parity ladder (0 skips it).", lower_bound=0, flag_values=FLAGS
)
flags.DEFINE_bool("strip_names", False, "Drop tensor names and signatures from the files.", flag_values=FLAGS)
flags.DEFINE_bool(
    "keep_names",
    False,
    "Keep tensor names, signatures and metadata in the micro file (for debugging; it otherwise holds only what TFLM "
    "reads).",
    flag_values=FLAGS,
)
flags.DEFINE_bool("measure", True, "Measure TFLM arenas and invoke times for the report.", flag_values=FLAGS)
flags.DEFINE_float("uint8_scale", 1.0 / 255.0, "Multiplier applied to uint8 samples.", flag_values=FLAGS)
flags.DEFINE_string("name", "model", "File stem of the outputs.", flag_values=FLAGS)
flags.DEFINE_enum(
    "accelerator",
    DEFAULT_ACCELERATOR,
    list(ACCELERATORS),
    "Target ethos-u: the NPU Vela compiles for.",
    flag_values=FLAGS,
)
flags.DEFINE_string(
    "system_config", None, "Target ethos-u: Vela system config (default per NPU family).", flag_values=FLAGS
)
flags.DEFINE_string(
    "memory_mode", None, "Target ethos-u: Vela memory mode (default per NPU family).", flag_values=FLAGS
)
flags.DEFINE_enum("optimise", "Performance", list(OPTIMISE), "Target ethos-u: Vela's optimisation.", flag_values=FLAGS)
flags.DEFINE_string(
    "float_model",
    None,
    "Target ethos-u: the float model (.h5/SavedModel) the ternary one came from; its plain int8 file is compiled "
    "too, for comparison in the report.",
    flag_values=FLAGS,
)


def _say(line: str) -> None:
    print(f"[ptq-convert {time.strftime('%H:%M:%S')}] {line}", flush=True)


def _decode_bytes(value: str, ram_budget) -> int | str | None:
    """--max_decode_bytes as ``export`` takes it: "auto", None ("none") or a positive int."""
    text = value.strip().lower()
    if text == "none":
        return None
    if text == "auto":
        return "auto"
    if not text.isdigit() or int(text) < 1:
        raise app.UsageError(f"--max_decode_bytes must be 'auto', 'none' or a positive number of bytes, got {value!r}.")
    if ram_budget is not None:
        raise app.UsageError("--ram_budget chooses the split bound itself; leave --max_decode_bytes at 'auto'.")
    return int(text)


def load_model(path: str, flag: str = "--model"):
    """A Keras model from ``.h5`` or a SavedModel folder (tf_keras, loaded inside
    ``ptq_keras.custom_object_scope()``), or from a ``.keras`` file (Keras 3)."""
    from ptq_keras import frontends
    from ptq_keras.frontends.detect import check_keras_model

    if not os.path.exists(path):
        raise app.UsageError(f"{flag} {path!r} does not exist (give a .h5 or .keras file, or a SavedModel folder).")
    if os.path.isfile(path) and not path.endswith((".h5", ".hdf5", ".keras")):
        raise app.UsageError(f"{flag} {path!r}: expected a .h5 file (tf_keras), a .keras file (Keras 3) or a "
                             "SavedModel folder.")  # fmt: skip
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "saved_model.pb")):
        raise app.UsageError(
            f"{flag} {path!r} is a folder without saved_model.pb: not a SavedModel (give a .h5 file or the folder "
            "that model.save() wrote)."
        )
    keras3 = path.endswith(".keras")
    try:
        model = frontends.load(path, compile=False)
    except Exception as exc:  # h5py, zipfile, protobuf and Keras raise assorted errors on damaged files
        kind = "SavedModel folder" if os.path.isdir(path) else (".keras file" if keras3 else ".h5 file")
        cause = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        what = "a Keras 3" if keras3 else "a tf_keras"
        raise app.UsageError(
            f"{flag} {path!r}: the {kind} cannot be loaded as {what} model ({type(exc).__name__}: {cause}). "
            "Is it damaged or incomplete? Save it again with model.save()."
        ) from exc
    try:
        check_keras_model(model)
    except TypeError:
        raise app.UsageError(f"{flag} {path!r} holds a {type(model).__name__}, not a Keras model.") from None
    return model


def load_samples(spec: str, limit: int, uint8_scale: float) -> np.ndarray:
    """``limit`` input samples from a .npy file or a tfds dataset name (its ``train`` split, images only)."""
    if spec.endswith(".npy"):
        if not os.path.isfile(spec):
            raise app.UsageError(f"--data {spec!r}: no such .npy file.")
        try:
            x = np.load(spec, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise app.UsageError(f"--data {spec!r} is not a readable .npy array ({exc}).") from exc
        if x.dtype.kind not in "fiub" or x.ndim < 1 or len(x) == 0:
            raise app.UsageError(
                f"--data {spec!r} holds a {x.dtype} array of shape {x.shape}; give samples of the model input as a "
                "numeric array, first axis the sample (uint8 images or float inputs)."
            )
        x = x[:limit]
    else:
        from ptq_keras import data

        x = np.stack([np.asarray(image) for image, _ in data.load(spec, split="train", limit=limit)])
    x = np.asarray(x)
    if x.dtype == np.uint8:
        return x.astype(np.float32) * np.float32(uint8_scale)
    return x.astype(np.float32)


def main(argv: list[str]) -> int:
    if not FLAGS.is_parsed():  # run() parsed these flags through absl's global flags, which share them
        FLAGS.mark_as_parsed()
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; every option is a --flag.")
    if not FLAGS.model or not FLAGS.data:
        raise app.UsageError("--model and --data are required (see --help).")
    unknown = [t for t in FLAGS.targets if t not in TARGETS]
    if unknown:
        raise app.UsageError(f"--targets: unknown {unknown}; choose from {list(TARGETS)}.")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # TensorFlow's INFO lines would drown the progress lines
    from .export import export
    from .flatbuffer import FlatbufferError

    _say(f"loading model {FLAGS.model}")
    model = load_model(FLAGS.model)
    float_model = None
    if FLAGS.float_model:
        _say(f"loading float model {FLAGS.float_model}")
        float_model = load_model(FLAGS.float_model, "--float_model")
    _say(f"loading data {FLAGS.data}")
    x = load_samples(FLAGS.data, FLAGS.num_samples + FLAGS.verify_samples, FLAGS.uint8_scale)
    calibration, check = x[: FLAGS.num_samples], x[FLAGS.num_samples :]
    try:
        result = export(model, calibration, FLAGS.out_dir, float_model=float_model, **_export_options())
    except (ValueError, TypeError, FlatbufferError) as exc:
        print(f"ptq-convert: error: {exc}", file=sys.stderr, flush=True)
        return 2
    print(result.summary(), flush=True)
    ok = _verify_targets(model, result, check)
    for kind, path in result.files.items():
        _say(f"wrote {kind}: {path}")
    return 0 if ok else 1


def _export_options() -> dict:
    """The keyword arguments of ``export`` that the flags give."""
    return dict(
        targets=tuple(FLAGS.targets),
        c_array=FLAGS.c_array,
        encoding=FLAGS.encoding,
        strip_names=FLAGS.strip_names,
        keep_names=FLAGS.keep_names,
        num_samples=FLAGS.num_samples,
        name=FLAGS.name,
        measure=FLAGS.measure,
        progress=_say,
        accelerator=FLAGS.accelerator,
        system_config=FLAGS.system_config,
        memory_mode=FLAGS.memory_mode,
        optimise=FLAGS.optimise,
        max_decode_bytes=_decode_bytes(FLAGS.max_decode_bytes, FLAGS.ram_budget),
        ram_budget=FLAGS.ram_budget,
        firmware=FLAGS.firmware,
    )


def _verify_targets(model, result, check: np.ndarray) -> bool:
    """The parity ladder of every exported target on the ``check`` samples (none: True)."""
    from .verify import verify

    ok = True
    if FLAGS.verify_samples and len(check):
        for target in FLAGS.targets:
            _say(f"parity ladder for {target} on {len(check)} samples")
            report = verify(model, result.files[target], check, int8=result.int8, num_samples=len(check))
            print(report, flush=True)
            ok = ok and report.ok
    return ok


def run() -> None:
    """Console entry point ``ptq-convert``: TensorFlow's start-up lines filtered from standard error unless
    ``--verbose`` (:mod:`ptq_keras.quiet`)."""
    from .. import quiet

    quiet.install()
    flags.FLAGS.append_flag_values(FLAGS)
    for flag in FLAGS.flags_by_module_dict().get(__name__, []):
        flags.FLAGS.register_flag_by_module(sys.argv[0], flag)  # listed by --help
    app.run(main)


if __name__ == "__main__":
    run()
