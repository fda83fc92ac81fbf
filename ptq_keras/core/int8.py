"""Int8 arithmetic of TFLite's kernels, in ``keras.ops``: activation ranges (their moving average in training and the
8-bit fake quantization over them), the int8 parameters of a range, and the fixed-point requantization and MEAN
that the int8 kernels compute, so that a stripped model reproduces the int8 file to the LSB."""

from __future__ import annotations

import math

import numpy as np
from keras import ops


def _keras3():
    import keras  # noqa: PLC0415 - Keras 3 (its quantizers module)

    return keras


def range_update(x, low, high, calibrated, ema_decay):
    """The new ``(min, max)`` after a training batch ``x``: the batch's range (always containing 0) in an
    ``ema_decay`` moving average; the first batch (``calibrated`` 0) sets it. ``keras.ops``: both Keras APIs."""
    batch_min = ops.minimum(ops.min(x), 0.0)
    batch_max = ops.maximum(ops.max(x), 0.0)
    decay = ops.where(calibrated > 0.5, ema_decay, 0.0)
    return decay * low + (1.0 - decay) * batch_min, decay * high + (1.0 - decay) * batch_max


def fake_quant(x, low, high, num_bits: int):
    """``num_bits`` fake quantization over ``[low, high]`` (nudged so that 0 is exact), straight-through gradient.
    On TensorFlow this is ``tf.quantization.fake_quant_with_min_max_vars``, the op the TFLite converter reads."""
    return _keras3().quantizers.fake_quant_with_min_max_vars(x, low, high, num_bits=num_bits, narrow_range=False)


def int8_params(low: float, high: float, num_bits: int = 8) -> tuple[float, int]:
    """``(scale, zero_point)`` of the int8 tensor the converter makes of a fake quantization over ``[low, high]``
    (the same nudging as ``tf.quantization.fake_quant_with_min_max_vars``: zero exactly representable)."""
    qmax = 2**num_bits - 1
    low, high = float(np.float32(low)), float(np.float32(high))
    scale = (high - low) / qmax
    zero_from_min = -low / scale
    zero = min(max(math.floor(zero_from_min + 0.5), 0), qmax)
    return float(np.float32(scale)), zero - 2 ** (num_bits - 1)  # the file stores float32 scales


def _quantize_multiplier(real: float) -> tuple[int, int]:
    """TFLite's ``QuantizeMultiplier``: ``real = multiplier * 2**(shift - 31)``, multiplier a Q31 integer."""
    fraction, shift = math.frexp(real)
    multiplier = math.floor(fraction * 2**31 + 0.5)
    if multiplier == 2**31:
        multiplier, shift = multiplier // 2, shift + 1
    if shift < -31:  # too small for a Q31 multiplier: the kernels compute 0
        return 0, 0
    return multiplier, shift


def mean_parameters(input_range, output_range, count: int) -> dict:
    """The integer parameters of TFLite's int8 MEAN over ``count`` elements, from a tensor quantized over
    ``input_range`` to one quantized over ``output_range``: the kernel folds the division by ``count`` into its
    fixed-point multiplier (``keepdims`` or not), which leaves few fraction bits before the last rounding."""
    input_scale, _ = int8_params(*input_range)
    output_scale, output_zero = int8_params(*output_range)
    multiplier, shift = _quantize_multiplier(input_scale / output_scale)
    folded = min(count.bit_length() - 1, 32, 31 + shift)
    return {
        "count": int(count),
        "input_scale": input_scale,
        "multiplier": int((multiplier << folded) // count),
        "shift": int(shift - folded),
        "output_scale": output_scale,
        "output_zero_point": int(output_zero),
    }


def _multiply_by_quantized_multiplier(x, multiplier, shift):
    """TFLite's ``MultiplyByQuantizedMultiplier`` on integral float64 values: a rounding doubling high multiply,
    then a rounding right shift (two roundings, as the kernels do). ``multiplier`` and ``shift`` are integers or
    arrays of them, one per channel (the last axis of ``x``).

    On magnitudes both roundings are ``floor(|v| + 1/2)``: the high multiply ``(p + nudge) / 2**31`` (C++ division)
    rounds half up, and half towards zero below zero (``- 2**-31`` there); the rounding shift rounds half away
    from zero. Few elementwise ops: the stripped model runs this on every int8 tensor."""
    multiplier = np.asarray(multiplier, np.float64)
    shift = np.asarray(shift, np.int64)
    left, right = np.maximum(shift, 0), np.maximum(-shift, 0)
    sign = ops.sign(x)
    magnitude = ops.abs(x) * (2.0**left * multiplier * 2.0**-31)  # |x * multiplier| / 2**31: exact scaling
    high = ops.floor(magnitude + (sign * 2.0**-32 + (0.5 - 2.0**-32)))  # + 1/2, less 2**-31 below zero
    return sign * ops.floor(high * 2.0**-right + 0.5)


def _multiply_by_quantized_multiplier_reference(x, multiplier, shift):
    """The kernels' integer steps one by one (``nudge``, truncating division, mask and threshold), for the tests."""
    multiplier = np.asarray(multiplier, np.float64)
    shift = np.asarray(shift, np.int64)
    left, right = np.maximum(shift, 0), np.maximum(-shift, 0)
    product = x * (2.0**left * multiplier)
    nudge = 2.0**30 - ops.cast(product < 0, "float64") * (2.0**31 - 1.0)  # 2**30, or 1 - 2**30 below zero
    high = ops.sign(product + nudge) * ops.floor(ops.abs(product + nudge) / 2.0**31)  # C++ division: toward zero
    power = 2.0**right
    floor = ops.floor(high / power)  # arithmetic shift
    remainder = high - floor * power
    threshold = np.floor((power - 1.0) / 2.0) + ops.cast(high < 0, "float64")
    return floor + ops.cast(remainder > threshold, "float64")


def tflite_mean(x, p: dict):
    """The output of TFLite's int8 MEAN, dequantized, from ``x``, the float mean of the int8 input values (the
    global average pooling of fake-quantized values); ``p`` from :func:`mean_parameters`. Its accumulator is the
    int32 sum (less the zero points): ``x`` in units of ``input_scale / count``; then the requantization of
    :func:`tflite_requantize`. Straight-through gradient."""
    return tflite_requantize(x, {
        "unit": [p["input_scale"] / p["count"]], "multiplier": [p["multiplier"]], "shift": [p["shift"]],
        "live": [True], "output_scale": p["output_scale"], "output_zero_point": p["output_zero_point"],
    }, fallback=None)  # fmt: skip


def requantize_parameters(units, real_multipliers, output_range, live=None, single_rounding=False) -> dict:
    """The integer requantization of an int8 CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED (per output channel)
    or ADD: the op's int32 accumulator is the real output in ``units`` (one per channel, or one), multiplied by
    ``real_multipliers`` in Q31 fixed point (TFLite's ``QuantizeMultiplier``) onto the output scale. ``live``: per
    channel, False where the parameters are unknown (an all-zero kernel channel; plain fake quantization there).
    ``single_rounding``: one rounding of the exact product instead of the high multiply and the rounding shift
    (LiteRT's reference per-channel FULLY_CONNECTED; TFLM's rounds twice, see :func:`link_requantization`)."""
    output_scale, output_zero = int8_params(*output_range)
    pairs = [_quantize_multiplier(float(real)) for real in np.atleast_1d(real_multipliers)]
    units = np.atleast_1d(np.asarray(units, np.float64))
    return {
        "unit": [float(u) for u in units],
        "multiplier": [int(m) for m, _ in pairs],
        "shift": [int(shift) for _, shift in pairs],
        "live": [bool(v) for v in (np.ones(len(units), bool) if live is None else live)],
        "rounding": "single" if single_rounding else "double",
        "output_scale": output_scale,
        "output_zero_point": int(output_zero),
    }


def tflite_requantize(x, p: dict, fallback):
    """The output of an int8 kernel that requantizes its int32 accumulator (``p`` from
    :func:`requantize_parameters`), dequantized, from ``x``, the float output the Keras layers compute (the
    accumulator up to float rounding, in ``p["unit"]``). ``fallback()``: the plain fake quantization of ``x``, used
    on channels that are not ``live``. Straight-through gradient."""
    accumulator = ops.round(ops.cast(x, "float64") * (1.0 / np.asarray(p["unit"], np.float64)))
    if p.get("rounding") == "single":
        scale = np.asarray(p["multiplier"], np.float64) * 2.0 ** (np.asarray(p["shift"], np.float64) - 31.0)
        q = ops.floor(accumulator * scale + 0.5)
    else:
        q = _multiply_by_quantized_multiplier(accumulator, p["multiplier"], p["shift"])
    zero = p["output_zero_point"]
    y = ops.cast(ops.clip(q, -128.0 - zero, 127.0 - zero) * p["output_scale"], x.dtype)
    if not all(p["live"]):
        y = ops.where(np.asarray(p["live"]), y, fallback())
    return x + ops.stop_gradient(y - x)
