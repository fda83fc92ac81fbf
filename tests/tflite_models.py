"""Tiny tf_keras models with exactly ternary kernels for the export tests (built by hand, no training)."""

from __future__ import annotations

import numpy as np

import ptq_keras  # noqa: F401  (selects tf_keras before TensorFlow loads)
from ptq_keras import keras

L = keras.layers


def mlp(seed: int = 0) -> keras.Model:
    """Dense-only MLP: 20 -> 24 -> 16 -> 6."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((20,), name="features"),
            L.Dense(24, activation="relu", name="fc1"),
            L.Dense(16, activation="relu", name="fc2"),
            L.Dense(6, name="logits"),
        ],
        name="mlp",
    )


def cnn(seed: int = 0) -> keras.Model:
    """Conv2D + BatchNorm + ReLU + max pooling, twice, then Flatten and Dense."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((12, 12, 1), name="image"),
            L.Conv2D(6, 3, padding="same", name="conv1"),
            L.BatchNormalization(name="bn1"),
            L.ReLU(name="relu1"),
            L.MaxPooling2D(name="pool1"),
            L.Conv2D(8, 3, padding="same", name="conv2"),
            L.BatchNormalization(name="bn2"),
            L.ReLU(name="relu2"),
            L.AveragePooling2D(name="pool2"),
            L.Flatten(name="flatten"),
            L.Dense(6, name="logits"),
        ],
        name="cnn",
    )


def depthwise(seed: int = 0) -> keras.Model:
    """Stem conv, DepthwiseConv2D (multiplier 2) + BatchNorm + ReLU, pointwise conv, global pooling, Dense."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((10, 10, 3), name="image"),
            L.Conv2D(4, 3, padding="same", activation="relu", name="stem"),
            L.DepthwiseConv2D(3, padding="same", depth_multiplier=2, name="dw"),
            L.BatchNormalization(name="dw_bn"),
            L.ReLU(name="dw_relu"),
            L.Conv2D(8, 1, activation="relu", name="pw"),
            L.GlobalAveragePooling2D(name="gap"),
            L.Dense(6, name="logits"),
        ],
        name="depthwise",
    )


def residual(seed: int = 0) -> keras.Model:
    """Functional model with a residual Add around a conv + BatchNorm block."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((10, 10, 2), name="image")
    x = L.Conv2D(6, 3, padding="same", activation="relu", name="stem")(inp)
    y = L.Conv2D(6, 3, padding="same", name="block_conv")(x)
    y = L.BatchNormalization(name="block_bn")(y)
    y = L.ReLU(name="block_relu")(y)
    x = L.Add(name="add")([x, y])
    x = L.MaxPooling2D(name="pool")(x)
    x = L.Flatten(name="flatten")(x)
    out = L.Dense(6, name="logits")(x)
    return keras.Model(inp, out, name="residual")


BUILDERS = {"mlp": mlp, "cnn": cnn, "depthwise": depthwise, "residual": residual}


def ternarize_kernels(model: keras.Model, sparsity: float = 0.6, seed: int = 0, dense: str = "channel") -> keras.Model:
    """Make every Dense / Conv kernel exactly ternary (alpha_c * {-1, 0, +1} per output channel, or one alpha per
    Dense kernel with ``dense="tensor"``) and give BatchNorm non-trivial statistics. Returns ``model``."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            c = layer.gamma.shape[0]
            layer.set_weights(
                [rng.uniform(0.5, 1.5, c), rng.uniform(-0.2, 0.2, c), rng.uniform(-0.3, 0.3, c), rng.uniform(0.5, 2, c)]
            )
            continue
        attr = "depthwise_kernel" if isinstance(layer, L.DepthwiseConv2D) else "kernel"
        if not hasattr(layer, attr):
            continue
        kernel = getattr(layer, attr)
        shape = kernel.shape
        channels = shape[-2] * shape[-1] if attr == "depthwise_kernel" else shape[-1]
        codes = rng.choice([-1, 0, 1], size=(int(np.prod(shape)) // channels, channels),
                           p=[(1 - sparsity) / 2, sparsity, (1 - sparsity) / 2])
        codes[0, codes[0] == 0] = 1  # no empty channel
        fan_in = codes.shape[0] * (1 - sparsity)
        alpha = rng.uniform(0.6, 1.4, channels) * np.sqrt(2.0 / fan_in)
        if dense == "tensor" and isinstance(layer, L.Dense):
            alpha = np.full(channels, alpha.mean())
        kernel.assign((codes * alpha).reshape(shape).astype(np.float32))
        if getattr(layer, "bias", None) is not None:
            layer.bias.assign(rng.uniform(-0.1, 0.1, layer.bias.shape).astype(np.float32))
    return model


def inputs(model: keras.Model, n: int, seed: int = 1) -> np.ndarray:
    """``n`` float32 inputs in [0, 1] shaped like the model input."""
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 1, (n, *model.inputs[0].shape[1:])).astype(np.float32)


def build(name: str, dense: str = "channel", seed: int = 0) -> keras.Model:
    """A named test model with ternary kernels."""
    return ternarize_kernels(BUILDERS[name](seed), seed=seed, dense=dense)
