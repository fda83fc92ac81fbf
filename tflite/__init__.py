"""Deployment half of ptq_keras: TensorFlow Lite export of ternary models (``ptq_keras.tflite``)."""
