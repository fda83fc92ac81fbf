"""ternarize(..., activations="int8"): fake-quant where the int8 converter quantizes, ranges carried to the file."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import residual_dw, small_cnn

import ptq_keras
from ptq_keras import keras, models
from ptq_keras.activations import ActivationQuantizer


def _compile(model, lr=2e-3):
    model.compile(keras.optimizers.Adam(lr), keras.losses.SparseCategoricalCrossentropy(from_logits=True), ["accuracy"])


def _quantized_after(model):
    """Names of the layers an ActivationQuantizer follows, in graph order (wrappers by their inner name)."""
    layers = {layer.name: layer for layer in model.layers}
    out = []
    for spec in model.get_config()["layers"]:
        if spec["class_name"].endswith("ActivationQuantizer"):
            source = layers[spec["inbound_nodes"][0][0][0]]
            out.append(getattr(source, "layer", source).name)
    return out


def test_quantizers_sit_where_the_int8_converter_quantizes():
    q = ptq_keras.ternarize(small_cnn(), sparsity=0.5, activations="int8")
    # conv+bn+relu fuse into one op; pooling and flatten keep their input's scale; Dense(relu) is one op
    assert _quantized_after(q) == [q.layers[0].name, "relu1", "relu2", "fc", "logits"]
    r = ptq_keras.ternarize(residual_dw(), sparsity=0.5, activations="int8")
    # the stem feeds two consumers, pw feeds the add (not fusable), dw+bn+relu fuse; the separable conv is split
    # into its two ops with an int8 tensor between them, as in the converted file
    assert set(_quantized_after(r)) == {
        r.layers[0].name, "stem", "dw_relu", "pw", "add", "sep_depthwise", "sep_pointwise", "gap", "head"
    }
    assert "sep" not in [layer.name for layer in ptq_keras.strip(r).layers]
    assert "dw" not in _quantized_after(r) and "dw_bn" not in _quantized_after(r)
    plain = ptq_keras.ternarize(small_cnn(), sparsity=0.5)
    assert _quantized_after(plain) == []  # activations=None: no fake-quant anywhere


def test_split_separables_computes_the_same_with_the_two_halves_and_no_quantizer():
    from ptq_keras import activations

    model = residual_dw()
    x = np.random.default_rng(0).uniform(0, 1, (4, *model.inputs[0].shape[1:])).astype(np.float32)
    split, aliases = activations.split_separables(model)
    assert aliases == {"sep": ["sep_depthwise", "sep_pointwise"]} and _quantized_after(split) == []
    names = [layer.name for layer in split.layers]
    assert "sep" not in names and {"sep_depthwise", "sep_pointwise"} <= set(names)
    np.testing.assert_allclose(split(x).numpy(), model(x).numpy(), rtol=1e-4, atol=1e-5)


def test_ranges_are_learned_then_static_after_strip_and_reestimated_with_batchnorm(fashion_mnist):
    x_train, y_train, _, _ = fashion_mnist
    x, y = x_train[:512], y_train[:512]
    q = ptq_keras.ternarize(small_cnn(), sparsity=0.5, activations="int8")
    before = q.predict(x[:8], verbose=0)  # not calibrated yet: the quantizers pass through
    np.testing.assert_allclose(before, ptq_keras.ternarize(small_cnn(), sparsity=0.5).predict(x[:8], verbose=0),
                               atol=1e-5)
    _compile(q)
    q.fit(x, y, epochs=1, batch_size=64, verbose=0)
    quantizers = [layer for layer in q.layers if isinstance(layer, ActivationQuantizer)]
    first = quantizers[0]
    assert float(first.min.numpy()) == pytest.approx(0.0) and 0.9 < float(first.max.numpy()) <= 1.0  # x in [0, 1]
    outputs = q.predict(x[:64], verbose=0)
    last = quantizers[-1]
    lo, hi = float(last.min.numpy()), float(last.max.numpy())
    step = (hi - lo) / 255
    assert np.all(outputs >= lo - step) and np.all(outputs <= hi + step)
    grid = (outputs - outputs.min()) / step
    np.testing.assert_allclose(grid, np.round(grid), atol=1e-2)  # outputs on the 8-bit grid
    plain = ptq_keras.strip(q)
    assert all(layer.static for layer in plain.layers if isinstance(layer, ActivationQuantizer))
    with ptq_keras.activations.exporting():  # what the converter reads: the trained fake quantization, unchanged
        np.testing.assert_allclose(plain(x[:64]).numpy(), outputs, atol=1e-4)
    # Outside exporting the stripped model rounds as the int8 kernels do (link_requantization): within one LSB.
    np.testing.assert_allclose(plain(x[:64]).numpy(), outputs, atol=step * 1.001)
    ranges = [float(layer.max.numpy()) for layer in plain.layers if isinstance(layer, ActivationQuantizer)]
    ptq_keras.recalibrate_batchnorm(plain, x, steps=4, verbose=False)
    after = [float(layer.max.numpy()) for layer in plain.layers if isinstance(layer, ActivationQuantizer)]
    assert after != ranges and all(layer.static for layer in plain.layers if isinstance(layer, ActivationQuantizer))


def test_activations_option_saves_loads_and_is_validated(tmp_path):
    q = ptq_keras.ternarize(small_cnn(), sparsity=0.5, activations="int8")
    x = np.random.default_rng(0).random((32, 28, 28, 1)).astype("float32")
    _compile(q)
    q.fit(x, np.zeros(32, int), epochs=1, batch_size=16, verbose=0)
    path = str(tmp_path / "q.h5")
    q.save(path)
    again = ptq_keras.load_model(path)
    np.testing.assert_allclose(again.predict(x, verbose=0), q.predict(x, verbose=0), atol=1e-5)
    with pytest.raises(ValueError, match="activations='int4'"):
        ptq_keras.ternarize(small_cnn(), activations="int4")


@pytest.mark.slow
@pytest.mark.parametrize("builder", ["ds_cnn", "ds_resnet"])
def test_int8_file_agrees_with_the_trained_model(builder, fashion_mnist, tmp_path):
    """The int8 (and micro) file computes what the Keras model computes."""
    from ptq_keras import tflite

    x_train, y_train, x_test, _ = fashion_mnist
    x, y = x_train[:8192], y_train[:8192]
    keras.utils.set_random_seed(0)
    if builder == "ds_cnn":
        model = models.ds_cnn((28, 28, 1), 10, filters=32, blocks=2)
    else:
        model = models.ds_resnet((28, 28, 1), 10, filters=24)  # residual adds, a separable conv
    _compile(model)
    model.fit(x, y, epochs=2, batch_size=128, verbose=0)
    q = ptq_keras.ternarize(model, sparsity=0.7, activations="int8")
    _compile(q, 1e-3)
    q.fit(x, y, epochs=2, batch_size=128, verbose=0)
    plain = ptq_keras.strip(q, batchnorm_data=x[:2048])
    result = tflite.export(plain, x[:256], str(tmp_path), targets=("int8", "micro"))
    for target in ("int8", "micro"):
        # The stripped model rounds as LiteRT's int8 kernels do (link_requantization, link_means): measured 100%
        # top-1 agreement, max 1 LSB, mean 0.001 LSB on both models (2000 test images); without that emulation these
        # 2 + 2-epoch models, with many near-ties between classes, agreed on 96.7-99.6% (max 1-4 LSB).
        # benchmarks/activations.py measures trained models over the whole test set.
        parity = tflite.verify(plain, result.files[target], x_test[:2000], num_samples=2000, min_top1=0.995)
        assert parity.ok, str(parity)
        assert parity.steps[0].max_lsb <= 1.0 and parity.steps[0].mean_lsb <= 0.02, str(parity)


def _pooling_model(flavor, size, input_range, output_range, keepdims):
    """A static input quantizer, global average pooling, a static output quantizer: the int8 MEAN alone."""
    if flavor == "tf_keras":
        k, quantizer = keras, ActivationQuantizer
    else:
        import keras as k

        from ptq_keras.frontends.keras3.layers import ActivationQuantizer as quantizer
    inp = k.Input((size, size, 16))
    first, last = quantizer(static=True, name="q_in"), quantizer(static=True, name="q_out")
    out = last(k.layers.GlobalAveragePooling2D(keepdims=keepdims, name="gap")(first(inp)))
    model = k.Model(inp, out)
    first.set_weights([np.float32(input_range[0]), np.float32(input_range[1]), np.float32(1)])
    last.set_weights([np.float32(output_range[0]), np.float32(output_range[1]), np.float32(1)])
    return model, first, last


@pytest.mark.parametrize("flavor", ["tf_keras", "keras3"])
@pytest.mark.parametrize(
    "size, input_range, output_range, keepdims",
    [(7, (0.0, 5.3), (0.0, 2.1), False), (7, (0.0, 5.3), (0.0, 2.1), True), (6, (-1.0, 4.3), (-0.3, 1.1), False),
     (3, (0.0, 5.3), (0.0, 0.4), False), (14, (0.0, 6.0), (0.0, 3.7), False)],
)  # fmt: skip
def test_int8_mean_rounding_is_what_the_stripped_model_computes(flavor, size, input_range, output_range, keepdims,
                                                                tmp_path):  # fmt: skip
    """TFLite's int8 MEAN keeps few fraction bits before its last rounding (about 6% of its outputs 1 LSB above the
    rounded mean); the stripped model computes exactly that, on LiteRT's and TFLM's files alike."""
    import importlib

    from tflite_micro.python.tflite_micro import runtime as tflm

    from ptq_keras import activations as act

    convert = importlib.import_module("ptq_keras.tflite.convert")
    model, first, last = _pooling_model(flavor, size, input_range, output_range, keepdims)
    rng = np.random.default_rng(size)
    x = (rng.random((256, size, size, 16)) * rng.random((256, 1, 1, 16)) * (input_range[1] - input_range[0])
         + input_range[0]).astype("float32")  # fmt: skip
    unlinked = model(x).numpy().reshape(len(x), -1)
    assert act.link_means(model) == 1 and first.mean_input is None and last.mean_input["count"] == size * size
    buf = convert.int8_tflite(model, x[:64])
    with act.exporting():  # what the converter saw: the plain fake quantization
        np.testing.assert_array_equal(model(x).numpy().reshape(len(x), -1), unlinked)
    linked = model(x).numpy().reshape(len(x), -1)

    from ptq_keras.compat import tf

    reference = tf.lite.experimental.OpResolverType.BUILTIN_REF
    lite = tf.lite.Interpreter(model_content=buf, experimental_op_resolver_type=reference)
    lite.allocate_tensors()
    assert [op["op_name"] for op in lite._get_ops_details()] == ["MEAN"]  # no emulation ops in the file
    (scale_in, zero_in), (scale_out, zero_out) = (lite.get_input_details()[0]["quantization"],
                                                  lite.get_output_details()[0]["quantization"])  # fmt: skip
    assert scale_out == pytest.approx(last.mean_input["output_scale"], rel=1e-7)
    xq = np.clip(np.round(x / scale_in) + zero_in, -128, 127).astype(np.int8)
    x_grid = (xq.astype("float32") - zero_in) * scale_in  # the file's input, as the model sees it
    expected = model(x_grid).numpy().reshape(len(x), -1)
    with act.exporting():
        plain = model(x_grid).numpy().reshape(len(x), -1)
    micro = tflm.Interpreter.from_bytes(buf)
    files = []
    for i in range(len(x)):
        lite.set_tensor(lite.get_input_details()[0]["index"], xq[i : i + 1])
        lite.invoke()
        micro.set_input(xq[i : i + 1], 0)
        micro.invoke()
        files.append(lite.get_tensor(lite.get_output_details()[0]["index"]).reshape(-1))
        np.testing.assert_array_equal(micro.get_output(0).reshape(-1), files[-1])
    got = (np.asarray(files, dtype="float32") - zero_out) * scale_out
    np.testing.assert_allclose(got, expected, atol=scale_out * 1e-3)  # every output, to the LSB
    flips = np.abs(got - plain) > scale_out / 2  # the float mean, then fake quantization
    assert np.abs(got - plain).max() <= scale_out * 1.001
    if last.mean_input["shift"] < 0:  # a right shift after the high multiply: two roundings
        assert flips.any(), "the plain fake quantization already matched: the emulation is not exercised"
    assert np.abs(linked - unlinked).max() <= scale_out * 1.001
    path = str(tmp_path / ("m.h5" if flavor == "tf_keras" else "m.keras"))
    model.save(path)
    again = ptq_keras.load_model(path) if flavor == "tf_keras" else __import__("keras").saving.load_model(path)
    np.testing.assert_array_equal(again(x_grid).numpy().reshape(len(x), -1), expected)


def test_stripped_model_rounds_as_the_int8_convolutions_and_adds(tmp_path):
    """The int8 CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED and ADD requantize their int32 accumulators with a
    fixed-point multiply and two roundings; the stripped model computes that rounding (link_requantization), so its
    outputs are the file's, where plain fake quantization after the float op is off by an LSB here and there."""
    import importlib

    from tflite_micro.python.tflite_micro import runtime as tflm

    from ptq_keras import activations as act
    from ptq_keras.compat import tf

    convert = importlib.import_module("ptq_keras.tflite.convert")
    rng = np.random.default_rng(3)
    x = rng.random((512, 16, 16, 3)).astype("float32")
    q = ptq_keras.ternarize(residual_dw(), sparsity=0.5, activations="int8")
    _compile(q)
    q.fit(x[:256], rng.integers(0, 10, 256), epochs=1, batch_size=32, verbose=0)
    plain = ptq_keras.strip(q)
    linked = sorted(layer.name for layer in plain.layers if getattr(layer, "requant", None))
    assert linked == ["add_act_quant", "dw_relu_act_quant", "head_act_quant", "pw_act_quant", "sep_act_quant",
                      "sep_depthwise_act_quant", "stem_act_quant"]  # fmt: skip
    assert [layer.name for layer in plain.layers if getattr(layer, "mean_input", None)] == ["gap_act_quant"]
    buf = convert.int8_tflite(plain, x[:64])
    reference = tf.lite.experimental.OpResolverType.BUILTIN_REF
    lite = tf.lite.Interpreter(model_content=buf, experimental_op_resolver_type=reference)
    lite.allocate_tensors()
    (scale_in, zero_in), (scale_out, zero_out) = (lite.get_input_details()[0]["quantization"],
                                                  lite.get_output_details()[0]["quantization"])  # fmt: skip
    xq = np.clip(np.round(x / scale_in) + zero_in, -128, 127).astype(np.int8)
    x_grid = (xq.astype("float32") - zero_in) * scale_in  # the file's input, as the model sees it
    micro = tflm.Interpreter.from_bytes(buf)
    files = []
    for i in range(len(x)):
        lite.set_tensor(lite.get_input_details()[0]["index"], xq[i : i + 1])
        lite.invoke()
        files.append(lite.get_tensor(lite.get_output_details()[0]["index"]).reshape(-1))
        if i < 64:
            micro.set_input(xq[i : i + 1], 0)
            micro.invoke()
            # TFLM's kernels agree with LiteRT's reference kernels to an LSB on this model (verify's tolerance).
            assert np.abs(micro.get_output(0).reshape(-1).astype(int) - files[-1]).max() <= 1
    got = np.asarray(files, dtype="float32") - zero_out
    expected = plain(x_grid).numpy() / scale_out  # (eager calls: predict would reuse its first trace)
    with act.exporting():
        unlinked = plain(x_grid).numpy() / scale_out
    off = np.abs(got - expected) > 0.5
    off_plain = np.abs(got - unlinked) > 0.5
    assert np.abs(got - expected).max() <= 1.001 and off.mean() <= 0.001, (off.mean(), off_plain.mean())
    assert off_plain.mean() >= 0.01, "plain fake quantization already matched: the emulation is not exercised"
    path = str(tmp_path / "m.h5")
    plain.save(path)
    again = ptq_keras.load_model(path)  # the requantization parameters are saved with the quantizers
    np.testing.assert_array_equal(again(x_grid).numpy(), plain(x_grid).numpy())


def test_compact_fixed_point_multiply_is_the_kernels_integer_steps():
    """The stripped model's few-op form of MultiplyByQuantizedMultiplier equals the kernels' steps (nudge,
    truncating division, mask and threshold), ties and negative values included."""
    from ptq_keras.activations import _multiply_by_quantized_multiplier as compact
    from ptq_keras.activations import _multiply_by_quantized_multiplier_reference as steps

    rng = np.random.default_rng(0)
    ties = np.arange(-4096, 4096, dtype=np.float64)
    for shift, multiplier in [(0, 2**30), (-1, 2**30), (-3, 3 * 2**28), (2, 2**31 - 1), (-9, 1 << 30)]:
        np.testing.assert_array_equal(np.asarray(compact(ties, multiplier, shift)),
                                      np.asarray(steps(ties, multiplier, shift)))  # fmt: skip
    for _ in range(20):
        x = rng.integers(-(2**22), 2**22, (500, 4)).astype(np.float64)
        multipliers, shifts = rng.integers(2**30, 2**31, 4), rng.integers(-20, 3, 4)  # one per channel
        np.testing.assert_array_equal(np.asarray(compact(x, multipliers, shifts)),
                                      np.asarray(steps(x, multipliers, shifts)))  # fmt: skip


def test_keras3_stripped_model_rounds_as_the_int8_kernels(tmp_path):
    """The same emulation on a Keras 3 residual depthwise model (its own layer classes and graph): every int8 op
    output linked, and the int8 file agrees with the stripped model to the LSB."""
    import keras as k3

    from ptq_keras import tflite

    L = k3.layers
    k3.utils.set_random_seed(0)
    inp = k3.Input((16, 16, 3))
    x = L.Conv2D(8, 3, padding="same", activation="relu", name="stem")(inp)
    y = L.ReLU(name="dw_relu")(L.BatchNormalization(name="dw_bn")(L.DepthwiseConv2D(3, padding="same", name="dw")(x)))
    x = L.Add(name="add")([x, L.Conv2D(8, 1, name="pw")(y)])
    x = L.SeparableConv2D(12, 3, padding="same", depth_multiplier=2, name="sep")(x)
    model = k3.Model(inp, L.Dense(10, name="head")(L.GlobalAveragePooling2D(name="gap")(x)))
    q = ptq_keras.ternarize(model, sparsity=0.5, activations="int8")
    q.compile(k3.optimizers.Adam(2e-3), k3.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x = rng.random((256, 16, 16, 3)).astype("float32")
    q.fit(x, rng.integers(0, 10, 256), epochs=1, batch_size=32, verbose=0)
    plain = ptq_keras.strip(q)
    assert sorted(layer.name for layer in plain.layers if getattr(layer, "requant", None)) == [
        "add_act_quant", "dw_relu_act_quant", "head_act_quant", "pw_act_quant", "sep_act_quant",
        "sep_depthwise_act_quant", "stem_act_quant"]  # fmt: skip
    result = tflite.export(plain, x[:64], tmp_path, targets=("int8",), measure=False)
    parity = tflite.verify(plain, result.files["int8"], x, num_samples=256, min_top1=0.99)
    assert parity.ok and parity.steps[0].max_lsb <= 1.0 and parity.steps[0].mean_lsb <= 0.005, str(parity)
