"""ptq_keras under tf.distribute.MirroredStrategy on 2 logical CPU devices (in a child process: logical devices
must be set before TensorFlow starts): every replica holds the same step counters, masks and activation ranges,
updated once per global step, and the result equals a single-device run with the same global batch."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

_CHILD = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import ptq_keras
    from ptq_keras import fitting, keras

    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 12)).astype("float32")
    y = rng.integers(0, 4, 96)

    def build():
        keras.utils.set_random_seed(0)
        inp = keras.Input((12,))
        h = keras.layers.Dense(24, activation="relu", name="fc")(inp)
        return keras.Model(inp, keras.layers.Dense(4, name="logits")(h))

    def run(strategy, options):
        options = dict(options)
        distilled = options.pop("distill", False)
        with strategy.scope():
            q = ptq_keras.ternarize(build(), sparsity=0.6, keep_float=(), **options)
            if distilled:  # the teacher: a float model of the same shape (its outputs are the soft targets)
                keras.utils.set_random_seed(7)
                teacher = keras.Sequential([keras.Input((12,)), keras.layers.Dense(4)])
                q = ptq_keras.distill(q, teacher)
            q.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        q.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
        out = {"replicas": strategy.num_replicas_in_sync, "state": {}}
        for layer, _, variables in fitting.quantizer_states(q):
            for name, var in variables.items():
                parts = [np.asarray(v.numpy()) for v in getattr(var, "values", [var])]
                out["state"][f"{layer}/{name}"] = [p.tolist() for p in parts]
        out["kernels"] = [w.tolist() for w in ptq_keras.strip(q).get_weights()]
        ranges = [l for l in getattr(q, "student", q).layers if type(l).__name__ == "ActivationQuantizer"]
        out["ranges"] = [[[float(v.numpy()) for v in getattr(l.max, "values", [l.max])]] for l in ranges]
        return out

    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    for options in json.loads(sys.argv[1]):
        print("RESULT", json.dumps({"mirrored": run(tf.distribute.MirroredStrategy(devices), options),
                                   "single": run(tf.distribute.OneDeviceStrategy(devices[0]), options)}), flush=True)
    """
)
OPTIONS = [{}, {"criterion": "taylor", "freeze_at": None}, {"activations": "int8"}, {"distill": True}]


@pytest.fixture(scope="module")
def results():
    """One child process (one TensorFlow start) for every option set."""
    run = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(OPTIONS)], capture_output=True, text=True, timeout=900
    )
    lines = [json.loads(out[len("RESULT ") :]) for out in run.stdout.splitlines() if out.startswith("RESULT ")]
    assert len(lines) == len(OPTIONS), run.stderr[-3000:]
    return lines


@pytest.mark.parametrize("index", range(len(OPTIONS)), ids=[str(o) for o in OPTIONS])
def test_mirrored_replicas_agree_and_match_one_device(results, index):
    options = OPTIONS[index]
    mirrored, single = results[index]["mirrored"], results[index]["single"]
    assert mirrored["replicas"] == 2 and single["replicas"] == 1
    steps = 2 * 96 // 16
    for key, parts in mirrored["state"].items():
        assert len(parts) == 2, key
        np.testing.assert_array_equal(parts[0], parts[1], err_msg=f"{key} differs between the replicas")
        if key.endswith("/step"):
            assert parts[0] == steps, f"{key}: {parts[0]} steps, expected one per global step ({steps})"
    if options.get("criterion") == "taylor":
        # The score is each replica's |w * dL/dW_q| averaged over the replicas: the mean of absolute values of
        # partial gradients, not the global batch's, so only the replicas' agreement is required.
        return
    for key, parts in mirrored["state"].items():
        if key.endswith("/mask"):
            np.testing.assert_array_equal(parts[0], single["state"][key][0], err_msg=key)
    for a, b in zip(mirrored["kernels"], single["kernels"]):
        if np.ndim(a) == 0:
            continue  # an activation range: the replicas' mean of their shards' ranges, not the global batch's
        # Float summation order; Adam's steps are about 1e-3 whatever the gradient's size, so a near-zero gradient
        # whose sign differs between the two runs moves a weight by up to two steps apart (seen with distillation).
        np.testing.assert_allclose(a, b, rtol=0, atol=2.5e-3 if options.get("distill") else 1e-3)
    for replicas in mirrored["ranges"]:
        assert replicas[0][0] == pytest.approx(replicas[0][-1])


@pytest.mark.slow
def test_train_script_runs_mirrored_on_two_cpu_devices_and_resumes(tmp_path):
    """examples/train.py --strategy=mirrored --cpu_devices=2: two replicas, the global batch, exact sparsity,
    and --resume continues the checkpoint under the strategy."""
    import pathlib

    script = pathlib.Path(__file__).resolve().parents[2] / "examples" / "train.py"
    common = [sys.executable, str(script), "--strategy=mirrored", "--cpu_devices=2", "--limit=512",
              "--batch_size=64", "--export=", f"--out_dir={tmp_path}", "--sparsity=0.5"]  # fmt: skip
    first = subprocess.run(common + ["--epochs=1"], capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "strategy mirrored: 2 replica(s), global batch 64" in first.stdout + first.stderr
    second = subprocess.run(common + ["--epochs=2", "--resume"], capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout + second.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["config"]["strategy"] == "mirrored" and results["config"]["epochs"] == 2
    for name, layer in results["layers"].items():
        assert layer["sparsity"] == pytest.approx(0.5, abs=0.02), name


_IMAGENET_CHILD = textwrap.dedent(
    """
    import sys
    import tensorflow_datasets as tfds
    from absl import app
    sys.path.insert(0, sys.argv[1])
    from examples import train
    with tfds.testing.mock_data(num_examples=16):  # random images of varying sizes, 1000 classes, no files
        app.run(train.main, argv=["train.py"] + sys.argv[2:])
    """
)


@pytest.mark.slow
def test_imagenet_resnet18_path_runs_end_to_end_on_mock_data_under_mirrored(tmp_path):
    """The paper's setting, one command away: imagenet2012 streamed with the ImageNet preprocessing (random resized
    crop + flip, resize + central crop), torchvision's ResNet-18, two replicas, strip, export and TFLM accuracy."""
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[2]
    args = ["--dataset=imagenet2012", "--model=resnet18", "--image_size=32", "--limit=16", "--batch_size=8",
            "--epochs=1", "--max_steps_per_epoch=2", "--export=int8,micro", "--encoding=huffman",
            "--strategy=mirrored", "--cpu_devices=2", "--recalibrate_bn_steps=2", "--tflite_eval_samples=8",
            "--measure=false", f"--out_dir={tmp_path}"]  # fmt: skip
    run = subprocess.run([sys.executable, "-c", _IMAGENET_CHILD, str(root), *args], capture_output=True, text=True,
                         timeout=900)  # fmt: skip
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-3000:]
    assert "streamed at 32x32" in out and "strategy mirrored: 2 replica(s), global batch 8" in out
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["params"] == 11_699_112  # torchvision's 11,689,512 trainable + BatchNorm statistics
    assert set(results["export"]) == {"int8", "micro"}
    assert results["export"]["micro"]["file_bytes"] < results["export"]["int8"]["file_bytes"] / 4
    for name, layer in results["layers"].items():
        if layer.get("ternary", True) and "sparsity" in layer:
            assert layer["sparsity"] == pytest.approx(0.7, abs=0.02), name
