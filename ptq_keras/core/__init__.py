"""The method itself, independent of any Keras frontend: the ternary math (numpy reference and ``keras.ops``), the
straight-through estimators, the sparsity schedules, the options and their validation, the table of quantizable
layers and the quantizer of one kernel. Imports numpy and ``keras.ops`` only (TensorFlow where it runs)."""
