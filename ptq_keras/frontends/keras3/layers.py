"""The Keras 3 side of ptq_keras: a wrapper layer that trains a Keras 3 layer's kernels as sparse ternary weights.

The wrapper runs the same :class:`~ptq_keras.core.quantizer.TernaryQuantizer` as the tf_keras path (same options,
schedules, STEs, support selection and scales: one implementation of the math), with its state (step, mask,
sparsity, freeze step, Taylor score) held as Keras 3 variables of the wrapper, so that it is saved in the
``.keras`` format and mirrored under ``tf.distribute``. It runs on Keras 3's TensorFlow and JAX backends, and
imports neither tf_keras nor tfmot.

Keras 3 is imported here only; ``ptq_keras`` imports this module when it first meets a Keras 3 model.
"""

from __future__ import annotations

from ...core import layers
from ...core.quantizer import KernelQuantizers
from .. import activations as act
from ..detect import keras3

k3 = keras3()


# A wrapper may ternarize some of a layer's kernels (a SeparableConv2D's pointwise kernel alone) and reload so.
PARTIAL_KERNELS = True


from .. import clone_with_weights, fresh_copy  # noqa: E402,F401 - fresh_copy: the frontend interface


def is_graph_model(model) -> bool:
    from keras.src.models.functional import Functional

    return isinstance(model, (k3.Sequential, Functional))


def guard_save(model) -> None:
    """Nothing to guard: the ``.keras`` format saves the wrapper."""


def kernel_attributes(layer) -> tuple[tuple[str, int], ...]:
    """``((attribute, channel_dims), ...)`` of a quantizable Keras 3 layer, ``()`` otherwise (exact type match)."""
    return layers.kernel_attributes(layer)


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
        self.quantize_config = KernelQuantizers(attributes, options)
        self._weight_vars = []

    def build(self, input_shape=None):
        if not self.layer.built:
            self.layer.build(input_shape)
        self._weight_vars = []
        quantizers = self.quantize_config._get_quantizers()
        for (attr, _), quantizer in zip(self.quantize_config.attributes, quantizers):
            latent = getattr(self.layer, attr)
            quantizer.compute_dtype = self.compute_dtype
            qvars = {
                role: self.add_weight(
                    name=spec.name, shape=spec.shape, dtype=spec.dtype, trainable=False,
                    initializer=k3.initializers.Constant(spec.initial), aggregation=spec.aggregation,
                    autocast=spec.autocast,
                )  # fmt: skip
                for role, spec in quantizer.variable_specs(tuple(latent.shape), attr).items()
            }
            self._weight_vars.append((latent, quantizer, qvars))
        self.built = True

    def call(self, inputs, training=None):
        storage = {attr: layers.call_attribute(self.layer, attr) for attr, _ in self.quantize_config.attributes}
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


def ternarize(model, targets: set, options_of, partial=None) -> object:
    """A Keras 3 copy of ``model`` whose ``targets`` layers are wrapped with the options ``options_of(name)``
    (``partial``: ``{name: attributes}`` for layers of which only those kernels are ternarized); the other layers
    are copies with the same weights."""

    def wrap(layer, fresh):
        if layer.name not in targets:
            return fresh
        attributes = (partial or {}).get(layer.name, kernel_attributes(layer))
        return TernaryWrapper(fresh, attributes, options_of(layer.name), name=f"ptq_{layer.name}")

    return clone_with_weights(k3.models.clone_model, model, wrap)


def strip(model, project):
    """A plain Keras 3 copy of a ternarized ``model``: every wrapper becomes its layer, whose kernels are
    ``project(wrapper)`` (``{attribute: exact ternary kernel}``); other weights are copied."""
    pairs = []

    def unwrap(layer):
        inner = layer.layer if is_wrapper(layer) else layer
        fresh = fresh_copy(inner)
        if act.is_activation_quantizer(inner):  # trained ranges: a plain fake-quant the converter reads
            fresh.static = bool(inner.calibrated.numpy() > 0.5)
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


@k3.saving.register_keras_serializable(package="ptq_keras")
class ActivationQuantizer(act.QuantizerOptions, k3.layers.Layer):
    """The Keras 3 twin of :class:`ptq_keras.activations.ActivationQuantizer` (the same variables, options and math:
    :func:`~ptq_keras.activations.range_update` and :func:`~ptq_keras.activations.fake_quant`), on any backend."""

    def build(self, input_shape):
        for name in ("min", "max", "calibrated"):  # the replicas' mean under tf.distribute
            setattr(self, name, self.add_weight(name=name, shape=(), initializer="zeros", trainable=False,
                                                aggregation="mean", autocast=False))  # fmt: skip
        self.built = True

    def call(self, inputs, training=False):
        if self.static:
            return self._static(inputs)
        if training:
            low, high = act.range_update(inputs, self.min, self.max, self.calibrated, self.ema_decay)
            self.min.assign(low)
            self.max.assign(high)
            self.calibrated.assign(1.0)
            return act.fake_quant(inputs, low, high, self.num_bits)
        return k3.ops.cond(
            self.calibrated > 0.5, lambda: act.fake_quant(inputs, self.min, self.max, self.num_bits), lambda: inputs
        )

    def compute_output_shape(self, input_shape):
        return input_shape


def insert_activation_quantizers(model, ema_decay: float = 0.99):
    """The Keras 3 :func:`ptq_keras.activations.insert`: a functional copy of ``model`` (fresh layers, same
    weights) with an :class:`ActivationQuantizer` on each input and where the int8 converter puts an int8 tensor
    (the same graph rules); each SeparableConv2D split in two. Returns the model and ``{separable: [halves]}``."""
    if isinstance(model, k3.Sequential):
        model = k3.Model(model.inputs, model.outputs, name=model.name)
    consumers = {layer.name: [] for layer in model.layers}
    for layer in model.layers:
        for node in layer._inbound_nodes:
            for tensor in node.input_tensors:
                consumers.setdefault(tensor._keras_history.operation.name, []).append(layer)
    for tensor in model.outputs:
        consumers[tensor._keras_history.operation.name].append(None)  # a model output: never fused

    inputs = [k3.Input(batch_shape=t.shape, dtype=t.dtype, name=t._keras_history.operation.name)
              for t in model.inputs]  # fmt: skip
    quantized = {id(t): ActivationQuantizer(ema_decay=ema_decay, name=f"{t.name}_act_quant")(t) for t in inputs}
    copies, original_of, aliases = [], {}, {}

    def clone(layer):
        fresh = act.split_separable(layer, k3.layers) if type(layer).__name__ == "SeparableConv2D" else None
        fresh = fresh or fresh_copy(layer)
        copies.append((layer, fresh))
        original_of[id(fresh)] = layer
        return fresh

    def call(fresh, *args, **kwargs):
        args = k3.tree.map_structure(lambda t: quantized.get(id(t), t), args)
        original = original_of[id(fresh)]
        if isinstance(fresh, tuple):
            depthwise, pointwise = fresh
            aliases[original.name] = [depthwise.name, pointwise.name]
            inner = ActivationQuantizer(ema_decay=ema_decay, name=f"{depthwise.name}_act_quant")
            out = pointwise(inner(depthwise(*args, **kwargs)))
        else:
            out = fresh(*args, **kwargs)
        if act._needs_quantizer(original, consumers[original.name]):
            out = ActivationQuantizer(ema_decay=ema_decay, name=f"{original.name}_act_quant")(out)
        return out

    outputs = model._run_through_graph(inputs, operation_fn=clone, call_fn=call)
    new = k3.Model(inputs, outputs, name=model.name)
    act.copy_weights(copies)
    return new, aliases


insert = insert_activation_quantizers
