"""ptq_keras.data: real Fashion-MNIST through tfds offline, clear errors for missing data, tfds mocking."""

from __future__ import annotations

import gzip
import hashlib

import numpy as np
import pytest
import tensorflow_datasets as tfds

from ptq_keras import data


def _fingerprints(x: np.ndarray, y: np.ndarray) -> list[str]:
    """Order-free identity of a split: one hash per (image, label) pair, sorted (tfds reorders examples)."""
    return sorted(hashlib.sha1(img.tobytes() + bytes([int(lbl)])).hexdigest() for img, lbl in zip(x, y))


def test_fashion_mnist_loads_offline_with_the_real_splits(fashion_mnist):
    x_train, y_train = data.load_numpy("fashion_mnist", "train")
    x_test, y_test = data.load_numpy("fashion_mnist", "test")
    assert x_train.shape == (60000, 28, 28, 1) and x_train.dtype == np.uint8
    assert x_test.shape == (10000, 28, 28, 1) and y_test.dtype == np.int64
    # Fashion-MNIST is balanced: 6000 / 1000 images of each of the 10 classes.
    assert np.bincount(y_train).tolist() == [6000] * 10
    assert np.bincount(y_test).tolist() == [1000] * 10
    # Pixel statistics of the real data (mean intensity ~73 of 255, a quarter to half of the pixels black).
    assert 70.0 < x_train.mean() < 76.0
    assert 0.3 < np.mean(x_test == 0) < 0.6
    # The tfds test split holds exactly the images and labels of the IDX files, in tfds' own order.
    _, _, xf_test, yf_test = fashion_mnist
    idx_test = np.round(xf_test * 255).astype(np.uint8)
    assert _fingerprints(x_test, y_test) == _fingerprints(idx_test, yf_test)
    assert int(x_test.astype(np.int64).sum()) == int(idx_test.astype(np.int64).sum())


def test_plain_tfds_load_works_after_preparation():
    data.builder("fashion_mnist")  # prepares on first use
    ds = tfds.load(
        "fashion_mnist", split="test[:16]", data_dir=data._default_data_dir(), download=False, as_supervised=True
    )
    images = [img.numpy() for img, _ in ds]
    assert len(images) == 16 and images[0].shape == (28, 28, 1)
    assert data.describe("fashion_mnist") == ((28, 28, 1), 10)


def test_load_batches_limits_and_shuffles_reproducibly():
    plain = np.concatenate([y for _, y in data.load(split="test", limit=300, batch_size=128).as_numpy_iterator()])
    batches = list(data.load(split="test", limit=300, batch_size=128, shuffle=True, seed=3).as_numpy_iterator())
    assert [len(y) for _, y in batches] == [128, 128, 44]
    shuffled = np.concatenate([y for _, y in batches])
    again = np.concatenate(
        [y for _, y in data.load(split="test", limit=300, batch_size=128, shuffle=True, seed=3).as_numpy_iterator()]
    )
    assert np.array_equal(shuffled, again)
    assert not np.array_equal(shuffled, plain)
    assert sorted(shuffled.tolist()) == sorted(plain.tolist())


def test_missing_debian_files_name_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", str(tmp_path / "not-installed"))
    with pytest.raises(data.DataNotFoundError, match="apt-get install dataset-fashion-mnist"):
        data.load("fashion_mnist", data_dir=tmp_path / "tfds")
    assert not (tmp_path / "tfds" / "fashion_mnist").exists()


def test_corrupt_idx_file_is_rejected(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in data._FASHION_FILES:
        with gzip.open(source / name, "wb") as f:
            f.write((1234).to_bytes(4, "big") + (5).to_bytes(4, "big") + bytes(5))
    with pytest.raises(data.DataNotFoundError, match="not the expected IDX file"):
        data.prepare_fashion_mnist(tmp_path / "tfds", source_dir=str(source))


def test_unprepared_dataset_errors_without_downloading(tmp_path):
    with pytest.raises(data.DataNotFoundError, match="tfds build mnist") as info:
        data.load("mnist", data_dir=tmp_path)
    assert "apt-get install dataset-fashion-mnist" in str(info.value)
    assert not (tmp_path / "downloads").exists() and not (tmp_path / "mnist").exists()


def test_bad_names_list_the_choices():
    with pytest.raises(ValueError, match="unknown dataset 'no_such_dataset'"):
        data.load("no_such_dataset")
    with pytest.raises(ValueError, match=r"no split 'validation'; choose one of \['test', 'train'\]"):
        data.load("fashion_mnist", split="validation")
    with pytest.raises(ValueError, match="batch_size"):
        data.load("fashion_mnist", batch_size=0)


def test_mock_data_serves_random_examples_with_the_real_specs(tmp_path):
    with tfds.testing.mock_data(num_examples=7):
        batches = list(data.load("fashion_mnist", split="train", data_dir=tmp_path, batch_size=3))
        assert [tuple(x.shape) for x, _ in batches] == [(3, 28, 28, 1), (3, 28, 28, 1), (1, 28, 28, 1)]
        assert batches[0][0].dtype == np.uint8
        assert all(0 <= int(v) < 10 for _, y in batches for v in y)
        x, y = data.load_numpy("cifar10", "test", data_dir=tmp_path)
        assert x.shape == (7, 32, 32, 3) and y.shape == (7,)
        assert data.describe("cifar10") == ((32, 32, 3), 10)
    assert not (tmp_path / "fashion_mnist").exists()


def test_imagenet_preprocessing_crops_resizes_and_flips():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (120, 200, 3), dtype=np.uint8)
    evaluated = data.preprocess(image, training=False, size=64).numpy()
    assert evaluated.shape == (64, 64, 3) and 0.0 <= evaluated.min() and evaluated.max() <= 1.0
    # evaluation: shorter side to 64 * 256 / 224 = 73 (73 x 122), then the central 64 x 64 crop
    import tensorflow as tf

    resized = tf.image.resize(image, (73, 122), method="bilinear").numpy() / 255.0
    np.testing.assert_allclose(evaluated, resized[4:68, 29:93], atol=1e-5)
    crops = {data.preprocess(image, training=True, size=64, seed=s).numpy().tobytes() for s in range(4)}
    assert len(crops) > 1  # random crops differ
    with tfds.testing.mock_data(num_examples=6):
        batches = list(data.pipeline("imagenet2012", "train", batch_size=4, training=True, size=40, seed=1, limit=6))
        assert [tuple(x.shape) for x, _ in batches] == [(4, 40, 40, 3), (2, 40, 40, 3)]
        assert data.eval_split("imagenet2012") == "validation"
    assert data.eval_split("fashion_mnist") == "test" and data.split_size("fashion_mnist", "train") == 60_000


@pytest.mark.parametrize("name, trainable", [("resnet18", 11_689_512), ("resnet50", 25_557_032)])
def test_torchvision_resnets_have_torchvision_parameter_counts(name, trainable):
    from ptq_keras import models

    model = models.build(name, (224, 224, 3), 1000)
    assert sum(int(np.prod(w.shape)) for w in model.trainable_weights) == trainable
    assert model.output_shape == (None, 1000)
    assert model.get_layer("layer2_0_downsample").strides == (2, 2)
