"""The tf_keras frontend's part of ``ternarize``, ``strip`` and ``load_model``: tfmot's ``quantize_apply`` with a
:class:`~ptq_keras.frontends.tf_keras.config.TernaryQuantizeConfig` per ternarized layer, and back."""

from __future__ import annotations

import types

from . import keras, tfmot
from .activations import ActivationQuantizer, insert, split_separables  # noqa: F401 - the frontend interface
from .config import TernaryQuantizeConfig, TernaryQuantizer, TernaryScheme, is_wrapper

_QuantizeWrapper = tfmot.quantization.keras.QuantizeWrapper
# A tfmot wrapper that ternarizes one of a layer's two kernels reloads from .h5 with its weights in another order:
# a SeparableConv2D is split into its two halves instead (``split_separables``).
PARTIAL_KERNELS = False


from .. import clone_with_weights, fresh_copy  # noqa: E402


def custom_objects() -> dict:
    """The objects needed to deserialize a ternarized model (besides tfmot's own)."""
    return {
        "TernaryQuantizeConfig": TernaryQuantizeConfig,
        "TernaryQuantizer": TernaryQuantizer,
        "ActivationQuantizer": ActivationQuantizer,
    }


def custom_object_scope():
    """Context manager for ``keras.models.load_model`` of a ternarized ``.h5`` / SavedModel."""
    return tfmot.quantization.keras.quantize_scope(custom_objects())


def is_graph_model(model) -> bool:
    return isinstance(model, keras.Sequential) or getattr(model, "_is_graph_network", False)


def ternarize(model, targets: set, options_of, partial: dict):
    """A copy of ``model`` whose ``targets`` are tfmot wrappers ternarizing their kernels (``partial``: ``{name:
    attributes}`` for layers of which only those kernels are ternarized) with the stored options
    ``options_of(name)``; the other layers are copies with the same weights."""
    from ...core.layers import kernel_attributes


    def annotate(layer, fresh):
        if layer.name not in targets:
            return fresh
        config = TernaryQuantizeConfig(partial.get(layer.name, kernel_attributes(layer)), options_of(layer.name))
        return tfmot.quantization.keras.quantize_annotate_layer(fresh, config)

    with custom_object_scope():
        annotated = clone_with_weights(keras.models.clone_model, model, annotate)
        return tfmot.quantization.keras.quantize_apply(
            annotated, scheme=TernaryScheme(), quantized_layer_name_prefix="ptq_"
        )


def strip(model, project):
    """A plain copy of a ternarized ``model``: every wrapper becomes its layer, whose kernels are
    ``project(wrapper)`` (``{attribute: exact ternary kernel}``); other weights are copied."""
    from .. import activations as act

    pairs = []

    def unwrap(layer):
        inner = layer.layer if isinstance(layer, _QuantizeWrapper) else layer
        fresh = fresh_copy(inner)
        if act.is_activation_quantizer(inner):
            # Trained ranges: a plain fake-quant the converter reads (no branch in the graph).
            fresh.static = bool(inner.calibrated.numpy() > 0.5)
        pairs.append((layer, fresh))
        return fresh

    with custom_object_scope():
        plain = keras.models.clone_model(model, clone_function=unwrap)
    for layer, fresh in pairs:
        if not isinstance(layer, _QuantizeWrapper):
            fresh.set_weights(layer.get_weights())
            continue
        replaced = project(layer) if is_wrapper(layer) else {}
        fresh.set_weights([replaced.get(_attribute(v)) if _attribute(v) in replaced
                           else _inner_variable(layer, _attribute(v)).numpy() for v in fresh.weights])  # fmt: skip
    return plain


def _attribute(variable) -> str:
    return variable.name.split("/")[-1].split(":")[0]


def _inner_variable(wrapper, attr: str):
    for variable in wrapper.weights:
        if _attribute(variable) == attr:
            return variable
    raise KeyError(f"Layer {wrapper.name!r} has no variable named {attr!r}.")


def load_model(filepath, *, compile: bool = True, **kwargs):
    """``keras.models.load_model`` of a ternarized ``.h5`` / SavedModel inside :func:`custom_object_scope`."""
    with custom_object_scope():
        return keras.models.load_model(filepath, compile=compile, **kwargs)


def guard_save(model) -> None:
    """Make ``model.save("x.keras")`` fail with an explanation (the Keras v3 format cannot hold tfmot wrappers),
    and save SavedModels of models with a ternarized SeparableConv2D without traces."""
    original_save = model.save

    def save(self, filepath, *args, **kwargs):
        if str(filepath).endswith(".keras") or kwargs.get("save_format") == "keras":
            raise ValueError(
                f"Cannot save a ternarized model as {filepath!r}: the .keras format does not round-trip tfmot "
                "quantization wrappers. Save as .h5 (model.save('model.h5')) or as a SavedModel directory "
                "(model.save('model_dir')), and load it inside ptq_keras.custom_object_scope(); or save "
                "ptq_keras.strip(model), a plain model, in any format."
            )
        is_h5 = str(filepath).endswith((".h5", ".hdf5")) or kwargs.get("save_format") == "h5"
        if not is_h5 and needs_untraced:
            # TF cannot trace a SeparableConv2D whose two kernels are replaced by the wrapper; the layer configs
            # are enough to load it inside ptq_keras.custom_object_scope().
            kwargs.setdefault("save_traces", False)
        return original_save(filepath, *args, **kwargs)

    needs_untraced = any(
        is_wrapper(layer) and isinstance(layer.layer, keras.layers.SeparableConv2D) for layer in model.layers
    )
    model.save = types.MethodType(save, model)
