"""PTQ training on real Fashion-MNIST lowers the loss and gives a usable exactly-ternary model."""

from __future__ import annotations

import numpy as np
from conftest import small_cnn

import ptq_keras
from ptq_keras import keras


def test_ptq_training_on_fashion_mnist_lowers_the_loss(fashion_mnist):
    x_train, y_train, x_test, y_test = fashion_mnist
    x, y = x_train[:4096], y_train[:4096]
    qmodel = ptq_keras.ternarize(small_cnn(), sparsity=0.7)
    qmodel.compile(
        keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True), ["accuracy"]
    )
    initial = qmodel.evaluate(x, y, verbose=0)[0]
    history = qmodel.fit(x, y, epochs=3, batch_size=128, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.7 * initial and losses[-1] < losses[0]
    plain = ptq_keras.strip(qmodel)
    ptq_keras.recalibrate_batchnorm(plain, x, steps=None, verbose=False)
    plain.compile(metrics=["accuracy"], loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    accuracy = plain.evaluate(x_test[:2000], y_test[:2000], verbose=0)[1]
    assert accuracy > 0.7  # 10 classes: chance is 0.1
    sparsity = np.mean([r.sparsity for r in ptq_keras.summary(plain, print_fn=None).layers if r.ternary])
    assert abs(sparsity - 0.7) < 0.05
