"""tfmot ``QuantizeConfig`` for ternary kernels, the table of quantizable layers, and the quantization scheme.

Activations: ptq_keras quantizes weights only. Activations stay float during training (no FakeQuant anywhere: the
scheme below inserts no input QuantizeLayer and wraps no unannotated layer), so the trained model, the stripped
model and the float model share one graph. The int8 export calibrates activation ranges on representative data,
and ``ptq_keras.tflite.verify`` measures the agreement of the int8 file with the stripped Keras model.
"""

from __future__ import annotations

from ...core import layers
from ...core.quantizer import KernelQuantizers
from ...core.quantizer import TernaryQuantizer as _CoreQuantizer
from . import keras, tf, tfmot

_AGGREGATIONS = {"only_first_replica": tf.VariableAggregation.ONLY_FIRST_REPLICA, "mean": tf.VariableAggregation.MEAN}


@keras.utils.register_keras_serializable(package="ptq_keras")
class TernaryQuantizer(_CoreQuantizer, tfmot.quantization.keras.quantizers.Quantizer):
    """The core :class:`~ptq_keras.core.quantizer.TernaryQuantizer` as a tfmot ``Quantizer``: ``build`` makes its
    variables tf_keras weights of the wrapper."""

    def build(self, tensor_shape, name, layer):
        from ..detect import check_tensorflow_backend

        if isinstance(layer, keras.layers.Layer):  # tf_keras: its tensors are TensorFlow's, and so must keras.ops be
            check_tensorflow_backend(
                f"Layer {layer.name!r}, a tf_keras layer,",
                "keras.ops compute ptq_keras' ternary math, and tf_keras models need them on TensorFlow tensors: set "
                "KERAS_BACKEND=tensorflow (or leave it unset). Keras 3 models train on JAX too.",
            )
        self.compute_dtype = tf.as_dtype(getattr(layer, "compute_dtype", None) or tf.float32).name  # mixed precision
        return {
            role: layer.add_weight(
                spec.name, shape=spec.shape, dtype=getattr(tf, spec.dtype), trainable=False,
                initializer=keras.initializers.Constant(spec.initial), aggregation=_AGGREGATIONS[spec.aggregation],
                **({} if spec.dtype.startswith("int") else {"experimental_autocast": spec.autocast}),
            )  # fmt: skip
            for role, spec in self.variable_specs(tensor_shape, name).items()
        }


kernel_attributes = layers.kernel_attributes


@keras.utils.register_keras_serializable(package="ptq_keras")
class TernaryQuantizeConfig(KernelQuantizers, tfmot.quantization.keras.QuantizeConfig):
    """Ternarize the kernel(s) of one layer; no activation or output quantization."""

    quantizer_class = TernaryQuantizer

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


def is_wrapper(layer) -> bool:
    """A tf_keras layer made by ``ptq_keras.ternarize``: tfmot's wrapper with a ternary config."""
    return isinstance(layer, tfmot.quantization.keras.QuantizeWrapper) and isinstance(
        layer.quantize_config, TernaryQuantizeConfig
    )
