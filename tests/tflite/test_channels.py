"""0-bit channels: ``channel_sparsity`` zeroes whole output channels in training, and the ``micro`` export removes
them where the graph allows, bit-exact with the unreduced int8 file on TFLM."""

from __future__ import annotations

import numpy as np
import pytest
import tflite_models as tm

import ptq_keras
from ptq_keras import keras
from ptq_keras import tflite as ptq_tflite
from ptq_keras.core import ternary
from ptq_keras.tflite import decode, flatbuffer
from ptq_keras.tflite.convert import trim_for_tflm

L = keras.layers


def _zero_channels(model, dead: dict, bias: dict | None = None):
    for name, channels in dead.items():
        layer = model.get_layer(name)
        w, b = layer.get_weights()
        w[..., channels] = 0
        for channel, value in (bias or {}).get(name, {}).items():
            b[channel] = value
        layer.set_weights([w, b])
    return model


def _weight_shapes(path) -> dict:
    model = flatbuffer.read(open(path, "rb").read())
    graph = model.subgraphs[0]
    shapes = {}
    for op in graph.operators:
        kind = flatbuffer.builtin_name(model, op.opcodeIndex)
        if kind in ("CONV_2D", "FULLY_CONNECTED"):
            shapes.setdefault(kind, []).append([int(d) for d in graph.tensors[int(op.outputs[0])].shape])
    return shapes


def _export_and_check(model, x, tmp_path):
    result = ptq_tflite.export(model, x[:30], tmp_path, targets=("int8", "micro"), encoding="huffman")
    parity = ptq_tflite.verify(model, result.files["micro"], x[30:])
    assert parity.steps[-1].max_lsb == 0 and parity.steps[-1].top1_agreement == 1.0, str(parity)
    return result


def test_dead_channels_are_removed_through_pool_and_flatten_bit_exact(tmp_path):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((12, 12, 1)),
        L.Conv2D(8, 3, activation="relu", name="conv1"),
        L.BatchNormalization(name="bn1"),  # after the activation: not folded, so conv1's channels must stay
        L.MaxPooling2D(name="pool"),
        L.Conv2D(8, 3, padding="same", activation="relu", name="conv2"),
        L.Flatten(name="flat"),
        L.Dense(16, activation="relu", name="fc"),
        L.Dense(10, name="logits"),
    ])  # fmt: skip
    model = _zero_channels(tm.ternarize_kernels(model), {"conv1": [1, 5], "conv2": [0, 3, 7], "fc": [2]})
    x = tm.inputs(model, 60)
    result = _export_and_check(model, x, tmp_path)
    rep = result.report.targets["micro"]
    assert sorted((row["dead"], row["removed"]) for row in rep.dead_channels) == [(1, 1), (2, 0), (3, 3)]
    assert rep.macs < rep.macs_unreduced
    assert "dead output channel(s)" in result.report.summary()
    shapes = _weight_shapes(result.files["micro"])
    assert shapes["CONV_2D"][1][-1] == 5 and shapes["FULLY_CONNECTED"][0][-1] == 15  # 8 - 3, 16 - 1
    assert rep.file_bytes < result.report.targets["int8"].file_bytes


@pytest.mark.parametrize("kernel, removed", [(3, 1), (1, 2)])
def test_a_same_padded_consumer_takes_what_it_sees_everywhere(kernel, removed, tmp_path):
    """Behind a SAME-padded 3x3 conv a dead channel may go only if its constant is the zero point (border windows
    see padding): a ReLU of a negative bias goes, a positive constant stays. A 1x1 conv reads no padding: both go."""
    keras.utils.set_random_seed(1)
    model = keras.Sequential([
        keras.Input((10, 10, 2)),
        L.Conv2D(6, 3, padding="same", activation="relu", name="a"),
        L.Conv2D(6, kernel, padding="same", activation="relu", name="b"),
        L.GlobalAveragePooling2D(name="gap"),
        L.Dense(4, name="logits"),
    ])  # fmt: skip
    model = _zero_channels(tm.ternarize_kernels(model), {"a": [0, 4]}, bias={"a": {0: -0.5, 4: 0.7}})
    x = tm.inputs(model, 60)
    rows = _export_and_check(model, x, tmp_path).report.targets["micro"].dead_channels
    assert [(row["dead"], row["removed"]) for row in rows] == [(2, removed)]


def test_dead_channels_into_a_residual_add_stay_as_zeros(tmp_path):
    model = tm.build("residual")
    first = next(layer for layer in model.layers if isinstance(layer, L.Conv2D))
    model = _zero_channels(model, {first.name: [0]})
    x = tm.inputs(model, 50)
    rows = _export_and_check(model, x, tmp_path).report.targets["micro"].dead_channels
    assert rows and all(row["removed"] == 0 for row in rows if row["dead"] and row["channels"] == first.filters)


def test_channel_sparsity_trains_dead_channels_and_the_export_removes_them(tmp_path):
    keras.utils.set_random_seed(2)
    model = keras.Sequential([
        keras.Input((12, 12, 1)),
        L.Conv2D(16, 3, name="conv"),
        L.BatchNormalization(name="bn"),
        L.ReLU(name="relu"),
        L.MaxPooling2D(name="pool"),
        L.Flatten(name="flat"),
        L.Dense(24, activation="relu", name="fc"),
        L.Dense(10, name="logits"),
    ])  # fmt: skip
    x = np.random.default_rng(0).uniform(0, 1, (256, 12, 12, 1)).astype(np.float32)
    y = np.random.default_rng(1).integers(0, 10, len(x))
    q = ptq_keras.ternarize(model, sparsity=0.5, channel_sparsity=0.25, keep_float=["logits"])
    q.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    q.fit(x, y, epochs=2, batch_size=32, verbose=0)
    path = str(tmp_path / "q.h5")
    q.save(path)
    again = ptq_keras.load_model(path)
    np.testing.assert_allclose(again.predict(x[:8], verbose=0), q.predict(x[:8], verbose=0), atol=1e-5)
    plain = ptq_keras.strip(q, batchnorm_data=x)
    for name, channels in (("conv", 16), ("fc", 24)):
        w = plain.get_layer(name).get_weights()[0].reshape(-1, channels)
        dead = ~w.any(axis=0)
        assert dead.sum() == ternary.dead_count(0.25, channels)
        live = w[:, ~dead]
        # the ternary sparsity applies to the live channels
        assert np.mean(live == 0) == pytest.approx(0.5, abs=0.02)
    result = _export_and_check(plain, x, tmp_path / "export")
    rep = result.report.targets["micro"]
    assert {row["channels"]: row["removed"] for row in rep.dead_channels} == {16: 4, 24: 6}
    assert rep.macs <= 0.8 * rep.macs_unreduced  # at least 20% fewer multiply-accumulates
    # the same encoding of the unreduced int8 file, as the micro target wrote it before channels were removed
    int8 = open(result.files["int8"], "rb").read()
    unreduced = trim_for_tflm(decode.compress(int8, encoding="huffman"))
    assert rep.file_bytes < len(unreduced)
    with pytest.raises(ValueError, match="channel_sparsity must be a fraction in"):
        ptq_keras.ternarize(model, channel_sparsity=1.0)


def test_output_layers_keep_their_channels_unless_asked(capsys):
    """Dead output channels of the last layer would be dead classes: channel_sparsity skips it, with a note."""
    model = tm.build("cnn")
    output = model.layers[-1].name

    def channel_sparsity(q):
        return {layer.layer.name: layer.quantize_config.options["channel_sparsity"]
                for layer in q.layers if hasattr(layer, "quantize_config")}  # fmt: skip

    got = channel_sparsity(ptq_keras.ternarize(model, channel_sparsity=0.25))
    assert got[output] == 0.0 and all(v == 0.25 for name, v in got.items() if name != output)
    assert f"channel_sparsity is not applied to ['{output}']" in capsys.readouterr().out
    forced = channel_sparsity(ptq_keras.ternarize(model, channel_sparsity=0.25,
                                                  overrides={output: {"channel_sparsity": 0.2}}))  # fmt: skip
    assert forced[output] == 0.2
