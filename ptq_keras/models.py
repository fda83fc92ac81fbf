"""A small model zoo for the examples and benchmarks, built with tf_keras.

Every builder takes ``input_shape`` (H, W, C) and ``num_classes`` and returns logits (no softmax). Feed images as
float32 in [0, 1] (``pixels / 255``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .compat import keras

__all__ = ["MODELS", "build", "ds_cnn", "ds_resnet", "mlp", "resnet18", "resnet20", "resnet50", "small_cnn"]

L = keras.layers


def _input(input_shape: Sequence[int]):
    shape = tuple(int(d) for d in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"input_shape must be (height, width, channels), got {tuple(input_shape)!r}.")
    return keras.Input(shape, name="image")


def _bn(name: str):
    """BatchNormalization with momentum 0.9: its moving statistics settle within a few hundred steps."""
    return L.BatchNormalization(momentum=0.9, name=name)


def _check_classes(num_classes: int) -> int:
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}.")
    return num_classes


def small_cnn(input_shape: Sequence[int] = (28, 28, 1), num_classes: int = 10) -> keras.Model:
    """Conv32-BN-ReLU-Pool, Conv64-BN-ReLU-Pool (valid padding), Flatten, Dense128-ReLU, Dense: the reference
    model (225k parameters on 28x28x1)."""
    x = inp = _input(input_shape)
    for i, filters in enumerate((32, 64), start=1):
        x = L.Conv2D(filters, 3, use_bias=False, name=f"conv{i}")(x)
        x = _bn(name=f"bn{i}")(x)
        x = L.ReLU(name=f"relu{i}")(x)
        x = L.MaxPooling2D(name=f"pool{i}")(x)
    x = L.Flatten(name="flatten")(x)
    x = L.Dense(128, activation="relu", name="fc")(x)
    out = L.Dense(_check_classes(num_classes), name="logits")(x)
    return keras.Model(inp, out, name="small_cnn")


def ds_cnn(
    input_shape: Sequence[int] = (28, 28, 1), num_classes: int = 10, filters: int = 64, blocks: int = 4
) -> keras.Model:
    """Depthwise-separable CNN of the microcontroller kind (DS-CNN): a strided Conv-BN-ReLU stem, then ``blocks``
    x (DepthwiseConv3x3-BN-ReLU, Conv1x1-BN-ReLU), global average pooling and a Dense head."""
    x = inp = _input(input_shape)
    x = L.Conv2D(filters, 3, strides=2, padding="same", use_bias=False, name="stem")(x)
    x = _bn(name="stem_bn")(x)
    x = L.ReLU(name="stem_relu")(x)
    for i in range(1, blocks + 1):
        x = L.DepthwiseConv2D(3, padding="same", use_bias=False, name=f"dw{i}")(x)
        x = _bn(name=f"dw{i}_bn")(x)
        x = L.ReLU(name=f"dw{i}_relu")(x)
        x = L.Conv2D(filters, 1, use_bias=False, name=f"pw{i}")(x)
        x = _bn(name=f"pw{i}_bn")(x)
        x = L.ReLU(name=f"pw{i}_relu")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    out = L.Dense(_check_classes(num_classes), name="logits")(x)
    return keras.Model(inp, out, name="ds_cnn")


def ds_resnet(input_shape: Sequence[int] = (28, 28, 1), num_classes: int = 10, filters: int = 32) -> keras.Model:
    """A residual depthwise model: a strided Conv-BN-ReLU stem, two (DepthwiseConv3x3-BN-ReLU, Conv1x1-BN) blocks
    with residual adds and ReLU, a strided SeparableConv2D (ReLU), global average pooling and a Dense head."""
    x = inp = _input(input_shape)
    x = L.Conv2D(filters, 3, strides=2, padding="same", use_bias=False, name="stem")(x)
    x = _bn(name="stem_bn")(x)
    x = L.ReLU(name="stem_relu")(x)
    for i in (1, 2):
        y = L.DepthwiseConv2D(3, padding="same", use_bias=False, name=f"dw{i}")(x)
        y = _bn(name=f"dw{i}_bn")(y)
        y = L.ReLU(name=f"dw{i}_relu")(y)
        y = L.Conv2D(filters, 1, use_bias=False, name=f"pw{i}")(y)
        y = _bn(name=f"pw{i}_bn")(y)
        x = L.Add(name=f"add{i}")([x, y])
        x = L.ReLU(name=f"add{i}_relu")(x)
    x = L.SeparableConv2D(2 * filters, 3, strides=2, padding="same", activation="relu", name="sep")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    out = L.Dense(_check_classes(num_classes), name="logits")(x)
    return keras.Model(inp, out, name="ds_resnet")


def resnet20(
    input_shape: Sequence[int] = (32, 32, 3), num_classes: int = 10, depth: int = 20, width: int = 16
) -> keras.Model:
    """ResNet-20 for 32x32 inputs (He et al. 2016, CIFAR variant): 3 stages of ``(depth - 2) / 6`` basic blocks
    with ``width``, ``2 width``, ``4 width`` filters, a 1x1 projection shortcut where the shape changes (residual
    ``Add``), global average pooling and a Dense head (0.27M parameters)."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth must be 6n + 2 (8, 14, 20, 32, ...), got {depth!r}.")
    per_stage = (depth - 2) // 6
    x = inp = _input(input_shape)
    x = L.Conv2D(width, 3, padding="same", use_bias=False, name="stem")(x)
    x = _bn(name="stem_bn")(x)
    x = L.ReLU(name="stem_relu")(x)
    for stage in range(3):
        filters = width * 2**stage
        for block in range(per_stage):
            name = f"s{stage + 1}b{block + 1}"
            strides = 2 if stage > 0 and block == 0 else 1
            y = L.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False, name=f"{name}_conv1")(x)
            y = _bn(name=f"{name}_bn1")(y)
            y = L.ReLU(name=f"{name}_relu1")(y)
            y = L.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv2")(y)
            y = _bn(name=f"{name}_bn2")(y)
            if strides != 1 or x.shape[-1] != filters:
                x = L.Conv2D(filters, 1, strides=strides, use_bias=False, name=f"{name}_proj")(x)
                x = _bn(name=f"{name}_proj_bn")(x)
            x = L.Add(name=f"{name}_add")([x, y])
            x = L.ReLU(name=f"{name}_relu2")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    out = L.Dense(_check_classes(num_classes), name="logits")(x)
    return keras.Model(inp, out, name=f"resnet{depth}")


def _conv_bn(x, filters: int, kernel: int, strides: int, name: str, relu: bool = True):
    """torchvision's conv (no bias, symmetric zero padding ``kernel // 2``) + BatchNormalization (+ ReLU)."""
    pad = kernel // 2
    if pad and strides > 1:  # Keras "same" pads stride-2 layers asymmetrically; torchvision pads both sides
        x = L.ZeroPadding2D(pad, name=f"{name}_pad")(x)
        x = L.Conv2D(filters, kernel, strides=strides, use_bias=False, name=name)(x)
    else:
        x = L.Conv2D(filters, kernel, strides=strides, padding="same", use_bias=False, name=name)(x)
    bn_name = name.replace("conv", "bn") if "conv" in name else f"{name}_bn"
    x = L.BatchNormalization(epsilon=1e-5, momentum=0.9, name=bn_name)(x)
    return L.ReLU(name=f"{name}_relu")(x) if relu else x


def _torchvision_resnet(input_shape, num_classes: int, blocks: Sequence[int], bottleneck: bool, name: str):
    x = inp = _input(input_shape)
    x = _conv_bn(x, 64, 7, 2, "conv1")
    x = L.ZeroPadding2D(1, name="maxpool_pad")(x)  # after ReLU, zero padding equals torchvision's -inf padding
    x = L.MaxPooling2D(3, strides=2, name="maxpool")(x)
    expansion = 4 if bottleneck else 1
    for stage, count in enumerate(blocks):
        planes = 64 * 2**stage
        for block in range(count):
            prefix = f"layer{stage + 1}_{block}"
            strides = 2 if stage > 0 and block == 0 else 1
            if bottleneck:  # ResNet v1.5: the stride sits on the 3x3 convolution
                y = _conv_bn(x, planes, 1, 1, f"{prefix}_conv1")
                y = _conv_bn(y, planes, 3, strides, f"{prefix}_conv2")
                y = _conv_bn(y, planes * 4, 1, 1, f"{prefix}_conv3", relu=False)
            else:
                y = _conv_bn(x, planes, 3, strides, f"{prefix}_conv1")
                y = _conv_bn(y, planes, 3, 1, f"{prefix}_conv2", relu=False)
            if strides != 1 or x.shape[-1] != planes * expansion:
                x = _conv_bn(x, planes * expansion, 1, strides, f"{prefix}_downsample", relu=False)
            x = L.Add(name=f"{prefix}_add")([x, y])
            x = L.ReLU(name=f"{prefix}_relu")(x)
    x = L.GlobalAveragePooling2D(name="avgpool")(x)
    out = L.Dense(_check_classes(num_classes), name="fc")(x)
    return keras.Model(inp, out, name=name)


def resnet18(input_shape: Sequence[int] = (224, 224, 3), num_classes: int = 1000) -> keras.Model:
    """ResNet-18 in torchvision's layout (basic blocks [2, 2, 2, 2], 11,689,512 parameters at 1000 classes), the
    paper's ImageNet model. Layer names follow torchvision's (``layer2_0_conv1``, ``layer2_0_downsample``, ``fc``)
    so that its weights map one to one (kernels transposed to HWIO)."""
    return _torchvision_resnet(input_shape, num_classes, (2, 2, 2, 2), False, "resnet18")


def resnet50(input_shape: Sequence[int] = (224, 224, 3), num_classes: int = 1000) -> keras.Model:
    """ResNet-50 in torchvision's layout (bottleneck blocks [3, 4, 6, 3], v1.5: stride on the 3x3 conv;
    25,557,032 parameters at 1000 classes)."""
    return _torchvision_resnet(input_shape, num_classes, (3, 4, 6, 3), True, "resnet50")


def mlp(
    input_shape: Sequence[int] = (28, 28, 1), num_classes: int = 10, units: Sequence[int] = (256, 128)
) -> keras.Model:
    """Flatten, Dense-ReLU per entry of ``units``, Dense head."""
    x = inp = _input(input_shape)
    x = L.Flatten(name="flatten")(x)
    for i, n in enumerate(units, start=1):
        x = L.Dense(n, activation="relu", name=f"fc{i}")(x)
    out = L.Dense(_check_classes(num_classes), name="logits")(x)
    return keras.Model(inp, out, name="mlp")


MODELS: dict[str, Callable[..., keras.Model]] = {
    "small_cnn": small_cnn,
    "ds_cnn": ds_cnn,
    "ds_resnet": ds_resnet,
    "resnet20": resnet20,
    "resnet18": resnet18,
    "resnet50": resnet50,
    "mlp": mlp,
}


def build(name: str, input_shape: Sequence[int], num_classes: int, **kwargs) -> keras.Model:
    """Build the zoo model ``name`` (one of ``MODELS``) for ``input_shape`` (H, W, C) and ``num_classes``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}.")
    return MODELS[name](input_shape, num_classes, **kwargs)
