"""The two Keras frontends, ``tf_keras`` (tfmot wrappers) and ``keras3`` (ptq_keras' own wrapper layer), and what
the rest of the package asks of a layer without knowing which Keras made it.

A frontend is imported when it is first needed (a model of its Keras, or a saved file of it), so a Keras 3 user
never imports tf_keras or tfmot, and a tf_keras user never needs Keras 3's layers.
"""

from __future__ import annotations

import importlib
import sys

_FRONTENDS = ("ptq_keras.frontends.tf_keras.config", "ptq_keras.frontends.keras3.layers")


def of(model):
    """The frontend module of ``model``'s Keras (imported on first use). Each offers the same functions:
    ``ternarize(model, targets, options_of, partial)``, ``strip(model, project)``, ``load_model(path, ...)``,
    ``insert(model)`` (activation quantizers), ``fresh_copy(layer)``, ``is_graph_model(model)``,
    ``guard_save(model)``, and ``PARTIAL_KERNELS`` (whether a wrapper may ternarize some of a layer's kernels)."""
    from .detect import is_keras3

    return importlib.import_module(
        "ptq_keras.frontends.keras3.layers" if is_keras3(model) else "ptq_keras.frontends.tf_keras.wrap"
    )


def is_ternary_wrapper(layer) -> bool:
    """A layer made by ``ptq_keras.ternarize`` (either Keras): asked of the frontends already loaded (a wrapper
    exists only once its frontend is)."""
    return any(sys.modules[name].is_wrapper(layer) for name in _FRONTENDS if name in sys.modules)


def is_batchnorm(layer) -> bool:
    """A BatchNormalization layer (or subclass) of tf_keras or Keras 3."""
    return any(cls.__name__ == "BatchNormalization" and cls.__module__.split(".")[0] in ("keras", "tf_keras")
               for cls in type(layer).__mro__)  # fmt: skip


def fresh_copy(layer):
    """A new layer of ``layer``'s class and config (no weights yet)."""
    return layer.__class__.from_config(layer.get_config())


def clone_with_weights(clone_model, model, wrap=None):
    """``clone_model(model, clone_function=...)`` (the Keras's own) in which every layer is a fresh copy with its
    original's weights, returned as ``wrap(layer, fresh)`` where ``wrap`` is given (a wrapper around it)."""
    copies = []

    def clone(layer):
        fresh = fresh_copy(layer)
        copies.append((layer, fresh))
        return wrap(layer, fresh) if wrap is not None else fresh

    new = clone_model(model, clone_function=clone)
    for original, fresh in copies:
        if original.weights:
            fresh.set_weights(original.get_weights())
    return new


def student_of(model):
    """The ternarized model inside a ``ptq_keras.distill`` wrapper; any other model as it is."""
    return model.student if getattr(model, "_ptq_distiller", False) else model


def is_ternarized(model) -> bool:
    """True if ``model`` holds layers wrapped by ``ptq_keras.ternarize`` (also after save and load, and inside a
    ``ptq_keras.distill`` wrapper)."""
    return any(is_ternary_wrapper(layer) for layer in getattr(student_of(model), "layers", ()))


def ternary_kernels(wrapper) -> list[tuple]:
    """For a ternarized wrapper (either frontend): ``(attribute, latent kernel, mask, quantizer, variables)`` per
    kernel, as numpy arrays."""
    attrs = wrapper.quantize_config.attributes
    return [(attr, weight.numpy(), qvars["mask"].numpy(), quantizer, qvars)
            for (attr, _), (weight, quantizer, qvars) in zip(attrs, wrapper._weight_vars)]  # fmt: skip


def plain_copy(model):
    """The plain model of a ternarized ``model`` (the original architecture, each ternarized kernel exactly
    ternary: its quantizer's projection of the latent kernel on the support; other weights copied), with the
    activation quantizers linked to the int8 rounding (:func:`ptq_keras.frontends.activations.link`)."""
    from . import activations

    model = student_of(model)
    plain = of(model).strip(model, lambda wrapper: {
        attr: quantizer.project_numpy(latent, mask) for attr, latent, mask, quantizer, _ in ternary_kernels(wrapper)
    })  # fmt: skip
    activations.link(plain)
    return plain


def load(filepath, *, compile: bool = True, **kwargs):
    """A model saved by either frontend: a ``.keras`` file as a Keras 3 model, an ``.h5`` / SavedModel as a tf_keras
    one (with ptq_keras' objects known to the loader)."""
    if str(filepath).endswith(".keras"):
        from .keras3 import layers as frontend
    else:
        from .tf_keras import wrap as frontend
    return frontend.load_model(filepath, compile=compile, **kwargs)
