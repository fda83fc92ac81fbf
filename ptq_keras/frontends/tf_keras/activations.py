"""tf_keras's :class:`ActivationQuantizer` layer and the graph copies that insert it (``ternarize(...,
activations="int8")``) or split each SeparableConv2D in two; the graph rules and the int8 arithmetic they follow are
frontend-neutral (:mod:`ptq_keras.activations`, :mod:`ptq_keras.core.int8`)."""

from __future__ import annotations

from ...core.int8 import fake_quant, range_update
from .. import fresh_copy
from ..activations import QuantizerOptions, _needs_quantizer, copy_weights, split_separable
from . import keras, tf

L = keras.layers


@keras.utils.register_keras_serializable(package="ptq_keras")
class ActivationQuantizer(QuantizerOptions, L.Layer):
    """Fake-quantizes its input to 8 bits over a range learned in training.

    Variables (non-trainable): ``min``, ``max`` and ``calibrated`` (0 until the first training batch). In training
    the range follows ``ema_decay`` moving averages of the batch min / max (the first batch sets it); before the
    first training batch the layer passes its input through. ``static=True`` (what ``strip`` writes) always
    fake-quantizes, with no branch in the graph, which is what the TFLite converter reads.
    """

    def build(self, input_shape):
        # Under tf.distribute each replica sees its own part of the batch: the range is the replicas' mean.
        mean = tf.VariableAggregation.MEAN
        self.min = self.add_weight("min", shape=(), initializer="zeros", trainable=False, aggregation=mean)
        self.max = self.add_weight("max", shape=(), initializer="zeros", trainable=False, aggregation=mean)
        self.calibrated = self.add_weight(
            "calibrated", shape=(), initializer="zeros", trainable=False, aggregation=mean
        )
        super().build(input_shape)

    def _fake_quant(self, x):
        return fake_quant(x, self.min, self.max, self.num_bits)

    def call(self, inputs, training=None):
        x = tf.convert_to_tensor(inputs)
        if self.static:
            return self._static(x)
        if training is None:
            training = keras.backend.learning_phase()
        if isinstance(training, bool):  # fit passes a Python bool: no tf.cond (a replica merge inside a cond fails)
            return self._train(x) if training else self._inference(x)
        return tf.cond(tf.cast(training, tf.bool), lambda: self._train(x), lambda: self._inference(x))

    def _inference(self, x):
        return tf.cond(self.calibrated > 0.5, lambda: self._fake_quant(x), lambda: tf.identity(x))

    def _train(self, x):
        new_min, new_max = range_update(x, self.min, self.max, self.calibrated, self.ema_decay)
        with tf.control_dependencies(
            [self.min.assign(new_min), self.max.assign(new_max), self.calibrated.assign(1.0)]
        ):
            return self._fake_quant(tf.identity(x))


def _functional(model):
    if isinstance(model, keras.Sequential):
        return keras.Model(model.inputs, model.outputs, name=model.name)
    return model


def insert(model, *, ema_decay: float = 0.99) -> tuple[keras.Model, dict[str, list[str]]]:
    """A functional copy of ``model`` (same layers, fresh copies with the same weights) with an
    :class:`ActivationQuantizer` after the model inputs and at the end of every int8 block.

    Each SeparableConv2D becomes a DepthwiseConv2D and a 1x1 Conv2D (``<name>_depthwise``, ``<name>_pointwise``)
    with a quantizer between them, as in the converted file. Returns the model and ``{separable name: [the two
    new names]}``."""
    return _copy(model, ema_decay)


def split_separables(model) -> tuple[keras.Model, dict[str, list[str]]]:
    """A functional copy of ``model`` (fresh layers, the same weights) in which each SeparableConv2D is the two
    ops the converter makes of it, ``<name>_depthwise`` and ``<name>_pointwise`` (so that ``keep_float`` or
    ``overrides`` can name either half). Returns the model and ``{separable name: [the two new names]}``."""
    return _copy(model, None)


def _copy(model, ema_decay: float | None) -> tuple[keras.Model, dict[str, list[str]]]:
    """:func:`insert` (``ema_decay`` a number) or :func:`split_separables` (``None``: no quantizers)."""
    model = _functional(model)
    config = model.get_config()
    layers = {layer.name: layer for layer in model.layers}
    consumers: dict[str, list] = {name: [] for name in layers}
    for spec in config["layers"]:
        for node in spec["inbound_nodes"]:
            for inbound in node:
                consumers[inbound[0]].append(layers[spec["name"]])
    for name, *_ in config["output_layers"]:
        consumers[name].append(None)  # a model output: never fused

    tensors = {}
    copies = []
    aliases = {}

    def emit(layer, key, tensor):
        if ema_decay is not None and _needs_quantizer(layer, consumers[layer.name]):
            tensor = ActivationQuantizer(ema_decay=ema_decay, name=f"{layer.name}_act_quant")(tensor)
        tensors[key] = tensor

    inputs = []
    for name, _, _ in config["input_layers"]:
        layer = layers[name]
        spec = layer.get_config()
        inp = keras.Input(batch_shape=spec["batch_input_shape"], dtype=spec["dtype"], name=name)
        inputs.append(inp)
        emit(layer, (name, 0, 0), inp)
    for spec in config["layers"]:
        layer = layers[spec["name"]]
        if isinstance(layer, L.InputLayer):
            continue
        if isinstance(layer, L.SeparableConv2D):
            depthwise, pointwise = split_separable(layer, L)
            aliases[layer.name] = [depthwise.name, pointwise.name]

            def fresh(x, depthwise=depthwise, pointwise=pointwise):
                x = depthwise(x)
                if ema_decay is not None:
                    x = ActivationQuantizer(ema_decay=ema_decay, name=f"{depthwise.name}_act_quant")(x)
                return pointwise(x)

            copies.append((layer, (depthwise, pointwise)))
        else:
            fresh = fresh_copy(layer)
            copies.append((layer, fresh))
        for node_index, node in enumerate(spec["inbound_nodes"]):
            args = [tensors[(n, ni, ti)] for n, ni, ti, *_ in node]
            kwargs = node[0][3] if len(node[0]) > 3 and node[0][3] else {}
            out = fresh(args[0] if len(args) == 1 else args, **kwargs)
            outs = out if isinstance(out, (list, tuple)) else [out]
            for i, tensor in enumerate(outs):
                emit(layer, (layer.name, node_index, i), tensor)
    outputs = [tensors[(n, ni, ti)] for n, ni, ti in config["output_layers"]]
    new = keras.Model(inputs, outputs[0] if len(outputs) == 1 else outputs, name=model.name)
    copy_weights(copies)
    return new, aliases
