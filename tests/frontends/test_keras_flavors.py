"""The same behaviour on both Keras APIs: tf_keras (Keras 2) and Keras 3 (TensorFlow backend).

Every test here runs once per flavor: ternarize, plain ``fit`` with the defaults, exact sparsity, ``strip`` to
exactly ternary kernels, ``summary``, ``recalibrate_batchnorm``, save/load (``.h5`` / ``.keras``) with training
going on, the related methods' options, and export to ``micro`` bit-exact with ``int8`` on TFLM. The Keras 3 only
tests at the end check that both flavors give identical .tflite weights and that what Keras 3 lacks is refused.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

import ptq_keras
from ptq_keras import tflite
from ptq_keras.tflite import flatbuffer

FLAVORS = ("tf_keras", "keras3")


def _api(flavor):
    if flavor == "tf_keras":
        return ptq_keras.keras
    import keras

    return keras


def build(flavor, seed=0):
    """Conv-BN-ReLU, DepthwiseConv-BN-ReLU, SeparableConv, Conv1D over rows, pooling, Dense: every ternarized
    layer type, one model."""
    k = _api(flavor)
    k.utils.set_random_seed(seed)
    inp = k.Input((12, 12, 1), name="image")
    x = k.layers.Conv2D(8, 3, padding="same", use_bias=False, name="conv")(inp)
    x = k.layers.BatchNormalization(name="bn1")(x)
    x = k.layers.ReLU(name="relu1")(x)
    x = k.layers.DepthwiseConv2D(3, name="dw")(x)
    x = k.layers.BatchNormalization(name="bn2")(x)
    x = k.layers.ReLU(name="relu2")(x)
    x = k.layers.SeparableConv2D(16, 3, activation="relu", name="sep")(x)
    x = k.layers.Reshape((8, 8 * 16), name="rows")(x)
    x = k.layers.Conv1D(8, 3, activation="relu", name="conv1d")(x)
    x = k.layers.GlobalAveragePooling1D(name="gap")(x)
    out = k.layers.Dense(4, name="logits")(x)
    return k.Model(inp, out, name="flavors")


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.random((256, 12, 12, 1), dtype=np.float32)
    y = (x[:, :6, :6, 0].mean(axis=(1, 2)) > x[:, 6:, 6:, 0].mean(axis=(1, 2))).astype("int64") + 2 * (
        x[:, :6, 6:, 0].mean(axis=(1, 2)) > 0.5
    ).astype("int64")
    return x, y


def _fit(qmodel, flavor, data, epochs=2, **kwargs):
    k = _api(flavor)
    qmodel.compile(k.optimizers.Adam(1e-2), k.losses.SparseCategoricalCrossentropy(from_logits=True))
    return qmodel.fit(data[0], data[1], epochs=epochs, batch_size=32, verbose=0, **kwargs)


def _states(qmodel):
    from ptq_keras.fitting import quantizer_states

    return list(quantizer_states(qmodel))


def _latents(qmodel):
    from ptq_keras.wrap import ternary_kernels

    return [(layer.layer.name, latent, mask) for layer in qmodel.layers if ptq_keras.frontends.is_ternary_wrapper(layer)
            for _, latent, mask, _, _ in ternary_kernels(layer)]  # fmt: skip


def _target(quantizer, shape, sparsity=0.7) -> float:
    """The sparsity a kernel trains to: the target, capped by ``min_kept`` for a small fan-in."""
    return min(sparsity, quantizer.max_sparsity(shape))


def _layer_targets(qmodel) -> dict:
    """{layer name: (zeros it should hold after strip, mean of its kernels' targets as ``summary`` reports it)}."""
    kernels = {}
    for name, quantizer, qvars in _states(qmodel):
        size = qvars["mask"].numpy().size
        kernels.setdefault(name, []).append((_target(quantizer, qvars["mask"].shape), size))
    return {name: (sum(t * n for t, n in ks) / sum(n for _, n in ks), float(np.mean([t for t, _ in ks])))
            for name, ks in kernels.items()}  # fmt: skip


def _assert_ternary(plain, flavor):
    from ptq_keras.core.layers import kernel_attributes

    kernels = 0
    for layer in plain.layers:
        for attr, dims in kernel_attributes(layer):
            kernel = getattr(layer, attr).numpy()
            columns = kernel.reshape(-1, int(np.prod(kernel.shape[-dims:])))
            for c in range(columns.shape[1]):
                assert len(np.unique(np.abs(columns[:, c][columns[:, c] != 0]))) <= 1, (flavor, layer.name, attr)
            kernels += 1
    assert kernels == 6  # conv, dw, sep (two kernels), conv1d, logits


@pytest.fixture(scope="module", params=FLAVORS)
def trained(request, data):
    """(flavor, ternarized model after plain fit with the defaults)."""
    flavor = request.param
    qmodel = ptq_keras.ternarize(build(flavor), sparsity=0.7)
    _fit(qmodel, flavor, data)
    return flavor, qmodel


def test_ternarize_returns_the_same_flavor_with_every_layer_type_wrapped(trained):
    flavor, qmodel = trained
    from ptq_keras.compat import is_keras3

    assert is_keras3(qmodel) == (flavor == "keras3")
    assert ptq_keras.is_ternarized(qmodel)
    names = {name for name, _, _ in _states(qmodel)}
    assert names == {"conv", "dw", "sep", "conv1d", "logits"}


def test_fit_with_defaults_reaches_exact_sparsity_and_freezes_halfway(trained):
    flavor, qmodel = trained
    steps = 2 * 8  # 2 epochs of 256 / 32
    capped = set()
    for name, quantizer, qvars in _states(qmodel):
        assert int(qvars["step"].numpy()) == steps, name
        assert int(qvars["freeze_step"].numpy()) == steps // 2, name  # freeze_at=0.5 resolved by fit
        mask = qvars["mask"].numpy()
        target = _target(quantizer, mask.shape)
        capped |= {name} if target < 0.7 else set()
        keep = np.sum(mask)
        assert abs(keep / mask.size - (1 - target)) < 0.02 + 1.0 / mask.size, (flavor, name, keep, mask.size)
    assert capped == {"conv", "dw", "sep", "logits"}  # fan-in 9 (3x3 on one channel, depthwise) or 8: min_kept


def test_strip_gives_exact_ternary_kernels_computing_what_the_trained_model_computes(trained, data):
    flavor, qmodel = trained
    plain = ptq_keras.strip(qmodel)
    assert not ptq_keras.is_ternarized(plain)
    assert type(plain).__module__.split(".")[0] == type(qmodel).__module__.split(".")[0]
    _assert_ternary(plain, flavor)
    x = data[0][:32]
    np.testing.assert_allclose(plain.predict(x, verbose=0), qmodel.predict(x, verbose=0), rtol=1e-4, atol=1e-4)
    report = ptq_keras.summary(plain, print_fn=None)
    ternary = [row for row in report.layers if row.ternary]
    assert len(ternary) == 5
    targets = _layer_targets(qmodel)
    for row in ternary:
        assert row.sparsity == pytest.approx(targets[row.name][0], abs=0.02), (row.name, row.sparsity)
    trained_report = ptq_keras.summary(qmodel, print_fn=None)
    assert {r.name: r.target_sparsity for r in trained_report.layers if r.ternary} == pytest.approx(
        {name: mean for name, (_, mean) in targets.items()}
    )


def test_recalibrate_batchnorm_rewrites_the_moving_statistics(trained, data):
    flavor, qmodel = trained
    plain = ptq_keras.strip(qmodel)
    bn = plain.get_layer("bn2")
    before = bn.moving_variance.numpy().copy()
    ptq_keras.recalibrate_batchnorm(plain, data[0], steps=2, verbose=False)
    after = bn.moving_variance.numpy()
    assert not np.allclose(before, after)
    # the new statistics are the batch statistics of the stripped model's own activations
    k = _api(flavor)
    probe = k.Model(plain.inputs, plain.get_layer("dw").output)
    act = np.asarray(probe(data[0][:128], training=False))
    np.testing.assert_allclose(after, act.reshape(-1, act.shape[-1]).var(axis=0), rtol=0.05)


def test_save_load_keeps_masks_and_training_goes_on(trained, data, tmp_path):
    flavor, qmodel = trained
    path = str(tmp_path / ("q.keras" if flavor == "keras3" else "q.h5"))
    qmodel.save(path)
    loaded = ptq_keras.load_model(path)
    assert ptq_keras.is_ternarized(loaded)
    x = data[0][:16]
    np.testing.assert_allclose(loaded.predict(x, verbose=0), qmodel.predict(x, verbose=0), rtol=1e-5, atol=1e-5)
    before = [(v["mask"].numpy(), int(v["step"].numpy())) for _, _, v in _states(loaded)]
    _fit(loaded, flavor, data, epochs=1)
    for (mask, step), (_, _, qvars) in zip(before, _states(loaded)):
        assert int(qvars["step"].numpy()) == step + 8
        np.testing.assert_array_equal(qvars["mask"].numpy(), mask)  # frozen since step 8: the support stays


OPTIONS = {
    # the related methods and the selection options, two sets that together touch each of them
    "taylor_channels": {"criterion": "taylor", "channel_sparsity": 0.25, "selection": "channel"},
    "greg_srfp_ramp": {
        "regularizer": "greg",
        "soft_decay": 0.5,
        "ste": "identity",
        "sparsity": "ramp",
        "granularity": "tensor",
    },  # fmt: skip
}


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("case", sorted(OPTIONS))
def test_options_train_to_exact_ternary_kernels(flavor, case, data):
    options = dict(OPTIONS[case])
    if options.get("sparsity") == "ramp":
        options["sparsity"] = ptq_keras.PolynomialDecay(0.0, 0.7, 0, 8, frequency=1)
    qmodel = ptq_keras.ternarize(build(flavor), overrides={"logits": {"channel_sparsity": 0.0}} if (
        "channel_sparsity" in options) else None, **options)  # fmt: skip
    _fit(qmodel, flavor, data, epochs=2)
    states = _states(qmodel)
    if "criterion" in options:
        scores = [v["score"].numpy() for _, _, v in states]
        assert all(np.all(s >= 0) and np.any(s > 0) for s in scores)
    if "channel_sparsity" in options:
        conv = next(v for name, _, v in states if name == "conv")
        dead = np.sum(conv["mask"].numpy().reshape(-1, 8).sum(axis=0) == 0)
        assert dead == 2  # floor(0.25 * 8 + 0.5)
    plain = ptq_keras.strip(qmodel)
    _assert_ternary(plain, flavor)
    targets = _layer_targets(qmodel)
    for row in ptq_keras.summary(plain, print_fn=None).layers:
        if row.ternary:  # dead channels (channel_sparsity) add zeros on top of the target
            assert row.sparsity >= targets[row.name][0] - 0.02, (row.name, row.sparsity, targets[row.name])
    if options.get("ste") == "identity":  # SRFP: pruned latents faded (x0.5 per update while the support moved)
        latent, mask = next((k, m) for name, k, m in _latents(qmodel) if name == "conv")
        assert np.abs(latent[mask < 0.5]).mean() < 0.5 * np.abs(latent[mask > 0.5]).mean()


def test_export_micro_is_bit_exact_with_int8_on_tflm(trained, data, tmp_path):
    flavor, qmodel = trained
    out = tmp_path / flavor
    tflite.export(qmodel, data[0][:64], out, targets=("int8", "micro", "litert"), measure=False)
    for target in ("micro", "litert"):
        report = tflite.verify(
            qmodel, out / f"model_{target}.tflite", data[0][:64], int8=out / "model_int8.tflite", min_top1=0.8
        )
        assert report.ok, str(report)
        assert report.steps[-1].max_lsb == 0.0, str(report)


@pytest.mark.parametrize("flavor", FLAVORS)
def test_precision_mixed_keeps_depthwise_and_stem_int8_and_the_rest_ternary(flavor, data, tmp_path):
    from ptq_keras.core.layers import kernel_attributes
    from ptq_keras.frontends import is_ternary_wrapper
    from ptq_keras.tflite import decode

    model = build(flavor)
    qmodel = ptq_keras.ternarize(model, sparsity=0.7, precision="mixed")
    wrapped = {layer.layer.name: [a for a, _ in layer.quantize_config.attributes]
               for layer in qmodel.layers if is_ternary_wrapper(layer)}  # fmt: skip
    # the stem (first quantizable layer, a Conv2D) and the depthwise kernels stay float; conv1d is no stem
    # (tf_keras splits the SeparableConv2D in two; Keras 3 ternarizes its pointwise kernel alone)
    sep = {"sep": ["pointwise_kernel"]} if flavor == "keras3" else {"sep_pointwise": ["kernel"]}
    assert wrapped == {**sep, "conv1d": ["kernel"], "logits": ["kernel"]}
    _fit(qmodel, flavor, data, epochs=1)
    path = str(tmp_path / ("q.keras" if flavor == "keras3" else "q.h5"))
    qmodel.save(path)
    loaded = ptq_keras.load_model(path)
    assert {layer.layer.name: [a for a, _ in layer.quantize_config.attributes]
            for layer in loaded.layers if is_ternary_wrapper(layer)} == wrapped  # fmt: skip
    x = data[0][:16]
    np.testing.assert_allclose(loaded.predict(x, verbose=0), qmodel.predict(x, verbose=0), rtol=1e-5, atol=1e-5)

    plain = ptq_keras.strip(qmodel)
    kinds = {}
    for layer in plain.layers:
        for attr, dims in kernel_attributes(layer):
            kernel = getattr(layer, attr).numpy()
            columns = kernel.reshape(-1, int(np.prod(kernel.shape[-dims:])))
            kinds[f"{layer.name}.{attr}"] = max(len(np.unique(np.abs(c[c != 0]))) for c in columns.T) <= 1
    ternary_kernels = {"sep.pointwise_kernel", "conv1d.kernel", "logits.kernel"}
    if flavor == "tf_keras":
        ternary_kernels = {"sep_pointwise.kernel", "conv1d.kernel", "logits.kernel"}
    assert len(kinds) == 6 and {k for k, ternary in kinds.items() if ternary} == ternary_kernels, kinds

    out = tmp_path / "export"
    kept = ["conv", "dw", "sep"] if flavor == "keras3" else ["conv", "dw", "sep_depthwise"]
    with pytest.warns(UserWarning, match=r"3 layer\(s\) are not ternary.*" + re.escape(str(kept))):
        tflite.export(qmodel, data[0][:64], out, targets=("int8", "micro"), measure=False)
    micro = (out / "model_micro.tflite").read_bytes()
    assert len(decode.describe(micro)) == 3  # the ternary kernels; the others are plain int8
    report = tflite.verify(qmodel, out / "model_micro.tflite", data[0][:64], int8=out / "model_int8.tflite")
    assert report.ok, str(report)
    assert report.steps[-1].max_lsb == 0.0, str(report)
    with pytest.raises(tflite.ExportError, match="layer 'conv'.*not ternary"):
        tflite.convert(qmodel, data[0][:64], target="litert")  # LiteRT's INT2 holds ternary kernels only


def test_keras3_exports_int4_and_ethos_u(data, tmp_path):
    """The other two targets take Keras 3 models too: int4 (LiteRT; Dense with one scale per tensor) verified on
    LiteRT, and ethos-u compiled by Vela wholly onto the NPU."""
    qmodel = ptq_keras.ternarize(build("keras3"), sparsity=0.7, overrides={"logits": {"granularity": "tensor"}})
    _fit(qmodel, "keras3", data, epochs=1)
    x = data[0]
    result = tflite.export(qmodel, x[:64], tmp_path, targets=("int8", "int4", "ethos-u"), measure=False)
    report = tflite.verify(qmodel, result.files["int4"], x[64:], int8=result.files["int8"], min_top1=0.9)
    assert report.ok, str(report)
    ethos_u = result.report.targets["ethos-u"].ethos_u
    assert ethos_u["cpu_ops"] == 0 and ethos_u["npu_ops"] > 0, ethos_u


def _weight_tensors(buf: bytes) -> list[bytes]:
    model = flatbuffer.read(buf)
    graph = model.subgraphs[0]
    out = []
    for tensor in graph.tensors:
        array = flatbuffer.buffer_array(model, tensor)
        if array is not None and array.size > 1:
            out.append((tuple(tensor.shape), array.tobytes()))
    return sorted(out)


def test_keras3_and_tf_keras_with_the_same_ternary_weights_give_identical_tflite_weights(trained, data):
    flavor, q3 = trained
    if flavor != "keras3":
        pytest.skip("compares the Keras 3 model with its tf_keras twin")
    plain3 = ptq_keras.strip(q3)
    twin = build("tf_keras")
    twin.set_weights(plain3.get_weights())
    calibration = data[0][:64]
    for target in ("int8", "micro", "litert"):
        a = tflite.convert(plain3, calibration, target=target)
        b = tflite.convert(twin, calibration, target=target)
        assert _weight_tensors(a) == _weight_tensors(b), target


def test_keras3_budgets_measure_what_tf_keras_measures_and_the_file_keeps_them(data):
    """flash_budget and ram_budget on a Keras 3 model: per layer, the same encoded bytes and output errors as its
    tf_keras twin with the same weights; the chosen sparsities train, and the exported file fits both budgets."""
    from ptq_keras.fitting import quantizer_states

    model = build("keras3")
    twin = build("tf_keras")
    twin.set_weights(model.get_weights())
    x = data[0][:64]
    budgets = {"flash_budget": 4_900, "ram_budget": 16_384, "budget_data": x}
    qmodel = ptq_keras.ternarize(model, **budgets)
    chosen = qmodel.ptq_allocation
    reference = ptq_keras.ternarize(twin, **budgets).ptq_allocation
    assert chosen.layer_bytes == reference.layer_bytes
    for name, errors in chosen.sensitivity.items():
        assert errors == pytest.approx(reference.sensitivity[name], rel=1e-3, abs=1e-7), name
    assert chosen.file_bytes <= 4_900 and chosen.arena_bytes <= 16_384
    assert max(chosen.sparsities.values()) > min(chosen.sparsities.values())  # the budget made a choice per layer
    _fit(qmodel, "keras3", data, epochs=1)
    for name, _, qvars in quantizer_states(qmodel):
        mask = qvars["mask"].numpy()
        assert abs(1.0 - mask.mean() - chosen.sparsities[name]) < 0.02 + 1.0 / mask.size, name
    buf = tflite.convert(qmodel, x, target="micro", encoding="auto", ram_budget=16_384)
    assert len(buf) <= 4_900
    from ptq_keras.tflite import micro

    assert micro.measure_arena(buf) <= 16_384
    with pytest.raises(ValueError, match="flash_budget=2,000 B cannot be met"):
        ptq_keras.ternarize(build("keras3"), flash_budget=2_000, budget_data=x)


QUANTIZED = ["image_act_quant", "relu1_act_quant", "relu2_act_quant", "sep_depthwise_act_quant", "sep_act_quant",
             "conv1d_act_quant", "gap_act_quant", "logits_act_quant"]  # fmt: skip


@pytest.mark.parametrize("flavor", FLAVORS)
def test_activations_int8_trains_the_ranges_the_int8_file_uses(flavor, data, tmp_path):
    """Quantizers where the converter makes int8 tensors (each block's end, the split SeparableConv2D's middle,
    never between a kernel and its BatchNormalization / ReLU); ranges learned by fit, kept by save/load, made
    static by strip; the int8 and micro files agree with the Keras model."""
    from ptq_keras.activations import exporting, is_activation_quantizer

    x, y = data
    qmodel = ptq_keras.ternarize(build(flavor), sparsity=0.7, activations="int8")
    assert [layer.name for layer in qmodel.layers if is_activation_quantizer(layer)] == QUANTIZED
    assert {name for name, _, _ in _states(qmodel)} == {"conv", "dw", "sep_depthwise", "sep_pointwise", "conv1d",
                                                        "logits"}  # fmt: skip
    _fit(qmodel, flavor, data)
    quantizers = [layer for layer in qmodel.layers if is_activation_quantizer(layer)]
    assert all(float(q.calibrated.numpy()) == 1.0 and float(q.max.numpy()) > float(q.min.numpy()) for q in quantizers)
    path = str(tmp_path / ("q.keras" if flavor == "keras3" else "q.h5"))
    qmodel.save(path)
    loaded = ptq_keras.load_model(path)
    np.testing.assert_allclose(loaded.predict(x[:32], verbose=0), qmodel.predict(x[:32], verbose=0), atol=1e-5)
    plain = ptq_keras.strip(loaded)
    assert all(layer.static for layer in plain.layers if is_activation_quantizer(layer))
    expected = qmodel.predict(x[:32], verbose=0)
    with exporting():  # strip changes nothing but the rounding of the int8 MEAN after the pooling (link_means)
        np.testing.assert_allclose(plain(x[:32]).numpy(), expected, atol=1e-4)
    assert [layer.name for layer in plain.layers if getattr(layer, "mean_input", None)] == ["gap_act_quant"]
    # every other op output: the requantization of its int8 kernel (link_requantization), on both Keras APIs
    assert [layer.name for layer in plain.layers if getattr(layer, "requant", None)] == [
        name for name in QUANTIZED if name not in ("image_act_quant", "gap_act_quant")]  # fmt: skip
    lsb = max(float(q.max.numpy() - q.min.numpy()) / 255 for q in plain.layers if is_activation_quantizer(q))
    np.testing.assert_allclose(plain(x[:32]).numpy(), expected, atol=lsb * 1.01)  # within an LSB
    # batchnorm_data re-estimates the ranges with the BatchNorm statistics; the file agrees with that model
    recalibrated = ptq_keras.strip(loaded, batchnorm_data=x[:128])
    moved = [(float(a.max.numpy()), float(b.max.numpy())) for a, b in zip(plain.layers, recalibrated.layers)
             if is_activation_quantizer(a)]  # fmt: skip
    assert all(b.static for b in recalibrated.layers if is_activation_quantizer(b))
    assert any(abs(a - b) > 1e-6 for a, b in moved), moved
    tflite.export(recalibrated, x[:64], tmp_path / "out", targets=("int8", "micro"), measure=False)
    report = tflite.verify(recalibrated, tmp_path / "out" / "model_micro.tflite", x, int8=tmp_path / "out" /
                           "model_int8.tflite", min_top1=0.995)  # fmt: skip
    assert report.ok and report.steps[-1].max_lsb == 0.0, str(report)
    assert report.steps[0].max_lsb <= 1.0 and report.steps[0].mean_lsb <= 0.01, str(report)  # Keras vs the file
    if flavor == "keras3":  # the tf_keras twin with the same weights and ranges makes the same file
        twin = ptq_keras.strip(ptq_keras.ternarize(build("tf_keras"), sparsity=0.7, activations="int8"))
        twin.set_weights(plain.get_weights())
        for layer in filter(is_activation_quantizer, twin.layers):
            layer.static = True
        a = tflite.convert(plain, x[:64], target="int8")
        b = tflite.convert(twin, x[:64], target="int8")
        assert _weight_tensors(a) == _weight_tensors(b)
        qa = [t.quantization.scale for t in flatbuffer.read(a).subgraphs[0].tensors if t.quantization is not None]
        qb = [t.quantization.scale for t in flatbuffer.read(b).subgraphs[0].tensors if t.quantization is not None]
        assert sorted(map(str, qa)) == sorted(map(str, qb))


@pytest.mark.parametrize("flavor", FLAVORS)
def test_distill_with_alpha_one_trains_on_the_soft_targets_alone(flavor, data):
    teacher = build(flavor)
    x, y = data[0][:64], data[1][:64]
    k = _api(flavor)
    results = []
    for labels in (y, (y + 1) % 4):
        k.utils.set_random_seed(0)
        student = ptq_keras.ternarize(teacher, sparsity=0.5)
        model = ptq_keras.distill(student, teacher, alpha=1.0, temperature=2.0)
        model.compile(k.optimizers.SGD(0.1), k.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(x, labels, epochs=1, batch_size=16, verbose=0, shuffle=False)
        results.append(ptq_keras.strip(model).get_weights())
    assert not np.allclose(results[0][0], teacher.get_weights()[0], atol=1e-4)  # the student trained
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, atol=1e-6)  # the labels had no effect
    # with no update, the loss fit reports is the soft-target term of the batch (tf_keras reports it apart, as
    # distill_loss, next to the compiled loss; Keras 3's loss is the total, here alpha=1: the soft term alone)
    from ptq_keras.distill import soft_target_loss

    student = ptq_keras.ternarize(teacher, sparsity=0.5)
    model = ptq_keras.distill(student, teacher, alpha=1.0, temperature=4.0)
    model.compile(k.optimizers.SGD(0.0), k.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(x[:16], y[:16], epochs=1, batch_size=16, verbose=0).history
    loss = history["distill_loss" if flavor == "tf_keras" else "loss"][0]
    expected = float(soft_target_loss(teacher(x[:16], training=False), student(x[:16], training=True), 4.0))
    assert loss == pytest.approx(expected, rel=1e-3) and expected > 1e-4


def test_keras3_refuses_what_only_tf_keras_has(data):
    model = build("keras3")
    qmodel = ptq_keras.ternarize(model)
    with pytest.raises(TypeError, match="both be tf_keras or both be Keras 3"):
        ptq_keras.distill(qmodel, build("tf_keras"))
    with pytest.raises(ValueError, match="option|sparsity"):
        ptq_keras.ternarize(model, sparsity=1.5)
    with pytest.raises(TypeError, match="unknown option"):
        ptq_keras.ternarize(model, sparsty=0.5)


def test_keras3_backends_other_than_tensorflow_are_refused_where_they_cannot_run(monkeypatch, data):
    import keras

    model = build("keras3")
    monkeypatch.setattr(keras.backend, "backend", lambda: "torch")
    with pytest.raises(RuntimeError, match="'torch' backend.*KERAS_BACKEND=tensorflow"):
        ptq_keras.ternarize(model)
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(NotImplementedError, match="taylor.*KERAS_BACKEND=tensorflow"):
        ptq_keras.ternarize(model, criterion="taylor")
    assert ptq_keras.is_ternarized(ptq_keras.ternarize(model, soft_decay=0.5))  # decays between epochs: any backend
    with pytest.raises(RuntimeError, match="TensorFlow backend.*ptq-convert --model q.keras"):
        tflite.convert(model, data[0][:8], target="int8")
    with pytest.raises(RuntimeError, match="flash_budget / ram_budget.*TensorFlow backend"):
        ptq_keras.ternarize(model, ram_budget=65_536, budget_data=data[0][:32])
    # tf_keras tensors are TensorFlow's: keras.ops (the ternary math) must run on TensorFlow for them
    with pytest.raises(RuntimeError, match="tf_keras layer.*'jax'.*KERAS_BACKEND=tensorflow"):
        ptq_keras.ternarize(build("tf_keras"))


JAX_SCRIPT = """
import os, sys
os.environ["KERAS_BACKEND"] = "jax"
import numpy as np
import ptq_keras
import keras
assert keras.backend.backend() == "jax"
sys.path.insert(0, {tests!r})
from test_keras_flavors import build, _assert_ternary, _states, _target
x = np.load({x!r}); y = np.load({y!r})
q = ptq_keras.ternarize(build("keras3"), sparsity=ptq_keras.PolynomialDecay(0.0, 0.7, 0, 8, frequency=1),
                        regularizer="greg", ste="psg", activations="int8")
q.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
q.fit(x, y, epochs=2, batch_size=32, verbose=0)
for name, quantizer, v in _states(q):
    assert int(v["step"]) == 16 and int(v["freeze_step"]) == 8, name
    keep = 1 - _target(quantizer, v["mask"].shape)
    assert abs(float(np.mean(np.asarray(v["mask"]))) - keep) < 0.03, name
plain = ptq_keras.strip(q)
_assert_ternary(plain, "jax")
np.testing.assert_allclose(plain.predict(x[:32], verbose=0), q.predict(x[:32], verbose=0), atol=1e-4)
q.save({path!r})
np.save({out!r}, q.predict(x[:32], verbose=0))
teacher = build("keras3")
before = [w.copy() for w in teacher.get_weights()]
d = ptq_keras.distill(ptq_keras.ternarize(teacher), teacher)
d.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
assert np.isfinite(d.fit(x, y, epochs=1, batch_size=32, verbose=0).history["loss"][0])
assert all(np.array_equal(a, b) for a, b in zip(before, teacher.get_weights()))  # the teacher never trains
# soft_decay (SRFP) on JAX: pruned latents x0.5 once per epoch (learning rate 0: only the decay moves them)
keras.utils.set_random_seed(0)
dense = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, use_bias=False, name="d")])
q = ptq_keras.ternarize(dense, sparsity=0.5, soft_decay=0.5, decay=0.0, freeze_at=None)
q.compile(keras.optimizers.SGD(0.0), "mse")
w0 = np.asarray(q.get_layer("ptq_d").layer.kernel).copy()
q.fit(np.ones((4, 8), np.float32), np.zeros((4, 4), np.float32), batch_size=1, epochs=2, verbose=0)
(_, _, v), = _states(q)
mask = np.asarray(v["mask"]) > 0.5
w = np.asarray(q.get_layer("ptq_d").layer.kernel)
np.testing.assert_allclose(w[mask], w0[mask])
np.testing.assert_allclose(w[~mask], w0[~mask] * 0.25, rtol=1e-6)
"""


@pytest.mark.slow
def test_keras3_trains_on_jax_and_the_tensorflow_side_exports_what_it_saved(data, tmp_path):
    pytest.importorskip("jax")
    import subprocess
    import sys

    np.save(tmp_path / "x.npy", data[0])
    np.save(tmp_path / "y.npy", data[1])
    path, out = str(tmp_path / "jax.keras"), str(tmp_path / "jax_out.npy")
    script = JAX_SCRIPT.format(tests=os.path.dirname(__file__), x=str(tmp_path / "x.npy"),
                               y=str(tmp_path / "y.npy"), path=path, out=out)  # fmt: skip
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    # this process runs Keras 3 on TensorFlow: the JAX-trained file loads, computes the same, exports bit-exact
    qmodel = ptq_keras.load_model(path)
    np.testing.assert_allclose(qmodel.predict(data[0][:32], verbose=0), np.load(out), rtol=1e-4, atol=1e-4)
    tflite.export(qmodel, data[0][:64], tmp_path / "out", targets=("int8", "micro"), measure=False)
    report = tflite.verify(qmodel, tmp_path / "out" / "model_micro.tflite", data[0][:64],
                           int8=tmp_path / "out" / "model_int8.tflite", min_top1=0.8)  # fmt: skip
    assert report.ok and report.steps[-1].max_lsb == 0.0, str(report)


def test_ptq_convert_reads_a_keras3_file_and_meets_its_ram_budget(trained, data, tmp_path):
    flavor, qmodel = trained
    if flavor != "keras3":
        pytest.skip("the .keras format holds Keras 3 models")
    from absl.testing import flagsaver

    from ptq_keras.tflite import cli

    path = str(tmp_path / "q.keras")
    qmodel.save(path)
    np.save(tmp_path / "x.npy", data[0][:64])
    with flagsaver.flagsaver():
        cli.FLAGS.unparse_flags()
        cli.FLAGS(["ptq-convert", "--model", path, "--data", str(tmp_path / "x.npy"), "--out_dir",
                   str(tmp_path / "out"), "--targets", "int8,micro", "--ram_budget", "65536"])  # fmt: skip
        cli.main(["ptq-convert"])
    assert os.path.getsize(tmp_path / "out" / "model_micro.tflite") > 0
    report = json.loads((tmp_path / "out" / "model_report.json").read_text())
    micro = report["targets"]["micro"]
    assert micro["ram_budget"] == 65536 and micro["arena_bytes"] <= 65536, micro
