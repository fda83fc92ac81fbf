"""ptq_keras: Pruning Ternary Quantization for tf_keras and Keras 3 models.

``import ptq_keras`` selects Keras 2 (tf_keras) for ``tf.keras`` before TensorFlow loads; build tf_keras models with
``ptq_keras.keras``. Keras 3 models (``import keras``; TensorFlow or JAX backend) are accepted as they are.
"""

from .compat import keras
from .core.schedules import ConstantSparsity, PolynomialDecay
from .distill import distill
from .fitting import decay_pruned, resolve_freeze
from .report import summary
from .wrap import (
    attach,
    custom_object_scope,
    custom_objects,
    is_ternarized,
    load_model,
    recalibrate_batchnorm,
    strip,
    ternarize,
)

__version__ = "0.1.0"

__all__ = [
    "keras",
    "ternarize",
    "strip",
    "summary",
    "is_ternarized",
    "load_model",
    "attach",
    "resolve_freeze",
    "decay_pruned",
    "distill",
    "custom_object_scope",
    "custom_objects",
    "recalibrate_batchnorm",
    "ConstantSparsity",
    "PolynomialDecay",
]
