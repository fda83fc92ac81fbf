"""The one table of quantizable layers, keyed by Keras class name (the same names in tf_keras and Keras 3).

For each layer type: its kernels, as ``(attribute, channel_dims)`` (``channel_dims`` trailing kernel axes form the
output channel: DepthwiseConv2D's ``(kh, kw, in, mult)`` has ``in * mult`` output channels), and where Keras 3
differs (its DepthwiseConv2D kernel is ``kernel``; its Dense and Conv layers read ``_kernel`` in ``call``).
Only the Keras classes themselves match (exact type, not subclasses): a subclass may compute otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Kernel:
    attribute: str  # tf_keras attribute
    channel_dims: int
    keras3_attribute: str  # Keras 3 attribute
    keras3_reads: str  # what Keras 3's call reads (a property's backing variable)


KERNELS: dict[str, tuple[Kernel, ...]] = {
    "Dense": (Kernel("kernel", 1, "kernel", "_kernel"),),
    "Conv1D": (Kernel("kernel", 1, "kernel", "_kernel"),),
    "Conv2D": (Kernel("kernel", 1, "kernel", "_kernel"),),
    "DepthwiseConv2D": (Kernel("depthwise_kernel", 2, "kernel", "kernel"),),
    "SeparableConv2D": (
        Kernel("depthwise_kernel", 2, "depthwise_kernel", "depthwise_kernel"),
        Kernel("pointwise_kernel", 1, "pointwise_kernel", "pointwise_kernel"),
    ),
}
NAMES = tuple(KERNELS)
# For messages: "Dense, Conv1D, Conv2D, DepthwiseConv2D and SeparableConv2D"
NAMES_TEXT = ", ".join(NAMES[:-1]) + " and " + NAMES[-1]


def is_keras3_class(cls) -> bool:
    """A Keras 3 class (module ``keras.*``) rather than a tf_keras one (``tf_keras.*``)."""
    return cls.__module__.split(".")[0] == "keras"


def _kernels(layer) -> tuple[Kernel, ...]:
    cls = type(layer)
    if cls.__module__.split(".")[0] not in ("keras", "tf_keras"):
        return ()
    return KERNELS.get(cls.__name__, ())


def kernel_attributes(layer) -> tuple[tuple[str, int], ...]:
    """``((attribute, channel_dims), ...)`` of a quantizable tf_keras or Keras 3 layer, ``()`` otherwise."""
    keras3 = is_keras3_class(type(layer))
    return tuple((k.keras3_attribute if keras3 else k.attribute, k.channel_dims) for k in _kernels(layer))


def call_attribute(layer, attribute: str) -> str:
    """What a Keras 3 layer's ``call`` reads for its kernel ``attribute`` (``_kernel`` behind Dense's ``kernel``)."""
    return next(k.keras3_reads for k in _kernels(layer) if k.keras3_attribute == attribute)


def is_kernel_layer(layer, *, separable: bool = True) -> bool:
    """Whether ``layer`` is (a subclass of) a quantizable Keras layer class (either Keras API); ``separable=False``
    leaves SeparableConv2D out."""
    names = set(NAMES) - (set() if separable else {"SeparableConv2D"})
    return any(cls.__name__ in names for cls in type(layer).__mro__)
