"""ternarize / strip / summary / save-load on Sequential and Functional models; the schedule under plain fit."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import conv1d_model, residual_dw, small_cnn

import ptq_keras
from ptq_keras import keras
from ptq_keras.core.layers import kernel_attributes
from ptq_keras.core.options import DEFAULTS
from ptq_keras.core.ternary import as_groups, keep_count, max_sparsity


def _data(model, n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((n, *model.input_shape[1:])).astype("float32")
    y = rng.integers(0, model.output_shape[-1], n)
    return x, y


def _fit(qmodel, x, y, epochs=1, batch_size=16, optimizer="adam"):
    qmodel.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return qmodel.fit(x, y, epochs=epochs, batch_size=batch_size, verbose=0, shuffle=False)


def _steps(qmodel):
    return sorted({int(v.numpy()) for v in qmodel.weights if "_ptq_step" in v.name})


def _ternary_kernels(plain, with_cap=False, min_kept=DEFAULTS["min_kept"]):
    """(layer name, kernel as (n, C)) for each quantizable kernel of a plain model; with ``with_cap``, also the
    highest sparsity ``min_kept`` allows that kernel."""
    for layer in plain.layers:
        for attr, dims in kernel_attributes(layer):
            kernel = getattr(layer, attr).numpy()
            k2d = as_groups(kernel, dims)
            yield (layer.name, k2d, max_sparsity(kernel.shape, dims, min_kept)) if with_cap else (layer.name, k2d)


def assert_exactly_ternary(plain, target, per_channel=False, min_kept=DEFAULTS["min_kept"]):
    """Every channel holds {-a, 0, +a}; the zeros hit the target exactly per layer (the default layer-wide
    selection, every channel alive) or per channel; kernels with few weights per output channel at the sparsity
    ``min_kept`` caps them to."""
    for name, k2d, cap in _ternary_kernels(plain, with_cap=True, min_kept=min_kept):
        sparsity = min(target, cap)
        for c in range(k2d.shape[1]):
            values = np.unique(k2d[:, c])
            nonzero = values[values != 0]
            assert len(values) <= 3, f"{name} channel {c}: {values}"
            assert len(np.unique(np.abs(nonzero))) <= 1, f"{name} channel {c} not symmetric: {values}"
            if per_channel:
                assert np.count_nonzero(k2d[:, c]) == keep_count(sparsity, k2d.shape[0]), name
        if not per_channel:
            assert np.count_nonzero(k2d) == keep_count(sparsity, k2d.size), name
            assert np.count_nonzero(k2d, axis=0).min() >= 1, f"{name}: an empty channel"


def test_max_sparsity_keeps_min_kept_weights_per_output_channel():
    assert max_sparsity((3, 3, 64, 1), 2, 4) == pytest.approx(1 - 4 / 9)  # depthwise 3x3: fan-in 9
    assert max_sparsity((3, 3, 1, 64), 1, 4) == pytest.approx(1 - 4 / 9)  # a stem on one channel
    assert max_sparsity((1, 1, 64, 32), 1, 4) == pytest.approx(1 - 4 / 64)
    assert max_sparsity((3, 32), 1, 4) == 0.0  # fan-in below min_kept: every weight kept
    assert max_sparsity((3, 3, 1, 64), 1, 0) == 1.0  # min_kept=0: no cap


@pytest.mark.parametrize("sparsity", [0.85, ptq_keras.PolynomialDecay(0.0, 0.85, 0, 6, frequency=1)])
def test_min_kept_holds_layers_with_a_small_fan_in_under_the_target(sparsity, capsys):
    model = residual_dw()
    x, y = _data(model)
    qmodel = ptq_keras.ternarize(model, sparsity=sparsity)
    said = capsys.readouterr().out
    _fit(qmodel, x, y, epochs=2, batch_size=16)
    plain = ptq_keras.strip(qmodel)
    zeros = {name: 1 - np.count_nonzero(k2d) / k2d.size for name, k2d in _ternary_kernels(plain)}
    # stem: 3x3 on 3 channels (fan-in 27), dw: 3x3 depthwise (9), pw: 1x1 on 8 channels (8), head: 12 inputs
    assert zeros["stem"] == pytest.approx(0.85, abs=0.01)
    assert zeros["dw"] == pytest.approx(1 - 4 / 9, abs=0.01)
    assert zeros["pw"] == pytest.approx(0.5, abs=0.01)
    assert zeros["head"] == pytest.approx(1 - 4 / 12, abs=0.01)
    assert_exactly_ternary(plain, 0.85)
    assert "min_kept" in said and "dw 0.56" in said and "pw 0.50" in said and "stem" not in said
    assert "sep.depthwise_kernel 0.56" in said and "sep.pointwise_kernel 0.75" in said

    unbound = ptq_keras.ternarize(model, sparsity=0.85, min_kept=0)
    _fit(unbound, x, y, epochs=1, batch_size=16)
    assert_exactly_ternary(ptq_keras.strip(unbound), 0.85, min_kept=0)
    assert "min_kept" not in capsys.readouterr().out


@pytest.mark.parametrize("builder", [small_cnn, residual_dw, conv1d_model])
def test_schedule_advances_under_plain_fit_and_strip_is_exact(builder):
    model = builder()
    x, y = _data(model)
    qmodel = ptq_keras.ternarize(model, sparsity=0.7)
    _fit(qmodel, x, y, batch_size=16)
    assert _steps(qmodel) == [4]  # 64 samples / 16 per batch, no callback
    plain = ptq_keras.strip(qmodel)
    assert [type(layer) for layer in plain.layers] == [type(layer) for layer in model.layers]
    assert_exactly_ternary(plain, 0.7)
    np.testing.assert_allclose(plain.predict(x, verbose=0), qmodel.predict(x, verbose=0), rtol=1e-4, atol=1e-4)


def test_polynomial_schedule_ramps_then_freezes_with_masked_ste():
    model = small_cnn()
    x, y = _data(model, n=96)
    schedule = ptq_keras.PolynomialDecay(0.0, 0.8, begin_step=0, end_step=4, frequency=1)
    qmodel = ptq_keras.ternarize(model, sparsity=schedule, decay=0.0, freeze_at=None)  # freeze at the ramp's end
    _fit(qmodel, x[:32], y[:32], batch_size=16)  # steps 0, 1: mid-ramp
    mid = ptq_keras.summary(qmodel, print_fn=None)
    assert all(0.0 < r.target_sparsity < 0.8 for r in mid.layers if r.ternary)
    _fit(qmodel, x[32:], y[32:], batch_size=16, optimizer=keras.optimizers.SGD(0.1))  # steps 2..5, frozen at 4
    wrapper = qmodel.get_layer("ptq_logits")
    latent_before = wrapper.weights[0].numpy().copy()
    mask_before = wrapper._weight_vars[0][2]["mask"].numpy().copy()
    _fit(qmodel, x, y, batch_size=16, optimizer=keras.optimizers.SGD(0.1))
    mask_after = wrapper._weight_vars[0][2]["mask"].numpy()
    np.testing.assert_array_equal(mask_before, mask_after)  # frozen
    pruned = mask_before == 0
    np.testing.assert_array_equal(wrapper.weights[0].numpy()[pruned], latent_before[pruned])  # masked STE
    assert not np.array_equal(wrapper.weights[0].numpy()[~pruned], latent_before[~pruned])
    report = ptq_keras.summary(qmodel, print_fn=None)
    caps = {name: cap for name, _, cap in _ternary_kernels(model, with_cap=True)}
    assert caps["conv1"] < 0.8  # 3x3 on one channel: min_kept holds it under the ramp's end
    assert all(r.target_sparsity == pytest.approx(min(0.8, caps[r.name])) for r in report.layers if r.ternary)
    assert_exactly_ternary(ptq_keras.strip(qmodel), 0.8)


def test_freeze_at_fixes_the_support_of_a_constant_target():
    model = small_cnn()
    x, y = _data(model, n=96)
    qmodel = ptq_keras.ternarize(model, sparsity=0.5, freeze_at=2, decay=0.0)
    _fit(qmodel, x[:48], y[:48], batch_size=16, optimizer=keras.optimizers.SGD(0.5))  # steps 0, 1, 2
    wrapper = qmodel.get_layer("ptq_logits")
    mask = wrapper._weight_vars[0][2]["mask"].numpy().copy()
    latent = wrapper.weights[0].numpy().copy()
    _fit(qmodel, x[48:], y[48:], batch_size=16, optimizer=keras.optimizers.SGD(0.5))
    np.testing.assert_array_equal(wrapper._weight_vars[0][2]["mask"].numpy(), mask)
    np.testing.assert_array_equal(wrapper.weights[0].numpy()[mask == 0], latent[mask == 0])


def test_mask_is_reselected_every_frequency_steps():
    model = small_cnn()
    x, y = _data(model, n=64)
    qmodel = ptq_keras.ternarize(model, sparsity=0.5, frequency=100)
    _fit(qmodel, x, y, batch_size=16, optimizer=keras.optimizers.SGD(1.0))
    wrapper = qmodel.get_layer("ptq_logits")
    latent, mask = wrapper.weights[0].numpy(), wrapper._weight_vars[0][2]["mask"].numpy()
    # the mask was chosen at step 0 only, so it is not the top-k of the (moved) latent weights
    fresh = as_groups(np.abs(latent), 1)
    assert not np.array_equal(mask.astype(bool), fresh >= np.sort(fresh, axis=0)[-keep_count(0.5, fresh.shape[0])])


def test_user_model_is_not_modified():
    model = residual_dw()
    before = [w.copy() for w in model.get_weights()]
    nodes = [len(layer._inbound_nodes) for layer in model.layers]
    qmodel = ptq_keras.ternarize(model, sparsity=0.5)
    _fit(qmodel, *_data(model))
    ptq_keras.strip(qmodel)
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert nodes == [len(layer._inbound_nodes) for layer in model.layers]
    assert not ptq_keras.is_ternarized(model) and ptq_keras.is_ternarized(qmodel)


def test_starts_from_the_float_weights():
    model = small_cnn()
    qmodel = ptq_keras.ternarize(model, sparsity=0.0, threshold="sparsity")
    x, _ = _data(model, n=8)
    # sparsity 0 keeps every weight: the projection is sign(w) * mean|w|, built from the float kernel
    expected = np.sign(model.layers[-1].kernel.numpy()) * np.abs(model.layers[-1].kernel.numpy()).mean(axis=0)
    qmodel.predict(x, verbose=0)
    _fit(qmodel, x, np.zeros(8, int), optimizer=keras.optimizers.SGD(0.0))
    np.testing.assert_allclose(ptq_keras.strip(qmodel).layers[-1].kernel.numpy(), expected, rtol=1e-5)


def test_keep_float_and_overrides():
    model = residual_dw()
    overrides = {"head": {"sparsity": 0.9, "min_kept": 0}}
    qmodel = ptq_keras.ternarize(model, sparsity=0.5, keep_float=["stem"], overrides=overrides)
    _fit(qmodel, *_data(model))
    names = {layer.name for layer in qmodel.layers}
    assert "stem" in names and "ptq_stem" not in names and "ptq_head" in names
    report = {r.name: r for r in ptq_keras.summary(qmodel, print_fn=None).layers}
    assert not report["stem"].ternary
    assert report["head"].sparsity == pytest.approx(0.9, abs=1 / 12)
    assert report["dw"].sparsity == pytest.approx(0.5, abs=1 / 9)


def test_precision_mixed_leaves_only_the_depthwise_kernels_and_the_stem_in_float(capsys):
    qmodel = ptq_keras.ternarize(residual_dw(), sparsity=0.5, precision="mixed", overrides={"sep": {"sparsity": 0.6}},
                                 activations="int8")  # fmt: skip
    wrapped = {layer.layer.name for layer in qmodel.layers if hasattr(layer, "quantize_config")}
    assert wrapped == {"pw", "sep_pointwise", "head"}  # stem, dw and the separable's depthwise half stay float
    assert "kernel(s) in float" in capsys.readouterr().out
    options = {layer.layer.name: layer.quantize_config.options for layer in qmodel.layers if layer.name in
               {"ptq_pw", "ptq_sep_pointwise"}}  # fmt: skip
    assert (options["pw"]["sparsity"], options["sep_pointwise"]["sparsity"]) == (0.5, 0.6)  # the override follows
    report = {r.name: r for r in ptq_keras.summary(qmodel, print_fn=None).layers}
    assert not report["sep_depthwise"].ternary and not report["stem"].ternary and report["pw"].ternary

    mlp = keras.Sequential([keras.Input((8,)), keras.layers.Dense(6, name="d1"), keras.layers.Dense(3, name="d2")])
    qmlp = ptq_keras.ternarize(mlp, precision="mixed")  # no stem to keep: a Dense comes first
    assert {layer.layer.name for layer in qmlp.layers if hasattr(layer, "quantize_config")} == {"d1", "d2"}
    assert "every kernel is ternary" in capsys.readouterr().out


def test_precision_errors_name_the_fix():
    with pytest.raises(ValueError, match=r"precision='int4' is not one of \['ternary', 'mixed'\]"):
        ptq_keras.ternarize(residual_dw(), precision="int4")
    with pytest.raises(ValueError, match="precision='mixed' cannot be combined with flash_budget"):
        ptq_keras.ternarize(residual_dw(), precision="mixed", flash_budget=4_000, budget_data=np.zeros((4, 16, 16, 3)))
    dw_only = keras.Sequential([keras.Input((6, 6, 2)), keras.layers.DepthwiseConv2D(3, name="dw")])
    with pytest.raises(ValueError, match="no layer to ternarize.*precision='mixed' keeps"):
        ptq_keras.ternarize(dw_only, precision="mixed")


@pytest.mark.parametrize("threshold", ["l2", "twn"])
@pytest.mark.parametrize("ste", ["masked", "clipped"])
def test_other_thresholds_and_stes_train_and_strip(threshold, ste):
    model = small_cnn()
    qmodel = ptq_keras.ternarize(model, sparsity=0.5, threshold=threshold, ste=ste, granularity="tensor",
                                 selection="tensor", normalize=True, decay=1e-3)
    history = _fit(qmodel, *_data(model))
    assert np.isfinite(history.history["loss"][-1])
    plain = ptq_keras.strip(qmodel)
    for name, k2d in _ternary_kernels(plain):
        assert len(np.unique(np.abs(k2d[k2d != 0]))) == 1, name  # one scale per tensor


@pytest.mark.parametrize("fmt", ["h5", "savedmodel"])
def test_save_load_round_trip_and_training_continues(tmp_path, fmt):
    model = residual_dw()
    x, y = _data(model)
    qmodel = ptq_keras.ternarize(model, sparsity=0.6)
    _fit(qmodel, x, y)
    path = str(tmp_path / ("q.h5" if fmt == "h5" else "q_savedmodel"))
    qmodel.save(path)
    with ptq_keras.custom_object_scope():
        again = keras.models.load_model(path)
    assert ptq_keras.is_ternarized(again)
    np.testing.assert_array_equal(qmodel.predict(x, verbose=0), again.predict(x, verbose=0))
    np.testing.assert_array_equal(
        ptq_keras.strip(qmodel).get_weights()[0], ptq_keras.strip(again).get_weights()[0]
    )
    _fit(again, x, y)
    assert _steps(again) == [8]  # continues from step 4
    assert_exactly_ternary(ptq_keras.strip(again), 0.6)


def test_keras_format_is_refused_with_a_pointer_to_h5(tmp_path):
    qmodel = ptq_keras.ternarize(small_cnn(), sparsity=0.5)
    with pytest.raises(ValueError, match=r"\.h5"):
        qmodel.save(str(tmp_path / "m.keras"))
    assert not (tmp_path / "m.keras").exists()


def test_stripped_model_saves_in_any_format(tmp_path):
    qmodel = ptq_keras.ternarize(small_cnn(), sparsity=0.5)
    plain = ptq_keras.strip(qmodel)
    plain.save(str(tmp_path / "plain.keras"))
    again = keras.models.load_model(str(tmp_path / "plain.keras"))
    x, _ = _data(plain, n=4)
    np.testing.assert_allclose(again.predict(x, verbose=0), plain.predict(x, verbose=0), rtol=1e-6)


def test_summary_accounting(capsys):
    qmodel = ptq_keras.ternarize(small_cnn(), sparsity=0.75)
    _fit(qmodel, *_data(qmodel))
    report = ptq_keras.summary(qmodel)
    printed = capsys.readouterr().out
    assert "logits" in printed and "entropy bound" in printed
    dense = next(r for r in report.layers if r.name == "logits")
    n, c = 32, 10
    k = keep_count(0.75, n)
    assert dense.params == n * c + c
    assert dense.bits["dense_2bit"] == 2 * n * c + 32 * c + 32 * c  # codes + scales + bias
    assert dense.bits["nnz_2bit"] == 2 * k * c + 32 * c + 32 * c
    assert dense.bits["fp32"] == 32 * (n * c + c)
    p0 = 1 - k / n
    assert dense.bits["entropy"] <= n * c * 1.585 + 64 * c
    assert dense.bits["entropy"] >= n * c * -(p0 * np.log2(p0)) + 64 * c
    bn = next(r for r in report.layers if r.type == "BatchNormalization")
    assert not bn.ternary and bn.bits["nnz_2bit"] == bn.bits["fp32"]
    assert report.totals_bytes["fp32"] == 4 * sum(r.params for r in report.layers)
    assert report.ratios["nnz_2bit"] > report.ratios["dense_2bit"] > 10
    # the parts of a TFLite file: an int32 bias and a float scale per output channel, the codes' entropy
    channels = 8 + 16 + 32 + c  # conv1, conv2, fc, logits
    assert sum(r.channels for r in report.layers) == channels
    assert report.file_parts["biases"] == report.file_parts["scales"] == 4 * channels
    assert dense.channels == c and 0 < report.file_parts["weights"] < report.totals_bytes["entropy"]
    assert "micro file parts, estimated" in printed
    # the stripped model reports the same sizes
    again = ptq_keras.summary(ptq_keras.strip(qmodel), print_fn=None)
    assert again.totals_bytes == pytest.approx(report.totals_bytes)


@pytest.mark.parametrize("through_strip", [False, True])
def test_recalibrate_batchnorm_uses_the_data_statistics(through_strip):
    qmodel = ptq_keras.ternarize(small_cnn(), sparsity=0.5)
    x, _ = _data(qmodel, n=256)
    x = x * 3.0 + 1.0
    if through_strip:
        plain = ptq_keras.strip(qmodel, batchnorm_data=x, batchnorm_steps=None)
    else:
        plain = ptq_keras.recalibrate_batchnorm(ptq_keras.strip(qmodel), x, steps=None, verbose=False)
    bn = plain.layers[1]
    pre_bn = keras.Model(plain.inputs, plain.layers[0].output).predict(x, verbose=0)
    np.testing.assert_allclose(bn.moving_mean.numpy(), pre_bn.mean(axis=(0, 1, 2)), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(bn.moving_variance.numpy(), pre_bn.var(axis=(0, 1, 2)), rtol=2e-2)
    assert bn.momentum == 0.99


# ------------------------------------------------------------------------------------------------ bad input


def test_what_is_not_a_keras_graph_model_gets_a_type_error_that_names_it():
    import keras as keras3

    with pytest.raises(TypeError, match="tf_keras or Keras 3 model, got builtins.dict"):
        ptq_keras.ternarize({"kernel": 1}, sparsity=0.5)

    class Subclassed(keras3.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras3.layers.Dense(2)

        def call(self, x):
            return self.dense(x)

    model = Subclassed()
    model.build((None, 4))
    with pytest.raises(TypeError, match="subclassed keras.Model.*functional API"):
        ptq_keras.ternarize(model, sparsity=0.5)


def test_model_without_quantizable_layer():
    model = keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Flatten(), keras.layers.ReLU()])
    with pytest.raises(ValueError, match="no layer to ternarize"):
        ptq_keras.ternarize(model)
    with pytest.raises(ValueError, match="keep_float"):
        ptq_keras.ternarize(conv1d_model(), keep_float=["c1", "out"])


@pytest.mark.parametrize("sparsity", [1.0, -0.1, 1.5])
def test_sparsity_outside_range(sparsity):
    with pytest.raises(ValueError, match=rf"ternarize: sparsity={sparsity!r} is outside \[0, 1\)"):
        ptq_keras.ternarize(small_cnn(), sparsity=sparsity)


def test_sparsity_of_wrong_type():
    with pytest.raises(TypeError, match="PruningSchedule"):
        ptq_keras.ternarize(small_cnn(), sparsity="high")


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        ({"sparsty": 0.5}, TypeError, "sparsty"),
        ({"threshold": "median"}, ValueError, "threshold='median'"),
        ({"ste": "soft"}, ValueError, "ste='soft'"),
        ({"granularity": "row"}, ValueError, "granularity='row'"),
        ({"keep_float": ["nope"]}, ValueError, "keep_float names layer 'nope'"),
        ({"overrides": {"nope": {}}}, ValueError, "overrides names layer 'nope'"),
        ({"overrides": {"c1": {"sparsity": 2.0}}}, ValueError, r"overrides\['c1'\]: sparsity=2.0"),
        ({"overrides": {"c1": {"bits": 2}}}, TypeError, r"overrides\['c1'\]: unknown option.*bits"),
        ({"decay": -1.0}, ValueError, "decay"),
        ({"freeze_at": -3}, ValueError, "freeze_at"),
    ],
)
def test_bad_options_name_the_value(kwargs, error, pattern):
    model = conv1d_model()
    before = [w.copy() for w in model.get_weights()]
    with pytest.raises(error, match=pattern):
        ptq_keras.ternarize(model, **kwargs)
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_options_are_keyword_only():
    with pytest.raises(TypeError):
        ptq_keras.ternarize(small_cnn(), 0.7)


def test_ternarizing_twice_explains():
    qmodel = ptq_keras.ternarize(conv1d_model(), sparsity=0.5)
    with pytest.raises(ValueError, match="already ternarized"):
        ptq_keras.ternarize(qmodel, sparsity=0.5)


def test_strip_of_a_plain_model_explains():
    with pytest.raises(ValueError, match="no ternarized layer"):
        ptq_keras.strip(small_cnn())
