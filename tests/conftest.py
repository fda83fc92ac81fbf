"""Shared fixtures: small tf_keras models of each supported shape, and real Fashion-MNIST samples."""

from __future__ import annotations

import pytest

import ptq_keras  # noqa: F401  (selects tf_keras before TensorFlow loads)
from ptq_keras import keras


@pytest.fixture(scope="session")
def fashion_mnist():
    """(x_train, y_train, x_test, y_test): real Fashion-MNIST as float32 in [0, 1] with a channel axis."""
    from ptq_keras import data

    arrays = []
    for split in ("train", "test"):
        x, y = data.load_numpy("fashion_mnist", split)
        arrays += [(x / 255.0).astype("float32"), y]
    return tuple(arrays)


def small_cnn(input_shape=(28, 28, 1), classes=10, seed=0) -> keras.Model:
    """Conv-BN-ReLU-Pool x2, Flatten, Dense-ReLU, Dense (Sequential)."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input(input_shape),
            keras.layers.Conv2D(8, 3, padding="same", name="conv1"),
            keras.layers.BatchNormalization(name="bn1"),
            keras.layers.ReLU(name="relu1"),
            keras.layers.MaxPooling2D(name="pool1"),
            keras.layers.Conv2D(16, 3, padding="same", name="conv2"),
            keras.layers.BatchNormalization(name="bn2"),
            keras.layers.ReLU(name="relu2"),
            keras.layers.MaxPooling2D(name="pool2"),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(32, activation="relu", name="fc"),
            keras.layers.Dense(classes, name="logits"),
        ],
        name="small_cnn",
    )


def residual_dw(input_shape=(16, 16, 3), classes=10, seed=0) -> keras.Model:
    """Functional: Conv, DepthwiseConv2D + BN + ReLU, a residual Add, SeparableConv2D, Conv1D-free head."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input(input_shape)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="stem")(inp)
    y = keras.layers.DepthwiseConv2D(3, padding="same", depth_multiplier=1, name="dw")(x)
    y = keras.layers.BatchNormalization(name="dw_bn")(y)
    y = keras.layers.ReLU(name="dw_relu")(y)
    y = keras.layers.Conv2D(8, 1, name="pw")(y)
    x = keras.layers.Add(name="add")([x, y])
    x = keras.layers.SeparableConv2D(12, 3, padding="same", depth_multiplier=2, name="sep")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    out = keras.layers.Dense(classes, name="head")(x)
    return keras.Model(inp, out, name="residual_dw")


def conv1d_model(seed=0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((20, 4)),
            keras.layers.Conv1D(6, 3, name="c1"),
            keras.layers.Flatten(name="flat"),
            keras.layers.Dense(3, name="out"),
        ]
    )


@pytest.fixture
def cnn():
    return small_cnn()


@pytest.fixture
def resnet_like():
    return residual_dw()
