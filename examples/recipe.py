"""The training recipe of ``examples/train.py`` as a library: :class:`Config` (every setting of a run),
:func:`validate`, :func:`run` (build or load the model, wrap it for the method, train with a checkpoint per
epoch, strip, export and measure) and what they use. ``train.py`` turns its flags into a :class:`Config`; the
benchmarks build one directly.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import platform
import shutil
import time

import numpy as np

import ptq_keras
from examples import common
from ptq_keras import keras, models
from ptq_keras.compat import tf, tfmot
from ptq_keras.core import options as ternarize_options
from ptq_keras.core.options import DEFAULTS
from ptq_keras.tflite.convert import ENCODINGS, needs_ternary
from ptq_keras.tflite.flatbuffer import atomic_write

METHODS = ("float", "ptq", "twn", "int8_ptq", "tfmot_qat", "tfmot_prune")
TERNARY_METHODS = ("ptq", "twn")
TARGETS = ("int8", "micro", "litert", "int4")
DEFAULT_EXPORT = {"ptq": ("int8", "micro"), "twn": ("int8", "micro")}  # other methods: ("int8",)
_KERNEL_NAMES = ("kernel", "depthwise_kernel", "pointwise_kernel")
# Settings that define a run: a checkpoint only resumes a run with the same values.
_RUN_IDENTITY = (
    "dataset", "model", "method", "sparsity", "threshold", "ste", "granularity", "selection", "normalize", "decay",
    "min_kept", "criterion", "regularizer", "soft_decay",
    "ramp_epochs", "freeze_at", "distill", "temperature", "alpha", "activations", "batch_size", "learning_rate",
    "init_from", "seed", "limit", "max_steps_per_epoch", "image_size", "mixed_precision", "precision",
)  # fmt: skip
# Identity settings added after checkpoints were first written: the value such a checkpoint trained with.
_IDENTITY_SINCE = {"precision": "ternary"}


@dataclasses.dataclass
class Config:
    """Every setting of a training run (the flags, as a value the benchmarks can build directly)."""

    dataset: str = "fashion_mnist"
    data_dir: str | None = None
    model: str = "small_cnn"
    method: str = "ptq"
    sparsity: float = 0.7
    threshold: str = "sparsity"
    ste: str = "default"
    criterion: str = "magnitude"
    regularizer: str = "none"
    soft_decay: float = 1.0
    granularity: str = "channel"
    selection: str = "tensor"
    normalize: bool = False
    decay: float = 1e-3
    min_kept: float = DEFAULTS["min_kept"]
    ramp_epochs: int = 0
    freeze_at: float = 0.5
    distill: bool = False
    temperature: float = 1.0
    alpha: float = 0.5
    activations: str = "none"
    precision: str = "ternary"
    recalibrate_bn_steps: int = 200
    epochs: int = 4
    batch_size: int = 128
    learning_rate: float = 1e-3
    init_from: str | None = None
    export: tuple | None = None
    encoding: str = "lut"
    measure: bool = True
    eval_tflite: bool = True
    out_dir: str = "out/train"
    seed: int = 0
    strategy: str = "default"
    cpu_devices: int = 0
    resume: bool = False
    max_steps_per_epoch: int | None = None
    limit: int | None = None
    image_size: int | None = None
    tflite_eval_samples: int = 2000
    mixed_precision: bool = False

    def targets(self) -> tuple:
        if self.export is not None:
            return tuple(self.export)
        return DEFAULT_EXPORT.get(self.method, ("int8",))


def validate(cfg: Config) -> None:
    """Raise ValueError naming the bad setting and the fix (before any data loads or training starts)."""

    def choice(name: str, value, choices) -> None:
        if value not in choices:
            raise ValueError(f"unknown {name} {value!r}; choose one of {list(choices)}.")

    choice("method", cfg.method, METHODS)
    choice("strategy", cfg.strategy, ("default", "mirrored", "multi_worker_mirrored", "tpu"))
    choice("ste", cfg.ste, ("default", *ste_modes()))
    choice("regularizer", cfg.regularizer, ("none", "greg"))
    try:  # the options of ptq_keras.ternarize: validated where ternarize validates them
        ternarize_options.validate(_ternary_options(cfg), "flags")
    except (TypeError, ValueError) as exc:
        raise ValueError(str(exc).replace("flags: ", "--", 1)) from None
    choice("encoding", cfg.encoding, ENCODINGS)
    choice("activations", cfg.activations, ("none", "int8"))
    choice("precision", cfg.precision, ("ternary", "mixed"))
    if not 0.0 <= cfg.freeze_at <= 1.0:
        raise ValueError(f"--freeze_at={cfg.freeze_at} is outside [0, 1]: a fraction of the training steps (0: never).")
    if cfg.distill and (cfg.method not in TERNARY_METHODS or cfg.init_from is None):
        raise ValueError("--distill needs --method=ptq or twn and --init_from (the float teacher's .h5).")
    if cfg.init_from is None:
        choice("model", cfg.model, sorted(models.MODELS))
    elif not os.path.exists(cfg.init_from):
        raise ValueError(f"--init_from {cfg.init_from!r} does not exist; give the .h5 file of a trained float model.")
    if cfg.method == "twn" and cfg.threshold not in ("sparsity", "twn"):
        raise ValueError(f"--method=twn sets the TWN threshold; drop --threshold={cfg.threshold}.")
    if cfg.ramp_epochs > cfg.epochs and cfg.method in ("ptq", "tfmot_prune"):
        raise ValueError(
            f"--ramp_epochs={cfg.ramp_epochs} exceeds --epochs={cfg.epochs}: the sparsity target would never be "
            "reached; lower --ramp_epochs or train longer."
        )
    for name in ("epochs", "batch_size"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(cfg, name)}.")
    if cfg.learning_rate <= 0:
        raise ValueError(f"--learning_rate must be > 0, got {cfg.learning_rate}.")
    targets = cfg.targets()
    for target in targets:
        choice("export target", target, TARGETS)
    if len(set(targets)) != len(targets):
        raise ValueError(f"--export={','.join(targets)} names a target twice.")
    packed = [t for t in targets if needs_ternary(t, cfg.encoding)]
    ternary_only = sorted({"litert", "int4"} & set(targets))
    if cfg.precision == "mixed" and ternary_only:
        raise ValueError(
            f"--precision=mixed keeps int8 kernels, which --export target(s) {ternary_only} cannot store (they pack "
            "ternary kernels only); export int8 and micro, or train with --precision=ternary."
        )
    if packed and cfg.method not in TERNARY_METHODS:
        raise ValueError(
            f"--export target(s) {packed} store ternary kernels (micro: with --encoding={cfg.encoding}), which "
            f"--method={cfg.method} does not produce; export int8 (or micro with --encoding=huffman, prune or auto), "
            "or train with --method=ptq or --method=twn."
        )


# ----------------------------------------------------------------------------- models
def _loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def with_dtype(model: keras.Model, dtype: str) -> keras.Model:
    """A copy of ``model`` whose layers compute in ``dtype`` policy (``"mixed_float16"``, ``"float32"``), with the
    same (float32) weights."""
    if not model.layers or all(layer.dtype_policy.name == dtype for layer in model.layers):
        return model

    def clone(layer):
        return layer.__class__.from_config({**layer.get_config(), "dtype": dtype})

    with ptq_keras.custom_object_scope():
        copy = keras.models.clone_model(model, clone_function=clone)
    copy.set_weights(model.get_weights())
    return copy


def _initial_model(cfg: Config, input_shape: tuple, num_classes: int) -> keras.Model:
    if cfg.init_from is None:
        return models.build(cfg.model, input_shape, num_classes)
    with ptq_keras.custom_object_scope():
        model = keras.models.load_model(cfg.init_from, compile=False)
    if ptq_keras.is_ternarized(model):
        raise ValueError(f"--init_from {cfg.init_from!r} is a ternarized training model; give a float model.")
    got = tuple(model.inputs[0].shape[1:])
    if got != tuple(input_shape):
        raise ValueError(
            f"--init_from model takes inputs {got}, but {cfg.dataset} images are {tuple(input_shape)}; "
            "train a float model on this dataset first."
        )
    return model


def _sparsity_schedule(cfg: Config, steps_per_epoch: int, frequency: int, schedules=ptq_keras):
    """The run's sparsity: a float, or with ``--ramp_epochs`` a ``PolynomialDecay`` of ``schedules`` (ptq_keras's for
    the ternary methods, ``tfmot.sparsity.keras``'s for tfmot pruning: each accepts only its own classes)."""
    if cfg.ramp_epochs == 0:
        return cfg.sparsity
    return schedules.PolynomialDecay(
        initial_sparsity=0.0,
        final_sparsity=cfg.sparsity,
        begin_step=0,
        end_step=cfg.ramp_epochs * steps_per_epoch,
        frequency=frequency,
    )


def _tfmot_qat(model: keras.Model) -> keras.Model:
    """tfmot's default int8 QAT, annotating layer by layer (quantize_annotate_model rejects BatchNormalization)."""
    quant = tfmot.quantization.keras
    kernels = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense)
    pairs = []

    def annotate(layer):
        fresh = layer.__class__.from_config(layer.get_config())
        pairs.append((layer, fresh))
        return quant.quantize_annotate_layer(fresh) if isinstance(layer, kernels) else fresh

    annotated = keras.models.clone_model(model, clone_function=annotate)
    for original, fresh in pairs:
        fresh.set_weights(original.get_weights())
    with quant.quantize_scope():
        return quant.quantize_apply(annotated)


def ste_for(cfg: Config) -> str:
    if cfg.ste != "default":
        return cfg.ste
    return "identity" if cfg.method == "twn" else DEFAULTS["ste"]


def ste_modes() -> tuple:
    from ptq_keras.core.ste import STE_MODES

    return STE_MODES


def _ternary_options(cfg: Config) -> dict:
    """The flags that are options of ``ptq_keras.ternarize`` (as ``training_model`` passes them)."""
    return dict(
        sparsity=cfg.sparsity, threshold=cfg.threshold, ste=ste_for(cfg), granularity=cfg.granularity,
        selection=cfg.selection, criterion=cfg.criterion, soft_decay=cfg.soft_decay, decay=cfg.decay,
        min_kept=cfg.min_kept, regularizer=None if cfg.regularizer == "none" else cfg.regularizer,
    )  # fmt: skip


def training_model(cfg: Config, model: keras.Model, steps_per_epoch: int) -> keras.Model:
    """The model that trains: ``model`` wrapped for the method (a new model; ``model`` is not changed)."""
    if cfg.method in TERNARY_METHODS:
        options = dict(
            ste=ste_for(cfg),
            granularity=cfg.granularity,
            decay=cfg.decay,
            freeze_at=float(cfg.freeze_at) if cfg.freeze_at > 0 else None,
            activations=None if cfg.activations == "none" else cfg.activations,
            precision=cfg.precision,
        )
        if cfg.method == "twn":
            qmodel = ptq_keras.ternarize(model, threshold="twn", **options)
        else:
            qmodel = ptq_keras.ternarize(
                model,
                sparsity=_sparsity_schedule(cfg, steps_per_epoch, frequency=1),
                threshold=cfg.threshold,
                selection=cfg.selection,
                normalize=cfg.normalize,
                criterion=cfg.criterion,
                regularizer=None if cfg.regularizer == "none" else cfg.regularizer,
                soft_decay=cfg.soft_decay,
                min_kept=cfg.min_kept,
                **options,
            )
        # The script fits one epoch at a time: state the whole run's length for the fractional freeze.
        ptq_keras.resolve_freeze(qmodel, cfg.epochs * steps_per_epoch)
        if cfg.distill:
            return ptq_keras.distill(qmodel, model, temperature=cfg.temperature, alpha=cfg.alpha)
        return qmodel
    if cfg.method == "tfmot_qat":
        return _tfmot_qat(model)
    if cfg.method == "tfmot_prune":
        frequency = max(1, min(100, cfg.ramp_epochs * steps_per_epoch // 20))
        schedule = _sparsity_schedule(cfg, steps_per_epoch, frequency, schedules=tfmot.sparsity.keras)
        if not isinstance(schedule, tfmot.sparsity.keras.PruningSchedule):
            schedule = tfmot.sparsity.keras.ConstantSparsity(schedule, begin_step=0, frequency=frequency)
        return tfmot.sparsity.keras.prune_low_magnitude(model, pruning_schedule=schedule)
    return model


def layer_stats(model: keras.Model) -> dict:
    """``{layer: {"sparsity": fraction of zero kernel weights, "scale": mean ternary scale or None}}``; ternary
    layers (of a ternarized or stripped model) come from ``ptq_keras.summary``."""
    stats = {}
    for layer in model.layers:
        kernels = [w.numpy() for w in layer.weights if w.name.split("/")[-1].split(":")[0] in _KERNEL_NAMES]
        if kernels:
            zeros = sum(int(np.sum(k == 0)) for k in kernels)
            stats[layer.name] = {"sparsity": zeros / sum(k.size for k in kernels), "scale": None}
    wrapped = any(isinstance(layer, keras.layers.Wrapper) for layer in model.layers)
    if ptq_keras.is_ternarized(model) or not wrapped:  # summary reads the kernels of these two kinds only
        for row in ptq_keras.summary(model, print_fn=None).layers:
            if row.ternary:
                stats[row.name] = {"sparsity": row.sparsity, "scale": row.scale_mean}
    return stats


# ----------------------------------------------------------------------------- training state
class _LayerStatsLogger(keras.callbacks.Callback):
    """Writes per-layer sparsity and scale to TensorBoard at the end of every epoch."""

    def __init__(self, log_dir: str):
        super().__init__()
        self._writer = tf.summary.create_file_writer(log_dir)

    def on_epoch_end(self, epoch, logs=None):
        with self._writer.as_default(step=epoch + 1):
            for name, values in layer_stats(self.model).items():
                tf.summary.scalar(f"sparsity/{name}", values["sparsity"])
                if values["scale"] is not None:
                    tf.summary.scalar(f"scale/{name}", values["scale"])
        self._writer.flush()


class _StepTimer(keras.callbacks.Callback):
    """Wall time of every training step (the first step of each fit call, which traces, is left out)."""

    def __init__(self):
        super().__init__()
        self.times: list[float] = []
        self._start = 0.0
        self._first = True

    def on_train_begin(self, logs=None):
        self._first = True

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        if not self._first:
            self.times.append(time.perf_counter() - self._start)
        self._first = False


class Checkpoints:
    """One checkpoint per epoch: model and optimizer variables (tf.train.Checkpoint) plus ``state.json`` (epochs
    done, the run's settings and the step times so far), written last and atomically, so a kill at any moment
    leaves the previous complete checkpoint."""

    def __init__(self, directory: str, model: keras.Model, optimizer):
        self.directory = directory
        self._checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer)
        self._state_path = os.path.join(directory, "state.json")

    def state(self) -> dict | None:
        if not os.path.exists(self._state_path):
            return None
        with open(self._state_path) as f:
            return json.load(f)

    def save(self, epochs_done: int, identity: dict, step_times: list) -> None:
        os.makedirs(self.directory, exist_ok=True)
        prefix = self._checkpoint.write(os.path.join(self.directory, f"epoch-{epochs_done}"))
        state = {"epochs_done": epochs_done, "prefix": os.path.basename(prefix), "run": identity,
                 "step_times": step_times}  # fmt: skip
        previous = self.state()
        atomic_write(self._state_path, json.dumps(state, indent=1).encode())
        if previous and previous["prefix"] != state["prefix"]:
            for name in os.listdir(self.directory):
                if name.startswith(previous["prefix"] + "."):
                    os.remove(os.path.join(self.directory, name))

    def restore(self, identity: dict) -> dict:
        state = self.state()
        if state is None:
            raise ValueError(
                f"--resume: no checkpoint in {self.directory}; start the run without --resume (same --out_dir)."
            )
        run = {**_IDENTITY_SINCE, **state["run"]}
        changed = {k: (run.get(k), v) for k, v in identity.items() if run.get(k) != v}
        if changed:
            details = ", ".join(f"--{k}: checkpoint {old!r}, now {new!r}" for k, (old, new) in changed.items())
            raise ValueError(f"--resume: the checkpoint in {self.directory} is of a different run ({details}).")
        self._checkpoint.read(os.path.join(self.directory, state["prefix"])).assert_existing_objects_matched()
        return state


class _ArrayData:
    """A dataset small enough for memory (Fashion-MNIST, CIFAR): both splits as numpy arrays."""

    def __init__(self, cfg: Config, input_shape: tuple, eval_split: str):
        self.cfg, self.input_shape = cfg, input_shape
        self.x_train, self.y_train = common.load_split(cfg.dataset, "train", cfg.data_dir, cfg.limit)
        self.x_test, self.y_test = common.load_split(cfg.dataset, eval_split, cfg.data_dir, cfg.limit)
        self.train_examples = len(self.x_train)
        self.text = f"train {self.x_train.shape}, {eval_split} {self.x_test.shape}"

    def train(self, epoch: int, steps: int) -> tf.data.Dataset:
        """Epoch ``epoch``'s batches: a permutation that depends only on (seed, epoch), so a resumed run sees the
        same data order as an uninterrupted one."""
        order = np.random.default_rng([self.cfg.seed, epoch]).permutation(len(self.x_train))
        ds = tf.data.Dataset.from_tensor_slices((self.x_train[order], self.y_train[order]))
        return ds.batch(self.cfg.batch_size).take(steps).prefetch(tf.data.AUTOTUNE)

    def accuracy(self, model: keras.Model) -> float:
        logits = model.predict(self.x_test, batch_size=self.cfg.batch_size, verbose=0)
        return float(np.mean(np.argmax(logits, axis=1) == self.y_test))

    def inputs(self, n: int) -> np.ndarray:
        """The first ``n`` training inputs (calibration, BatchNorm re-estimation)."""
        return self.x_train[:n]

    def bn_batches(self) -> tf.data.Dataset:
        return tf.data.Dataset.from_tensor_slices(self.x_train).batch(self.cfg.batch_size)

    def test_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return self.x_test, self.y_test


class _StreamData:
    """A dataset streamed from tfds with the ImageNet preprocessing (``data.pipeline``), e.g. imagenet2012."""

    def __init__(self, cfg: Config, input_shape: tuple, eval_split: str):
        from ptq_keras import data

        self.cfg, self.input_shape, self.eval_split, self.data = cfg, input_shape, eval_split, data
        size = data.split_size(cfg.dataset, "train", cfg.data_dir)
        self.train_examples = min(size, cfg.limit) if size and cfg.limit else (size or cfg.limit)
        self.text = (f"streamed at {input_shape[0]}x{input_shape[1]}, train "
                     f"{self.train_examples if self.train_examples else 'size unknown'} images")  # fmt: skip
        self._calibration = None

    def _stream(self, split: str, training: bool, seed=None, limit=None) -> tf.data.Dataset:
        return self.data.pipeline(self.cfg.dataset, split, self.cfg.data_dir, batch_size=self.cfg.batch_size,
                                  training=training, size=self.input_shape[0], seed=seed,
                                  limit=limit or self.cfg.limit)  # fmt: skip

    def train(self, epoch: int, steps: int) -> tf.data.Dataset:
        return self._stream("train", True, seed=self.cfg.seed * 1000 + epoch).take(steps)

    def accuracy(self, model: keras.Model) -> float:
        correct = total = 0
        for x, y in self._stream(self.eval_split, False):
            logits = model(x, training=False)
            correct += int(np.sum(np.argmax(logits, axis=1) == y.numpy()))
            total += int(y.shape[0])
        return correct / max(total, 1)

    def inputs(self, n: int) -> np.ndarray:
        """``n`` training images with the evaluation preprocessing (calibration)."""
        if self._calibration is None or len(self._calibration) < n:
            batches = [x.numpy() for x, _ in self._stream("train", False, limit=n)]
            self._calibration = np.concatenate(batches)[:n]
        return self._calibration[:n]

    def bn_batches(self) -> tf.data.Dataset:
        return self._stream("train", True, seed=self.cfg.seed).map(lambda x, y: x)

    def test_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for x, y in self._stream(self.eval_split, False, limit=self.cfg.tflite_eval_samples):
            xs.append(x.numpy())
            ys.append(y.numpy())
        return np.concatenate(xs), np.concatenate(ys)


def _data(cfg: Config):
    """``(input shape, classes, data)`` of ``cfg.dataset``: in memory, or streamed with ``--image_size`` and for
    datasets whose images vary in size."""
    from ptq_keras import data

    input_shape, num_classes = data.describe(cfg.dataset, cfg.data_dir)
    eval_split = data.eval_split(cfg.dataset, cfg.data_dir)
    if cfg.image_size is None and None not in input_shape:
        return input_shape, num_classes, _ArrayData(cfg, input_shape, eval_split)
    size = cfg.image_size or 224
    input_shape = (size, size, input_shape[-1] or 3)
    return input_shape, num_classes, _StreamData(cfg, input_shape, eval_split)


def _save_model(model: keras.Model, path: str) -> None:
    tmp = path + ".tmp.h5"
    with ptq_keras.custom_object_scope():
        model.save(tmp, save_format="h5", include_optimizer=False)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- the run
def split_cpu(count: int) -> None:
    """Split the CPU into ``count`` logical devices; only possible before TensorFlow has started its devices."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)
    except RuntimeError as exc:
        if len(tf.config.list_logical_devices("CPU")) == count:
            return  # split already, e.g. by an earlier run in this process
        raise ValueError(
            f"--cpu_devices={count}: TensorFlow's devices are already initialized in this process; pass the flag "
            "on the command line (examples/train.py --cpu_devices=N) so it runs before any TensorFlow op."
        ) from exc


def make_strategy(cfg: Config) -> tf.distribute.Strategy:
    """The ``tf.distribute`` strategy of ``--strategy`` (``default``: the current one, one device)."""
    if cfg.cpu_devices:
        split_cpu(cfg.cpu_devices)
    if cfg.strategy == "mirrored":
        devices = [d.name for d in tf.config.list_logical_devices("GPU")] or (
            [d.name for d in tf.config.list_logical_devices("CPU")] if cfg.cpu_devices else None
        )
        return tf.distribute.MirroredStrategy(devices)
    if cfg.strategy == "multi_worker_mirrored":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if cfg.strategy == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    return tf.distribute.get_strategy()


def run(cfg: Config, log=common.log) -> dict:
    """Train, evaluate, save and export as ``cfg`` says; returns the results (also in ``out_dir/results.json``)."""
    validate(cfg)
    strategy = make_strategy(cfg)
    os.makedirs(cfg.out_dir, exist_ok=True)
    keras.utils.set_random_seed(cfg.seed)
    input_shape, num_classes, dataset = _data(cfg)
    if dataset.train_examples is None and not cfg.max_steps_per_epoch:
        raise ValueError(f"{cfg.dataset}: the number of training examples is unknown here; pass --limit or "
                         "--max_steps_per_epoch.")  # fmt: skip
    steps = math.ceil(dataset.train_examples / cfg.batch_size) if dataset.train_examples else cfg.max_steps_per_epoch
    if cfg.max_steps_per_epoch:
        steps = min(steps, cfg.max_steps_per_epoch)
    log(f"{cfg.dataset}: {dataset.text}; {steps} steps per epoch")

    if strategy.num_replicas_in_sync > 1 or cfg.strategy != "default":
        log(f"strategy {cfg.strategy}: {strategy.num_replicas_in_sync} replica(s), global batch {cfg.batch_size}")
    if cfg.mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_float16")
        log("mixed precision: float16 compute, float32 variables (the ternary quantizer computes in float32)")
    try:
        return _train_and_export(cfg, strategy, input_shape, num_classes, dataset, steps, log)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def _train_and_export(cfg: Config, strategy, input_shape, num_classes, dataset, steps, log) -> dict:
    with strategy.scope():
        base = _initial_model(cfg, input_shape, num_classes)
        if cfg.mixed_precision:
            base = with_dtype(base, "mixed_float16")
        model = training_model(cfg, base, steps)
        optimizer = keras.optimizers.Adam(cfg.learning_rate)
        model.compile(optimizer, _loss(), metrics=["accuracy"])
        optimizer.build(model.trainable_variables)
    checkpoints = Checkpoints(os.path.join(cfg.out_dir, "checkpoints"), model, optimizer)
    identity = {k: getattr(cfg, k) for k in _RUN_IDENTITY}
    timer = _StepTimer()
    start_epoch = 0
    if cfg.resume:
        state = checkpoints.restore(identity)
        start_epoch, timer.times = state["epochs_done"], list(state["step_times"])
        log(f"resumed from {checkpoints.directory} after epoch {start_epoch}")
    elif checkpoints.state() is not None:
        log(f"starting afresh: the checkpoint in {checkpoints.directory} is replaced (pass --resume to continue it)")
        shutil.rmtree(checkpoints.directory)

    callbacks = [timer]
    if importlib.util.find_spec("tensorboard") is None:
        log("TensorBoard is not installed (pip install tensorboard==2.21.0): no logs are written")
    else:
        log_dir = os.path.join(cfg.out_dir, "logs")
        callbacks += [
            keras.callbacks.TensorBoard(log_dir, write_graph=False, profile_batch=0),
            _LayerStatsLogger(os.path.join(log_dir, "layers")),
        ]
    if cfg.method == "tfmot_prune":
        callbacks.append(tfmot.sparsity.keras.UpdatePruningStep())
    started = time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs):
        keras.utils.set_random_seed(cfg.seed * 1000 + epoch)
        model.fit(
            dataset.train(epoch, steps),
            epochs=epoch + 1,
            initial_epoch=epoch,
            callbacks=callbacks,
            verbose=2,
        )
        checkpoints.save(epoch + 1, identity, timer.times)
    train_seconds = time.perf_counter() - started

    results: dict = {
        "config": dataclasses.asdict(cfg),
        "params": int(base.count_params()),
        "step_time_s": float(np.median(timer.times)) if timer.times else None,
        "train_seconds_this_process": train_seconds,
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs",
    }
    final = _final_model(cfg, model, dataset, results, log)
    if cfg.mixed_precision:
        final = with_dtype(final, "float32")  # saved and exported in float32
    results["keras_accuracy"] = dataset.accuracy(final)
    results["layers"] = layer_stats(final)
    log(f"test accuracy of the final Keras model: {results['keras_accuracy']:.4f}")
    model_path = os.path.join(cfg.out_dir, "model.h5")
    _save_model(final, model_path)
    results["model"] = model_path
    targets = cfg.targets()
    if targets:
        results["export"] = _export(cfg, final, dataset, targets, log)
    atomic_write(os.path.join(cfg.out_dir, "results.json"), json.dumps(results, indent=1, default=str).encode())
    return results


def _final_model(cfg: Config, model, dataset, results: dict, log) -> keras.Model:
    """The plain model to save and export: stripped (and BN-recalibrated) ternary, stripped pruned, or as trained."""
    if cfg.method in TERNARY_METHODS:
        results["qat_accuracy"] = dataset.accuracy(model)
        plain = ptq_keras.strip(model)
        results["stripped_accuracy"] = dataset.accuracy(plain)
        log(f"ternary: QAT model {results['qat_accuracy']:.4f}, stripped {results['stripped_accuracy']:.4f}")
        if cfg.recalibrate_bn_steps:
            batches = dataset.bn_batches()
            ptq_keras.recalibrate_batchnorm(plain, batches, steps=cfg.recalibrate_bn_steps, verbose=False)
        results["summary"] = ptq_keras.summary(plain, print_fn=None).as_dict()
        return plain
    if cfg.method == "tfmot_prune":
        return tfmot.sparsity.keras.strip_pruning(model)
    return model


def _export(cfg: Config, final, dataset, targets, log) -> dict:
    from ptq_keras import tflite as ptq_tflite

    out_dir = os.path.join(cfg.out_dir, "tflite")
    exported = ptq_tflite.export(
        final, dataset.inputs(500), out_dir, targets=targets, encoding=cfg.encoding, measure=cfg.measure,
        progress=log,
    )  # fmt: skip
    x_test, y_test = dataset.test_arrays() if cfg.eval_tflite else (None, None)
    out = {}
    for target in targets:
        rep = exported.report.targets[target]
        row = {
            "file": exported.files[target],
            "file_bytes": rep.file_bytes,
            "bits_per_weight": rep.bits_per_weight,
            "arena_bytes": rep.arena_bytes,
            "runtime": common.RUNTIME_OF_TARGET[target],
            "encodings": sorted({e["encoding"] for e in rep.encodings}),
        }
        if cfg.eval_tflite:
            row["accuracy"] = common.tflite_accuracy(exported.files[target], x_test, y_test, row["runtime"])
            log(f"{target}: {rep.file_bytes} bytes, accuracy {row['accuracy']:.4f} on {row['runtime']}")
        out[target] = row
    return out
