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
    from ..compat import is_keras3

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
