"""Train a zoo model on a tfds dataset with one compression method, checkpoint every epoch, export .tflite files.

Methods: ``float``; ``ptq`` (sparse ternary, ``ptq_keras.ternarize``); ``twn`` (ternary, TWN threshold);
``int8_ptq`` (float training, int8 post-training quantization at export); ``tfmot_qat`` (tfmot int8
quantization-aware training); ``tfmot_prune`` (tfmot magnitude pruning, int8 at export).

    python examples/train.py --method=float --epochs=8 --out_dir=out/float
    python examples/train.py --method=ptq --sparsity=0.7 --epochs=4 --init_from=out/float/model.h5 \\
        --export=int8,micro --out_dir=out/ptq70

``out_dir`` receives ``model.h5`` (the final plain model: for ternary methods exactly ternary kernels),
``results.json``, TensorBoard logs (``logs/``, with per-layer sparsity and scale), a checkpoint per epoch
(``checkpoints/``; ``--resume`` continues a killed run with nothing lost) and the exported files (``tflite/``).
"""

from __future__ import annotations

from ptq_keras import quiet

quiet.for_script(__name__)  # TensorFlow's start-up lines off standard error unless --verbose (before it loads)

import dataclasses
import os
import sys

if __package__ in (None, ""):  # run as a script: make `examples` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

from examples import common
from examples.recipe import ENCODINGS, METHODS, TARGETS, Config, run, validate
from ptq_keras import models
from ptq_keras.core.options import DEFAULTS

FLAGS = flags.FLAGS
flags.DEFINE_enum("model", "small_cnn", sorted(models.MODELS), "Zoo model to build (ignored with --init_from).")
flags.DEFINE_enum("method", "ptq", METHODS, "Compression method.")
flags.DEFINE_float("sparsity", 0.7, "ptq / tfmot_prune: target fraction of zero weights per layer, in [0, 1).")
flags.DEFINE_enum(
    "threshold", "sparsity", ["sparsity", "l2", "twn"], "ptq: support selection (exact top-k, L2 projection, TWN)."
)
flags.DEFINE_enum(
    "ste",
    "default",
    ["default", "identity", "masked", "clipped", "psg"],
    "ptq / twn: straight-through estimator ('default': ptq_keras' default for ptq, 'identity' for twn, the STE of "
    "the TWN paper).",
)
flags.DEFINE_enum("criterion", "magnitude", ["magnitude", "taylor"], "ptq: rank weights by |w| or by a Taylor score.")
flags.DEFINE_enum("regularizer", "none", ["none", "greg"], "ptq: 'greg' grows an L2 penalty on to-be-pruned weights.")
flags.DEFINE_float(
    "soft_decay", 1.0, "ptq: pruned latents are multiplied by this once per epoch until the support freezes (SRFP).",
    lower_bound=0.0, upper_bound=1.0,
)  # fmt: skip
flags.DEFINE_enum("granularity", "channel", ["channel", "tensor"], "ptq / twn: one scale per channel or per layer.")
flags.DEFINE_enum("selection", "tensor", ["channel", "tensor"], "ptq: top-k support per layer or per channel.")
flags.DEFINE_bool("normalize", False, "ptq: select the support on per-channel L2-normalized weights.")
flags.DEFINE_float(
    "min_kept", DEFAULTS["min_kept"],
    "ptq: every layer keeps at least this many weights per output channel on average (its sparsity is capped at "
    "1 - min_kept / fan-in: stems, depthwise filters); 0 prunes every layer to --sparsity.", lower_bound=0.0,
)  # fmt: skip
flags.DEFINE_float("decay", 1e-3, "ptq / twn: strength of the discrepancy term lambda * (W - W_q) in the gradient.")
flags.DEFINE_integer(
    "ramp_epochs",
    0,
    "ptq / tfmot_prune: epochs over which sparsity ramps from 0 to --sparsity (cubic); 0: the target from the first "
    "step (ptq_keras' default).",
    lower_bound=0,
)
flags.DEFINE_float(
    "freeze_at",
    0.5,
    "ptq / twn: fraction of the training steps after which the support freezes and the STE becomes 'masked' (never "
    "before the ramp ends); 0: never.",
    lower_bound=0.0,
    upper_bound=1.0,
)
flags.DEFINE_bool("distill", False, "ptq / twn: distill from the --init_from float model (ptq_keras.distill).")
flags.DEFINE_float("temperature", 1.0, "--distill: softening temperature.", lower_bound=0.0)
flags.DEFINE_float(
    "alpha", 0.5, "--distill: weight of the soft-target loss in [0, 1].", lower_bound=0.0, upper_bound=1.0
)
flags.DEFINE_enum(
    "activations", "none", ["none", "int8"], "ptq / twn: 'int8' trains with 8-bit activation fake-quantization."
)
flags.DEFINE_enum(
    "precision", "ternary", ["ternary", "mixed"], "ptq / twn: 'mixed' keeps the depthwise kernels and the stem in "
    "float (int8 in the files; ternarize(precision='mixed')): about +1.2 to +3 KB of micro file on depthwise models, "
    "closing most of their accuracy gap."
)
flags.DEFINE_integer(
    "recalibrate_bn_steps",
    200,
    "ptq / twn: batches of training data over which BatchNorm statistics are re-estimated with the final ternary "
    "weights (0: off).",
    lower_bound=0,
)
flags.DEFINE_integer("epochs", 4, "Training epochs.", lower_bound=1)
flags.DEFINE_float("learning_rate", 1e-3, "Adam learning rate.", lower_bound=0.0)
flags.DEFINE_string("init_from", None, "A float Keras .h5 (or SavedModel) to start from, e.g. a trained float model.")
flags.DEFINE_list(
    "export",
    None,
    f"Export targets, a comma list of {list(TARGETS)} ('' for none). Default: int8,micro for ptq and twn, int8 for "
    "the others. litert, int4 and micro with --encoding=lut store ternary kernels, so they need --method=ptq or "
    "twn; micro with any other --encoding takes any int8 model (e.g. --method=tfmot_prune).",
)
flags.DEFINE_enum(
    "encoding",
    "lut",
    list(ENCODINGS),
    "Weight encoding of the micro target (TFLM_DECODE): 2-bit LUT, Huffman, PRUNE, Huffman over groups of four "
    "weights (huffman_group), or auto (smallest per tensor).",
)
flags.DEFINE_bool("measure", True, "Measure the TFLM arena and invoke time of exported files (slower).")
flags.DEFINE_bool("eval_tflite", True, "Measure the exported files' accuracy over the test split on their runtime.")
flags.DEFINE_string("out_dir", "out/train", "Output directory (model, results, logs, checkpoints, .tflite files).")
flags.DEFINE_integer("seed", 0, "Random seed (weights, data order).")
flags.DEFINE_enum(
    "strategy",
    "default",
    ["default", "mirrored", "multi_worker_mirrored", "tpu"],
    "tf.distribute strategy; --batch_size is the global batch (split over the replicas). With N replicas keep the "
    "learning rate of the same global batch on one device.",
)
flags.DEFINE_integer(
    "cpu_devices", 0, "Split the CPU into N logical devices (a multi-replica run on one machine; 0: no split).",
    lower_bound=0,
)  # fmt: skip
flags.DEFINE_integer(
    "image_size", None,
    "Stream the dataset with the ImageNet preprocessing at this square size (random resized crop + flip for "
    "training, resize + central crop for evaluation) instead of loading it into memory; datasets whose images "
    "vary in size (imagenet2012) stream at 224 by default.",
    lower_bound=8,
)  # fmt: skip
flags.DEFINE_integer(
    "tflite_eval_samples", 2000,
    "Streamed datasets: evaluation images over which the exported files' accuracy is measured (the Python "
    "TFLM interpreter runs one image at a time).",
    lower_bound=1,
)  # fmt: skip
flags.DEFINE_bool(
    "mixed_precision", False,
    "Train with Keras' mixed_float16 policy (float16 compute, float32 variables; the ternary quantizer computes in "
    "float32). The saved and exported model is float32. Pays off on GPUs with float16 units (compute capability 7+).",
)  # fmt: skip
flags.DEFINE_bool("resume", False, "Continue the run in --out_dir from its last checkpoint (same flags).")
flags.DEFINE_integer(
    "max_steps_per_epoch", None, "Stop each epoch after N steps (a quick run); default: the whole split.", lower_bound=1
)


def config_from_flags() -> Config:
    """The run the flags describe."""
    values = {f.name: FLAGS[f.name].value for f in dataclasses.fields(Config)}
    if values["export"] is not None:
        values["export"] = tuple(values["export"])
    return Config(**values)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; all settings are --flags (see --helpfull).")
    common.quiet_logs()
    cfg = config_from_flags()
    try:
        validate(cfg)
    except ValueError as exc:
        raise app.UsageError(str(exc)) from None
    run(cfg)


if __name__ == "__main__":
    app.run(main)
