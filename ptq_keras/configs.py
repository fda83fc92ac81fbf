"""tfmot ``QuantizeConfig`` for ternary kernels, the table of quantizable layers, and the quantization scheme.

Activations: ptq_keras quantizes weights only. Activations stay float during training (no FakeQuant anywhere: the
scheme below inserts no input QuantizeLayer and wraps no unannotated layer), so the trained model, the stripped
model and the float model share one graph. The int8 export calibrates activation ranges on representative data,
and ``ptq_keras.tflite.verify`` measures the agreement of the int8 file with the stripped Keras model.
"""

from __future__ import annotations

from .compat import is_keras3, keras, tfmot
from .quantizers import TernaryQuantizer

# One source of truth: which attributes of which layer type are ternarized, and how many trailing kernel axes form
# the output channel (DepthwiseConv2D's (kh, kw, in, mult) has in * mult output channels).
LAYER_KERNELS: dict[type, tuple[tuple[str, int], ...]] = {
    keras.layers.Dense: (("kernel", 1),),
    keras.layers.Conv2D: (("kernel", 1),),
    keras.layers.Conv1D: (("kernel", 1),),
    keras.layers.DepthwiseConv2D: (("depthwise_kernel", 2),),
    keras.layers.SeparableConv2D: (("depthwise_kernel", 2), ("pointwise_kernel", 1)),
}


def kernel_attributes(layer) -> tuple[tuple[str, int], ...]:
    """``((attribute, channel_dims), ...)`` for a quantizable tf_keras or Keras 3 layer, ``()`` otherwise (exact
    type match)."""
    attributes = LAYER_KERNELS.get(type(layer))
    if attributes is not None:
        return attributes
    if is_keras3(layer):
        from . import keras3_layers

        return keras3_layers.kernel_attributes(layer)
    return ()


def is_ternary_wrapper(layer) -> bool:
    """A layer made by ``ptq_keras.ternarize``: tfmot's wrapper with a ternary config (tf_keras), or the Keras 3
    :class:`ptq_keras.keras3_layers.TernaryWrapper`."""
    if isinstance(layer, tfmot.quantization.keras.QuantizeWrapper):
        return isinstance(layer.quantize_config, TernaryQuantizeConfig)
    return type(layer).__module__ == "ptq_keras.keras3_layers" and type(layer).__name__ == "TernaryWrapper"


def is_batchnorm(layer) -> bool:
    """A BatchNormalization layer of tf_keras or Keras 3."""
    return isinstance(layer, keras.layers.BatchNormalization) or (
        is_keras3(layer) and type(layer).__name__ == "BatchNormalization"
    )


@keras.utils.register_keras_serializable(package="ptq_keras")
class TernaryQuantizeConfig(tfmot.quantization.keras.QuantizeConfig):
    """Ternarize the kernel(s) of one layer; no activation or output quantization."""

    def __init__(self, attributes, options=None):
        self.attributes = [(str(a), int(d)) for a, d in attributes]
        self.options = dict(options or {})
        self._quantizers = None

    def _get_quantizers(self):
        if self._quantizers is None:
            self._quantizers = [TernaryQuantizer(dims, **self.options) for _, dims in self.attributes]
        return self._quantizers

    def get_weights_and_quantizers(self, layer):
        return [
            (getattr(layer, attr), quantizer)
            for (attr, _), quantizer in zip(self.attributes, self._get_quantizers())
        ]

    def get_activations_and_quantizers(self, layer):
        return []

    def set_quantize_weights(self, layer, quantize_weights):
        for (attr, _), weight in zip(self.attributes, quantize_weights):
            setattr(layer, attr, weight)

    def set_quantize_activations(self, layer, quantize_activations):
        pass

    def get_output_quantizers(self, layer):
        return []

    def get_config(self):
        options = dict(self.options)
        if "sparsity" in options and not isinstance(options["sparsity"], (int, float, dict)):
            options["sparsity"] = options["sparsity"].get_config()
        return {"attributes": [list(a) for a in self.attributes], "options": options}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


class _NoLayoutTransform(tfmot.quantization.keras.QuantizeLayoutTransform):
    """Keep the graph as it is: no BatchNorm folding patterns, no input QuantizeLayer."""

    def apply(self, model, layer_quantize_map):
        return model, layer_quantize_map


class _NothingByDefault(tfmot.quantization.keras.QuantizeRegistry):
    """Unannotated layers are never wrapped (so no default 8-bit activation FakeQuant appears)."""

    def get_quantize_config(self, layer):
        return None

    def supports(self, layer):
        return False


class TernaryScheme(tfmot.quantization.keras.QuantizeScheme):
    def get_layout_transformer(self):
        return _NoLayoutTransform()

    def get_quantize_registry(self):
        return _NothingByDefault()
