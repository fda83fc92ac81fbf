"""examples/train.py and evaluate.py run in-process on tfds mock data; the model zoo; flag errors; --resume."""

from __future__ import annotations

import glob
import importlib.util
import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from absl import app, flags

import ptq_keras
from examples import evaluate, recipe, train
from ptq_keras import keras, models
from ptq_keras.compat import tf

FLAGS = flags.FLAGS
QUICK = ["--model=mlp", "--batch_size=32", "--recalibrate_bn_steps=2", "--nomeasure"]


@pytest.fixture(autouse=True)
def fresh_flags():
    FLAGS.unparse_flags()
    yield
    FLAGS.unparse_flags()


@pytest.fixture
def mock_data():
    with tfds.testing.mock_data(num_examples=64):
        yield


def call_main(module, *args: str) -> None:
    """Parse ``args`` as the script's command line and call its main in this process."""
    FLAGS.unparse_flags()
    module.main(FLAGS(["prog", *args]))


def results(out_dir) -> dict:
    with open(os.path.join(out_dir, "results.json")) as f:
        return json.load(f)


def load_h5(path: str) -> keras.Model:
    with ptq_keras.custom_object_scope():
        return keras.models.load_model(path, compile=False)


def ternary_channels(kernel: np.ndarray) -> bool:
    columns = kernel.reshape(-1, kernel.shape[-1])
    return all(len(np.unique(np.abs(c[c != 0]))) <= 1 for c in columns.T)


# ----------------------------------------------------------------------------- the zoo
def test_zoo_builds_every_model_with_its_input_and_classes():
    for name in models.MODELS:
        shape = (32, 32, 3) if name == "resnet20" else (28, 28, 1)
        model = models.build(name, shape, 7)
        assert model.output_shape == (None, 7), name
        assert tuple(model.input_shape[1:]) == shape
    assert models.small_cnn().count_params() == 225_322  # the reference CNN of the algorithm notes (225k parameters)
    layer_types = {type(layer).__name__ for layer in models.build("ds_cnn", (28, 28, 1), 10).layers}
    assert {"DepthwiseConv2D", "Conv2D", "BatchNormalization"} <= layer_types
    resnet = models.resnet20()
    assert sum(isinstance(layer, keras.layers.Add) for layer in resnet.layers) == 9
    ds_resnet_types = [type(layer).__name__ for layer in models.build("ds_resnet", (28, 28, 1), 10).layers]
    assert ds_resnet_types.count("Add") == 2 and "SeparableConv2D" in ds_resnet_types
    with pytest.raises(ValueError, match=r"unknown model 'vgg'; choose one of \['ds_cnn', 'ds_resnet', 'mlp'"):
        models.build("vgg", (28, 28, 1), 10)
    with pytest.raises(ValueError, match="input_shape must be"):
        models.build("mlp", (28, 28), 10)


# ----------------------------------------------------------------------------- train.py end to end
def _assert_exact_ternary(plain, res, names=("conv1", "conv2", "fc", "logits")) -> None:
    """small_cnn at sparsity 0.7: float32 kernels, exactly ternary per channel, round(0.3 n) of n weights kept
    (layer-wide selection; conv1, 3x3 on one channel, keeps 4 of 9 per channel: min_kept), every channel alive,
    and the results' sparsity is the kernel's."""
    for name in names:
        kernel = plain.get_layer(name).kernel.numpy()
        assert kernel.dtype == np.float32 and ternary_channels(kernel), name
        keep = 4 / 9 if name == "conv1" else 0.3
        assert np.count_nonzero(kernel) == np.floor(keep * kernel.size + 0.5), name
        assert np.count_nonzero(kernel.reshape(-1, kernel.shape[-1]), axis=0).min() >= 1, name
        assert abs(res["layers"][name]["sparsity"] - np.mean(kernel == 0)) < 1e-9


def _train_small_cnn_ptq(out, *extra) -> tuple[dict, object]:
    """One epoch of examples/train.py on small_cnn at 0.7 with int8 and micro export: (results, saved model)."""
    call_main(train, *QUICK, "--model=small_cnn", "--method=ptq", "--sparsity=0.7", "--epochs=1",
              "--export=int8,micro", f"--out_dir={out}", *extra)  # fmt: skip
    res = results(out)
    return res, load_h5(res["model"])


def test_train_ptq_exports_ternary_files_that_evaluate_agrees_with(tmp_path, mock_data):
    out = tmp_path / "ptq"
    res, plain = _train_small_cnn_ptq(out, "--ramp_epochs=0")
    assert not ptq_keras.is_ternarized(plain)
    _assert_exact_ternary(plain, res)
    micro = res["export"]["micro"]
    assert micro["file_bytes"] == os.path.getsize(micro["file"])
    assert micro["file_bytes"] < res["export"]["int8"]["file_bytes"] / 2
    assert micro["runtime"] == "tflm" and 0.0 <= micro["accuracy"] <= 1.0
    # evaluate.py measures the same file with the same interpreter and data: the same accuracy.
    call_main(evaluate, f"--model_path={micro['file']}", f"--output_json={tmp_path / 'eval.json'}")
    with open(tmp_path / "eval.json") as f:
        evaluated = json.load(f)
    assert evaluated["runtime"] == "tflm" and evaluated["examples"] == 64
    assert evaluated["accuracy"] == micro["accuracy"]
    call_main(evaluate, f"--model_path={res['model']}", f"--output_json={tmp_path / 'eval_h5.json'}")
    with open(tmp_path / "eval_h5.json") as f:
        assert json.load(f)["accuracy"] == pytest.approx(res["keras_accuracy"])
    if importlib.util.find_spec("tensorboard") is not None:
        assert glob.glob(str(out / "logs" / "layers" / "events.out.tfevents.*"))
        assert glob.glob(str(out / "logs" / "train" / "events.out.tfevents.*"))


def test_mixed_precision_trains_float16_and_saves_exact_float32_ternary(tmp_path, mock_data):
    res, plain = _train_small_cnn_ptq(tmp_path / "mixed", "--mixed_precision")
    assert {layer.dtype_policy.name for layer in plain.layers} == {"float32"}
    _assert_exact_ternary(plain, res)
    assert res["export"]["micro"]["accuracy"] == res["export"]["int8"]["accuracy"]
    assert recipe.keras.mixed_precision.global_policy().name == "float32"  # the run restores the policy


@pytest.mark.parametrize("method", ["twn", "tfmot_prune", "tfmot_qat"])
def test_train_other_methods(tmp_path, mock_data, method):
    out = tmp_path / method
    export = "--export=int8" if method == "tfmot_qat" else "--export="
    call_main(train, *QUICK, f"--method={method}", "--sparsity=0.5", "--ramp_epochs=0", "--epochs=1", export,
              f"--out_dir={out}")  # fmt: skip
    res = results(out)
    plain = load_h5(res["model"])
    kernel = plain.get_layer("fc1").kernel.numpy() if method != "tfmot_qat" else None
    if method == "twn":
        assert ternary_channels(kernel) and 0.2 < np.mean(kernel == 0) < 0.8
    elif method == "tfmot_prune":
        assert not ternary_channels(kernel)
        assert abs(np.mean(kernel == 0) - 0.5) < 0.01
    else:
        assert any(type(layer).__name__ == "QuantizeWrapperV2" for layer in plain.layers)
        assert res["export"]["int8"]["runtime"] == "tflm"
        # The int8 file of a QAT model agrees with its Keras model (random mock labels: compare the two).
        assert abs(res["export"]["int8"]["accuracy"] - res["keras_accuracy"]) <= 3 / 64


def test_resume_after_a_crash_gives_the_uninterrupted_result(tmp_path, mock_data, monkeypatch):
    args = [*QUICK, "--method=ptq", "--ramp_epochs=1", "--epochs=3", "--export=", "--seed=5", "--learning_rate=0.01"]
    call_main(train, *args, f"--out_dir={tmp_path / 'straight'}")

    real_batches = recipe._ArrayData.train

    def crash_in_epoch_two(self, epoch, steps):
        batches = real_batches(self, epoch, steps)
        if epoch < 1:
            return batches
        killed = batches.skip(1).map(lambda a, b: (tf.debugging.assert_all_finite(a * np.inf, "killed"), b))
        return batches.take(1).concatenate(killed)

    monkeypatch.setattr(recipe._ArrayData, "train", crash_in_epoch_two)
    with pytest.raises(tf.errors.InvalidArgumentError, match="killed"):
        call_main(train, *args, f"--out_dir={tmp_path / 'crashed'}")
    state = json.loads((tmp_path / "crashed" / "checkpoints" / "state.json").read_text())
    assert state["epochs_done"] == 1
    monkeypatch.setattr(recipe._ArrayData, "train", real_batches)
    call_main(train, *args, "--resume", f"--out_dir={tmp_path / 'crashed'}")

    straight, resumed = results(tmp_path / "straight"), results(tmp_path / "crashed")
    a, b = load_h5(straight["model"]), load_h5(resumed["model"])
    for wa, wb in zip(a.get_weights(), b.get_weights(), strict=True):
        np.testing.assert_allclose(wa, wb, rtol=1e-5, atol=1e-6)
    assert resumed["keras_accuracy"] == straight["keras_accuracy"]
    assert resumed["layers"].keys() == straight["layers"].keys()
    for name, stats in straight["layers"].items():
        assert stats["scale"] is not None
        assert resumed["layers"][name]["sparsity"] == stats["sparsity"]
        assert resumed["layers"][name]["scale"] == pytest.approx(stats["scale"], rel=1e-5)


# ----------------------------------------------------------------------------- errors
def test_flag_errors_name_the_problem_and_the_choices(tmp_path, mock_data):
    with pytest.raises(flags.IllegalFlagValueError, match="ptq"):
        FLAGS(["prog", "--method=ternary"])
    with pytest.raises(flags.IllegalFlagValueError, match="small_cnn"):
        FLAGS(["prog", "--model=vgg16"])
    cases = {
        ("--method=float", "--export=micro"): r"store ternary kernels.*--method=ptq",
        ("--export=int8,tflm",): r"unknown export target 'tflm'; choose one of \['int8', 'micro', 'litert', 'int4'\]",
        ("--sparsity=1.0",): r"outside \[0, 1\)",
        ("--ramp_epochs=3", "--epochs=2"): "exceeds --epochs",
        ("--init_from=/nonexistent/float.h5",): "does not exist",
        ("--precision=mixed", "--export=int8,litert"): r"--precision=mixed keeps int8 kernels.*\['litert'\]",
    }
    for args, message in cases.items():
        with pytest.raises(app.UsageError, match=message):
            call_main(train, *args, f"--out_dir={tmp_path}")
    with pytest.raises(ValueError, match="--resume: no checkpoint"):
        call_main(train, *QUICK, "--resume", "--epochs=1", f"--out_dir={tmp_path / 'empty'}")
    with pytest.raises(app.UsageError, match="--model_path is required"):
        call_main(evaluate)
    with pytest.raises(app.UsageError, match="neither a .h5 file"):
        call_main(evaluate, f"--model_path={tmp_path}")


def test_train_precision_mixed_keeps_depthwise_and_stem_int8(tmp_path, mock_data):
    call_main(train, "--model=ds_cnn", "--batch_size=32", "--recalibrate_bn_steps=2", "--nomeasure", "--limit=128",
              "--method=ptq", "--epochs=1", "--precision=mixed", "--export=int8,micro",
              f"--out_dir={tmp_path}")  # fmt: skip
    res = results(tmp_path)
    assert res["config"]["precision"] == "mixed"
    plain = load_h5(res["model"])
    assert not ternary_channels(plain.get_layer("stem").kernel.numpy())
    assert not ternary_channels(plain.get_layer("dw1").depthwise_kernel.numpy())
    assert ternary_channels(plain.get_layer("pw1").kernel.numpy())
    assert res["export"]["micro"]["file_bytes"] < res["export"]["int8"]["file_bytes"]


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path, mock_data):
    out = f"--out_dir={tmp_path}"
    call_main(train, *QUICK, "--method=float", "--epochs=1", "--export=", out)
    with pytest.raises(ValueError, match=r"different run \(--method: checkpoint 'float', now 'ptq'"):
        call_main(train, *QUICK, "--method=ptq", "--ramp_epochs=0", "--epochs=2", "--export=", "--resume", out)


def test_helpfull_documents_every_flag():
    for module in (train, evaluate):
        own = FLAGS.get_flags_for_module(module.__name__)
        assert own, module.__name__
        for flag in own:
            assert len(flag.help) > 15, (module.__name__, flag.name)
    shared = {flag.name for flag in FLAGS.get_flags_for_module("examples.common")}
    assert {"dataset", "data_dir", "batch_size", "limit"} <= shared
    listed = {flag.name for flag in FLAGS.get_flags_for_module(train.__name__)}
    assert {"model", "method", "sparsity", "threshold", "ste", "epochs", "learning_rate", "init_from", "export",
            "out_dir", "seed", "resume", "max_steps_per_epoch"} <= listed  # fmt: skip


def test_train_distill_and_int8_activations(tmp_path, mock_data):
    teacher_dir = tmp_path / "float"
    call_main(train, *QUICK, "--method=float", "--epochs=1", "--export=", f"--out_dir={teacher_dir}")
    teacher = results(teacher_dir)["model"]
    FLAGS.unparse_flags()
    out = tmp_path / "ptq"
    call_main(train, *QUICK, "--method=ptq", "--sparsity=0.5", "--epochs=2", "--distill", "--activations=int8",
              f"--init_from={teacher}", "--export=int8,micro", "--freeze_at=0.25", "--criterion=taylor",
              "--regularizer=greg", "--soft_decay=0.9", "--ste=psg", f"--out_dir={out}")  # fmt: skip
    res = results(out)
    assert {k: res["config"][k] for k in ("criterion", "regularizer", "soft_decay", "ste")} == {
        "criterion": "taylor", "regularizer": "greg", "soft_decay": 0.9, "ste": "psg"
    }
    plain = load_h5(res["model"])
    assert any(type(layer).__name__ == "ActivationQuantizer" for layer in plain.layers)
    assert ternary_channels(plain.get_layer("fc1").kernel.numpy())
    assert res["export"]["micro"]["file_bytes"] < res["export"]["int8"]["file_bytes"]
    with pytest.raises(app.UsageError, match="--distill needs"):
        FLAGS.unparse_flags()
        call_main(train, *QUICK, "--method=ptq", "--distill", f"--out_dir={tmp_path / 'x'}")


@pytest.mark.parametrize("method", ["ptq", "tfmot_prune"])
def test_ramped_sparsity_builds_each_methods_own_schedule(method):
    """``--ramp_epochs`` gives each method a schedule of its own library (tfmot rejects ptq_keras's and back)."""
    cfg = recipe.Config(method=method, sparsity=0.6, ramp_epochs=1, epochs=2)
    model = models.mlp(input_shape=(6, 6, 2), num_classes=3, units=(8,))
    wrapped = recipe.training_model(cfg, model, steps_per_epoch=10)
    if method == "ptq":
        assert any(row.ternary for row in ptq_keras.summary(wrapped, print_fn=None).layers)
    else:
        layer = next(layer for layer in wrapped.layers if hasattr(layer, "pruning_schedule"))
        schedule = layer.pruning_schedule
        assert isinstance(schedule, recipe.tfmot.sparsity.keras.PolynomialDecay)
        assert (schedule.initial_sparsity, schedule.final_sparsity, schedule.end_step) == (0.0, 0.6, 10)


def test_script_progress_goes_through_the_package_logger(capsys):
    """The scripts' progress lines are ``[HH:MM:SS] message`` on standard output through ``ptq_keras.examples``,
    and the package logger's level silences them with the library's lines."""
    import logging
    import re

    from examples import common

    common.log("epoch 1 of 4")
    assert re.fullmatch(r"\[\d\d:\d\d:\d\d\] epoch 1 of 4\n", capsys.readouterr().out)
    package = logging.getLogger("ptq_keras")
    level = package.level
    package.setLevel(logging.WARNING)
    try:
        common.log("hidden")
    finally:
        package.setLevel(level)
    assert capsys.readouterr().out == ""
