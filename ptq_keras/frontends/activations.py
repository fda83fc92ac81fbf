"""8-bit activation fake-quantization where the int8 converter quantizes: ``ternarize(..., activations="int8")``.

The TFLite int8 converter folds BatchNormalization into the preceding convolution, fuses ReLU / ReLU6 into the op
before it, and gives every remaining op output one int8 scale and zero point. Max pooling, flattening, reshaping and
dropout keep their input's scale. :func:`insert` rebuilds a functional graph with an :class:`ActivationQuantizer`
right where those int8 tensors are: on each model input, and after the last layer of each fused block (a kernel
layer, its BatchNormalization and its ReLU), after residual adds, average pooling and every other computing layer.

Each quantizer learns its range in training (a moving average of the batch minimum and maximum, the range always
containing 0) and computes ``tf.quantization.fake_quant_with_min_max_vars`` (8 bits, zero exactly representable),
with its straight-through gradient. The converter reads these ranges from the stripped model instead of calibrating
them, so the exported int8 file computes what the trained model computes.

The int8 kernels round differently from a float op followed by fake quantization. CONV_2D, DEPTHWISE_CONV_2D,
FULLY_CONNECTED and ADD requantize their int32 accumulators with a Q31 fixed-point multiplier and two roundings
(under 1% of each op's outputs 1 LSB away, adding up along a residual model); TFLite's (and TFLM's) int8 MEAN folds
the division by the pooled count into its fixed-point multiplier and keeps only a few fraction bits before the final
rounding (on a 7x7 map, 3 bits), so about 6% of its outputs come out 1 LSB higher than the rounded mean.
:func:`link` (called by ``strip`` and ``recalibrate_batchnorm``) gives each static quantizer the integer parameters
of the op whose output it is (:func:`link_requantization`, :func:`link_means`), and the stripped model then computes
those kernels' arithmetic (:func:`tflite_requantize`, :func:`tflite_mean`); under :func:`exporting` the converter
sees the plain fake quantization.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np

from ..core import layers
from ..core.int8 import (  # noqa: F401 - re-exported: the int8 arithmetic the quantizers use
    fake_quant,
    int8_params,
    mean_parameters,
    range_update,
    requantize_parameters,
    tflite_mean,
    tflite_requantize,
)
from .detect import is_keras3, keras3

__all__ = ["QuantizerOptions", "is_activation_quantizer", "link", "quantizers", "split_separable"]

ACTIVATIONS = (None, "int8")

# Layers whose int8 output keeps its input's scale: no quantizer after them. The graph rules name layer classes,
# so that they read tf_keras and Keras 3 graphs alike.
_PASSTHROUGH = frozenset(
    {"MaxPooling1D", "MaxPooling2D", "GlobalMaxPooling1D", "GlobalMaxPooling2D", "Flatten", "Reshape", "Dropout",
     "SpatialDropout1D", "SpatialDropout2D", "ZeroPadding1D", "ZeroPadding2D", "Cropping1D", "Cropping2D",
     "ActivationQuantizer"}
)  # fmt: skip
_GLOBAL_AVERAGE = frozenset({"GlobalAveragePooling1D", "GlobalAveragePooling2D"})
_KERNEL_LAYERS = frozenset(layers.NAMES)  # the quantizable layers (core.layers)


def _is(layer, names) -> bool:
    """Whether ``layer`` is (a subclass of) a Keras layer class named in ``names`` (either Keras API)."""
    return any(cls.__name__ in names for cls in type(layer).__mro__)


_exporting = 0


@contextlib.contextmanager
def exporting():
    """While a model is converted to TFLite: static quantizers give the converter the plain fake quantization it
    reads (no emulation of the int8 MEAN kernel, see :func:`link_means`)."""
    global _exporting
    _exporting += 1
    try:
        yield
    finally:
        _exporting -= 1


def _has_float64(layer) -> bool:
    """The emulation needs exact float64 integers (JAX computes float32 unless x64 is enabled)."""
    if not is_keras3(layer) or keras3().backend.backend() != "jax":
        return True
    import jax

    return bool(jax.config.jax_enable_x64)


def _producer(tensor):
    return tensor._keras_history[0]  # tf_keras KerasHistory.layer, Keras 3 KerasHistory.operation


def link_means(model) -> int:
    """Give every static quantizer right after a global average pooling the parameters of the int8 MEAN the
    converter makes there (:func:`mean_parameters`), so that the model computes that kernel's rounding; clears
    them elsewhere. Called by ``strip`` and ``recalibrate_batchnorm`` (the ranges are final then). Returns how many
    quantizers were linked."""
    linked = 0
    for layer in (layer for layer in getattr(model, "layers", ()) if is_activation_quantizer(layer)):
        layer.mean_input = None
        try:
            pool = _producer(layer.input)
            source = _producer(pool.input) if _is(pool, _GLOBAL_AVERAGE) else None
            while source is not None and _is(source, _PASSTHROUGH) and not is_activation_quantizer(source):
                source = _producer(source.input)
        except (AttributeError, ValueError, IndexError, TypeError):  # a layer used several times, no graph
            continue
        if source is None or not is_activation_quantizer(source) or not (layer.static and source.static):
            continue
        if getattr(pool, "data_format", "channels_last") != "channels_last":
            continue
        spatial = [int(d) for d in pool.input.shape[1:-1]]
        if float(source.max.numpy()) <= float(source.min.numpy()) or float(layer.max.numpy()) <= float(
            layer.min.numpy()
        ):
            continue
        layer.mean_input = mean_parameters(
            (source.min.numpy(), source.max.numpy()), (layer.min.numpy(), layer.max.numpy()), math.prod(spatial)
        )
        linked += 1
    return linked


def _range(quantizer):
    return float(quantizer.min.numpy()), float(quantizer.max.numpy())


def _source_quantizer(tensor):
    """The static quantizer whose int8 tensor ``tensor`` is (through layers that keep the scale), or None."""
    source = _producer(tensor)
    while _is(source, _PASSTHROUGH) and not is_activation_quantizer(source):
        source = _producer(source.input)
    if not is_activation_quantizer(source) or not source.static:
        return None
    low, high = _range(source)
    return source if high > low else None


def _folded_magnitudes(kernel_layer, bn) -> np.ndarray | None:
    """Per output channel, the largest |weight| of the kernel the converter quantizes (BatchNormalization folded
    in): its int8 scale is that over 127."""
    if _is(kernel_layer, {"DepthwiseConv2D"}):
        kernel = getattr(kernel_layer, "depthwise_kernel", None)  # tf_keras; Keras 3 calls it kernel
        kernel = (kernel_layer.kernel if kernel is None else kernel).numpy()
        kernel = kernel.reshape(-1, kernel.shape[-2] * kernel.shape[-1])
    else:
        kernel = kernel_layer.kernel.numpy()
        kernel = kernel.reshape(-1, kernel.shape[-1])
    magnitudes = np.abs(kernel.astype(np.float32)).max(axis=0)
    if bn is not None:
        variance = bn.moving_variance.numpy().astype(np.float32)
        factor = np.float32(1.0) / np.sqrt(variance + np.float32(bn.epsilon))
        if getattr(bn, "gamma", None) is not None:
            factor = factor * bn.gamma.numpy().astype(np.float32)
        if factor.shape != magnitudes.shape:
            return None
        magnitudes = magnitudes * np.abs(factor)
    return magnitudes


def _requantization(layer) -> dict | None:
    """:func:`requantize_parameters` of the int8 op whose output ``layer`` (a static quantizer) is: a kernel layer
    (with its folded BatchNormalization and fused ReLU) or a two-input Add, whose inputs are static quantizers."""
    op = _producer(layer.input)
    fused = _is_fused_activation(op)
    if fused:
        op = _producer(op.input)
    bn = None
    if _is(op, {"BatchNormalization"}) and _is(_producer(op.input), _KERNEL_LAYERS - {"SeparableConv2D"}):
        bn, op = op, _producer(op.input)
        if getattr(bn, "axis", -1) not in (-1, [-1], len(op.output.shape) - 1, [len(op.output.shape) - 1]):
            return None
    output_range = _range(layer)
    if _is(op, {"Add"}):
        if bn is not None or len(op.input) != 2:
            return None
        sources = [_source_quantizer(t) for t in op.input]
        if None in sources:
            return None
        scales = [int8_params(*_range(q))[0] for q in sources]
        twice_max = 2.0 * max(scales)
        unit = twice_max / 2**20  # TFLite's int8 ADD: both inputs rescaled onto 2 * max scale / 2**20
        output_scale, _ = int8_params(*output_range)
        return requantize_parameters([unit], [unit / output_scale], output_range)
    if not _is(op, _KERNEL_LAYERS - {"SeparableConv2D"}) or getattr(op, "data_format", None) == "channels_first":
        return None
    if not _linear(op) and (fused or bn is not None or not _is_fused_activation_name(op)):
        return None
    source = _source_quantizer(op.input)
    if source is None:
        return None
    magnitudes = _folded_magnitudes(op, bn)
    if magnitudes is None:
        return None
    input_scale, _ = int8_params(*_range(source))
    output_scale, _ = int8_params(*output_range)
    filter_scales = (magnitudes / np.float32(127.0)).astype(np.float32).astype(np.float64)
    live = filter_scales > 0
    units = np.where(live, input_scale * filter_scales, 1.0)
    reals = np.where(live, units / output_scale, 0.0)
    return requantize_parameters(units, reals, output_range, live, single_rounding=_is(op, {"Dense"}))


def _is_fused_activation_name(layer) -> bool:
    return getattr(getattr(layer, "activation", None), "__name__", "") in ("relu", "relu6")


def link_requantization(model) -> int:
    """Give every static quantizer at the output of an int8 convolution, depthwise convolution, fully connected
    layer or residual add the integer parameters of that op's requantization (:func:`requantize_parameters`), so
    that the stripped model rounds as the int8 kernels do (a fixed-point multiply with two roundings); clears them
    elsewhere. Returns how many quantizers were linked.

    The rounding is LiteRT's reference kernels', which ``verify`` checks int8 files against. The one place TFLM
    rounds otherwise is the per-channel FULLY_CONNECTED: LiteRT rounds the product once, TFLM twice, so a micro
    file's Dense outputs may be 1 LSB from the stripped model's on a small share of values (well within ``verify``'s
    1-LSB check of TFLM against LiteRT)."""
    linked = 0
    for layer in (layer for layer in getattr(model, "layers", ()) if is_activation_quantizer(layer)):
        layer.requant = None
        if not layer.static or _range(layer)[1] <= _range(layer)[0]:
            continue
        try:
            layer.requant = _requantization(layer)
        except (AttributeError, ValueError, IndexError, TypeError):  # a layer used several times, no graph
            layer.requant = None
        linked += layer.requant is not None
    return linked


def link(model) -> int:
    """:func:`link_means` and :func:`link_requantization`: after ``strip`` or a change of ranges or BatchNormalization
    statistics, the stripped model computes the int8 kernels' rounding. Returns how many quantizers were linked."""
    return link_means(model) + link_requantization(model)


def is_activation_quantizer(layer) -> bool:
    """A tf_keras or Keras 3 :class:`ActivationQuantizer`."""
    return type(layer).__name__ == "ActivationQuantizer" and hasattr(layer, "ema_decay")


class QuantizerOptions:
    """The options of both Keras APIs' ``ActivationQuantizer`` (a mixin before the layer base class)."""

    def __init__(self, num_bits: int = 8, ema_decay: float = 0.99, static: bool = False, mean_input=None,
                 requant=None, **kwargs):  # fmt: skip
        super().__init__(**kwargs)
        self.num_bits = int(num_bits)
        self.ema_decay = float(ema_decay)
        self.static = bool(static)
        self.mean_input = dict(mean_input) if mean_input else None  # see link_means
        self.requant = dict(requant) if requant else None  # see link_requantization

    def get_config(self):
        return {**super().get_config(), "num_bits": self.num_bits, "ema_decay": self.ema_decay, "static": self.static,
                "mean_input": dict(self.mean_input) if self.mean_input else None,
                "requant": dict(self.requant) if self.requant else None}  # fmt: skip

    def _static(self, x):
        """A static quantizer's output: the rounding of the int8 kernel whose output it is (the requantization of a
        convolution, dense layer or add, :func:`link_requantization`; the MEAN after a global average pooling,
        :func:`link_means`), else the fake quantization, which is also what the converter sees (:func:`exporting`)."""
        def plain():
            return fake_quant(x, self.min, self.max, self.num_bits)

        if _exporting or self.num_bits != 8 or not _has_float64(self):
            return plain()
        if self.requant:
            return tflite_requantize(x, self.requant, plain)
        if self.mean_input:
            return tflite_mean(x, self.mean_input)
        return plain()


def quantizers(model) -> list:
    return [layer for layer in model.layers if is_activation_quantizer(layer)]


def _is_fused_activation(layer) -> bool:
    if _is(layer, {"ReLU"}):
        return (
            float(layer.negative_slope) == 0.0
            and float(layer.threshold) == 0.0
            and (layer.max_value is None or float(layer.max_value) == 6.0)
        )
    if _is(layer, {"Activation"}):
        return getattr(layer.activation, "__name__", "") in ("relu", "relu6")
    return False


def _linear(layer) -> bool:
    return getattr(getattr(layer, "activation", None), "__name__", "linear") == "linear"


def _fuses_into(layer, consumer) -> bool:
    """True when the converter computes ``consumer`` inside ``layer``'s int8 op (no int8 tensor between them)."""
    if _is(layer, _KERNEL_LAYERS) and _linear(layer):
        return _is(consumer, {"BatchNormalization"}) or _is_fused_activation(consumer)
    if _is(layer, {"BatchNormalization", "Add"}):
        return _is_fused_activation(consumer)
    return False


def _needs_quantizer(layer, consumers) -> bool:
    if _is(layer, {"InputLayer"}):
        return True
    if _is(layer, _PASSTHROUGH):
        return False
    return not (len(consumers) == 1 and _fuses_into(layer, consumers[0]))


def split_separable(layer, layers):
    """A SeparableConv2D as the two ops the converter makes of it: DepthwiseConv2D, then a 1x1 Conv2D (of the
    Keras API whose ``layers`` module is given)."""
    L = layers
    c = layer.get_config()
    depthwise = L.DepthwiseConv2D(
        c["kernel_size"],
        strides=c["strides"],
        padding=c["padding"],
        depth_multiplier=c["depth_multiplier"],
        data_format=c["data_format"],
        dilation_rate=c["dilation_rate"],
        use_bias=False,
        depthwise_regularizer=c.get("depthwise_regularizer"),
        depthwise_constraint=c.get("depthwise_constraint"),
        name=f"{layer.name}_depthwise",
    )
    pointwise = L.Conv2D(
        c["filters"],
        1,
        data_format=c["data_format"],
        activation=c["activation"],
        use_bias=c["use_bias"],
        kernel_regularizer=c.get("pointwise_regularizer"),
        bias_regularizer=c.get("bias_regularizer"),
        activity_regularizer=c.get("activity_regularizer"),
        kernel_constraint=c.get("pointwise_constraint"),
        bias_constraint=c.get("bias_constraint"),
        name=f"{layer.name}_pointwise",
    )
    return depthwise, pointwise


def copy_weights(copies) -> None:
    """Give each fresh copy (a layer, or the two halves of a split SeparableConv2D) the weights of its original:
    ``copies`` is ``[(original, fresh), ...]`` (either Keras API)."""
    for layer, fresh in copies:
        if isinstance(fresh, tuple):
            depthwise, pointwise = fresh
            depthwise.set_weights([layer.depthwise_kernel.numpy()])
            pointwise.set_weights([layer.pointwise_kernel.numpy()] + ([layer.bias.numpy()] if layer.use_bias else []))
        elif layer.weights:
            fresh.set_weights(layer.get_weights())
