"""Models saved by earlier versions still load: a ternarized tf_keras ``.h5`` and a Keras 3 ``.keras`` file (conv,
depthwise, separable and dense layers; a PolynomialDecay schedule, Taylor scores, a per-layer override), written
by ptq_keras 0.1.0 before its modules moved into ``core`` and ``frontends``, with their outputs."""

from __future__ import annotations

import importlib.metadata
import os

import numpy as np
import pytest

import ptq_keras

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "saved_v0.1")


@pytest.mark.parametrize("flavor, ext", [("tf_keras", "h5"), ("keras3", "keras")])
def test_models_saved_before_the_move_load_compute_the_same_and_train_on(flavor, ext):
    if flavor == "tf_keras":
        _skip_if_written_by_a_newer_tf_keras(os.path.join(DATA, f"ternarized_{flavor}.{ext}"))
    x = np.load(os.path.join(DATA, "inputs.npy"))
    model = ptq_keras.load_model(os.path.join(DATA, f"ternarized_{flavor}.{ext}"))
    assert ptq_keras.is_ternarized(model)
    np.testing.assert_allclose(model.predict(x, verbose=0), np.load(os.path.join(DATA, f"outputs_{flavor}.npy")),
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    options = {r.name: r for r in ptq_keras.summary(model, print_fn=None).layers}
    assert options["logits"].ternary and options["conv"].ternary
    plain = ptq_keras.strip(model)
    kernel = plain.get_layer("logits").kernel.numpy()
    assert len(np.unique(np.abs(kernel[kernel != 0]))) == 1  # granularity="tensor" from the override
    model.fit(x, np.zeros(len(x), "int64"), epochs=1, batch_size=8, verbose=0)  # the optimizer state came along


def _skip_if_written_by_a_newer_tf_keras(path: str) -> None:
    """tf_keras files are not forward-compatible (2.21 writes InputLayer options that 2.19 rejects): the test runs
    where the installed tf_keras is at least the one that wrote the file (2.21.0 here)."""
    import h5py

    with h5py.File(path, "r") as f:
        writer = str(f.attrs["keras_version"])
    installed = importlib.metadata.version("tf-keras")
    if tuple(map(int, installed.split(".")[:2])) < tuple(map(int, writer.split(".")[:2])):
        pytest.skip(f"{os.path.basename(path)} was written by tf_keras {writer}; tf_keras {installed} cannot read it")
