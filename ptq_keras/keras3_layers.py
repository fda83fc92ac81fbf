"""The Keras 3 side of ptq_keras: a wrapper layer that trains a Keras 3 layer's kernels as sparse ternary weights.

The wrapper runs the same :class:`~ptq_keras.quantizers.TernaryQuantizer` as the tf_keras path (same options,
schedules, STEs, support selection and scales: one implementation of the math), with its state (step, mask,
sparsity, freeze step, Taylor score) held as Keras 3 variables of the wrapper, so that it is saved in the
``.keras`` format and mirrored under ``tf.distribute``. Keras 3 runs it on the TensorFlow backend.

Keras 3 is imported here only; ``ptq_keras`` imports this module when it first meets a Keras 3 model.
"""

from __future__ import annotations

from .compat import keras3, tf
from .configs import TernaryQuantizeConfig

k3 = keras3()

# Keras 3 layer type -> ((attribute, channel_dims, attribute the layer's call reads), ...). DepthwiseConv2D's
# kernel is ``kernel`` in Keras 3 (``depthwise_kernel`` in tf_keras); Dense and Conv read ``_kernel`` through
# their ``kernel`` property.
LAYER_KERNELS = {
    k3.layers.Dense: (("kernel", 1, "_kernel"),),
    k3.layers.Conv1D: (("kernel", 1, "_kernel"),),
    k3.layers.Conv2D: (("kernel", 1, "_kernel"),),
    k3.layers.DepthwiseConv2D: (("kernel", 2, "kernel"),),
    k3.layers.SeparableConv2D: (
        ("depthwise_kernel", 2, "depthwise_kernel"),
        ("pointwise_kernel", 1, "pointwise_kernel"),
    ),
}

_AGGREGATIONS = {
    tf.VariableAggregation.ONLY_FIRST_REPLICA: "only_first_replica",
    tf.VariableAggregation.MEAN: "mean",
    tf.VariableAggregation.NONE: "none",
}


def kernel_attributes(layer) -> tuple[tuple[str, int], ...]:
    """``((attribute, channel_dims), ...)`` of a quantizable Keras 3 layer, ``()`` otherwise (exact type match)."""
    return tuple((attr, dims) for attr, dims, _ in LAYER_KERNELS.get(type(layer), ()))


class _VariableMaker:
    """What :meth:`TernaryQuantizer.build` calls ``layer``: its tf_keras-style ``add_weight`` calls made on a
    Keras 3 layer."""

    def __init__(self, layer):
        self._layer = layer
        self.compute_dtype = layer.compute_dtype

    def add_weight(self, name, *, shape, dtype, initializer, trainable, aggregation, experimental_autocast=True):
        if not isinstance(initializer, str):  # tf_keras Constant(freeze step)
            initializer = k3.initializers.Constant(float(initializer.get_config()["value"]))
        return self._layer.add_weight(
            name=name, shape=tuple(shape), dtype=tf.as_dtype(dtype).name, initializer=initializer,
            trainable=trainable, aggregation=_AGGREGATIONS[aggregation], autocast=experimental_autocast,
        )  # fmt: skip


@k3.saving.register_keras_serializable(package="ptq_keras")
class TernaryWrapper(k3.layers.Wrapper):
    """A Keras 3 Dense / Conv1D / Conv2D / DepthwiseConv2D / SeparableConv2D whose kernels train as sparse ternary
    weights. Made by :func:`ptq_keras.ternarize`; ``ptq_keras.strip`` turns it back into the plain layer.

    ``quantize_config`` and ``_weight_vars`` (``[(latent kernel, quantizer, its variables), ...]``) have the
    meaning they have on tf_keras' tfmot wrapper, so that the rest of ptq_keras reads both alike.
    """

    def __init__(self, layer, attributes=None, options=None, **kwargs):
        kwargs.setdefault("name", f"ptq_{layer.name}")
        super().__init__(layer, **kwargs)
        if attributes is None:
            attributes = kernel_attributes(layer)
        self.quantize_config = TernaryQuantizeConfig(attributes, options)
        self._weight_vars = []

    def build(self, input_shape=None):
        if not self.layer.built:
            self.layer.build(input_shape)
        maker = _VariableMaker(self)
        self._weight_vars = []
        quantizers = self.quantize_config._get_quantizers()
        for (attr, _), quantizer in zip(self.quantize_config.attributes, quantizers):
            latent = getattr(self.layer, attr)
            qvars = quantizer.build(tuple(latent.shape), attr, maker)
            self._weight_vars.append((latent, quantizer, qvars))
        self.built = True

    def call(self, inputs, training=None):
        storage = {attr: store for attr, _, store in LAYER_KERNELS[type(self.layer)]}
        saved = {}
        try:
            for (attr, _), (latent, quantizer, qvars) in zip(self.quantize_config.attributes, self._weight_vars):
                value = quantizer(latent, bool(training), qvars)
                saved[storage[attr]] = getattr(self.layer, storage[attr])
                object.__setattr__(self.layer, storage[attr], value)  # no tracking: a tensor for this call only
            return self.layer.call(inputs)
        finally:
            for store, variable in saved.items():
                object.__setattr__(self.layer, store, variable)

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(self.quantize_config.get_config())
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        layer = k3.saving.deserialize_keras_object(config.pop("layer"))
        return cls(layer, **config)


def is_wrapper(layer) -> bool:
    return isinstance(layer, TernaryWrapper)


def ternarize(model, targets: set, options_of) -> object:
    """A Keras 3 copy of ``model`` whose ``targets`` layers are wrapped with the options ``options_of(name)``;
    the other layers are copies with the same weights."""
    copies = []

    from .wrap import _fresh_copy

    def wrap(layer):
        fresh = _fresh_copy(layer)
        copies.append((layer, fresh))
        if layer.name not in targets:
            return fresh
        return TernaryWrapper(fresh, kernel_attributes(layer), options_of(layer.name), name=f"ptq_{layer.name}")

    qmodel = k3.models.clone_model(model, clone_function=wrap)
    for original, fresh in copies:
        if original.weights:
            fresh.set_weights(original.get_weights())
    return qmodel


def strip(model, project):
    """A plain Keras 3 copy of a ternarized ``model``: every wrapper becomes its layer, whose kernels are
    ``project(wrapper)`` (``{attribute: exact ternary kernel}``); other weights are copied."""
    from .wrap import _fresh_copy

    pairs = []

    def unwrap(layer):
        inner = layer.layer if is_wrapper(layer) else layer
        fresh = _fresh_copy(inner)
        pairs.append((layer, inner, fresh))
        return fresh

    plain = k3.models.clone_model(model, clone_function=unwrap)
    for layer, inner, fresh in pairs:
        values = [w.numpy() for w in inner.weights]
        if is_wrapper(layer):
            replaced = project(layer)
            by_id = {id(latent): attr for (attr, _), (latent, _, _) in zip(layer.quantize_config.attributes,
                                                                              layer._weight_vars)}  # fmt: skip
            values = [replaced[by_id[id(w)]] if id(w) in by_id else v for w, v in zip(inner.weights, values)]
        if values:
            fresh.set_weights(values)
    return plain


def load_model(filepath, *, compile: bool = True, **kwargs):
    """``keras.saving.load_model`` of a ``.keras`` file (the wrapper is registered as ``ptq_keras>TernaryWrapper``)."""
    return k3.saving.load_model(filepath, compile=compile, **kwargs)
