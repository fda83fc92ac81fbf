"""8-bit activation quantization in training (``ternarize(..., activations="int8")``): the
:class:`ActivationQuantizer` layers, where they go, and the int8 rounding the stripped model reproduces. Defined
in :mod:`ptq_keras.frontends.activations` (the rules both Keras frontends share) and each frontend's
``activations`` module (the layer); this module is their public name."""

from __future__ import annotations

from .frontends.activations import (  # noqa: F401
    ACTIVATIONS,
    QuantizerOptions,
    _needs_quantizer,
    copy_weights,
    exporting,
    fake_quant,
    int8_params,
    is_activation_quantizer,
    link,
    link_means,
    link_requantization,
    mean_parameters,
    quantizers,
    range_update,
    requantize_parameters,
    split_separable,
    tflite_mean,
    tflite_requantize,
)

__all__ = ["ActivationQuantizer", "insert", "quantizers", "split_separables"]  # noqa: F822 - see __getattr__


def __getattr__(name: str):
    if name in ("ActivationQuantizer", "insert", "split_separables"):  # tf_keras's, in its frontend
        from .frontends.tf_keras import activations as tf_keras_activations

        return getattr(tf_keras_activations, name)
    from .core import int8
    from .frontends import activations

    for module in (activations, int8):  # private helpers
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
