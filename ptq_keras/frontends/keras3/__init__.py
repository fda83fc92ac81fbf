"""The Keras 3 frontend (TensorFlow or JAX backend): :mod:`ptq_keras.frontends.keras3.layers`."""
