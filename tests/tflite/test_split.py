"""``max_decode_bytes``: large weights split along output channels, bit-exact with ``int8`` on TFLM, with a smaller
arena (one decode buffer of at most the bound)."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import tflite_models as tm

from ptq_keras import keras
from ptq_keras import tflite as ptq_tflite
from ptq_keras.tflite import decode, flatbuffer, micro, split

verify_mod = importlib.import_module("ptq_keras.tflite.verify")
L = keras.layers


def _ops(buf: bytes) -> list[str]:
    return ptq_tflite.inspect(buf).ops


def _wide(seed: int = 0) -> keras.Model:
    """Conv 16 channels, depthwise x2 (32 channels), Dense 24 x 40: every weight op can be split."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((8, 8, 3), name="image"),
            L.Conv2D(16, 3, padding="same", activation="relu", name="conv"),
            L.DepthwiseConv2D(3, padding="same", depth_multiplier=2, name="dw"),
            L.BatchNormalization(name="dw_bn"),
            L.ReLU(name="dw_relu"),
            L.GlobalAveragePooling2D(name="gap"),
            L.Dense(40, activation="relu", name="fc"),
            L.Dense(6, name="logits"),
        ],
        name="wide",
    )


@pytest.mark.parametrize("encoding", ["lut", "huffman", "huffman_group"])
@pytest.mark.parametrize("max_bytes", [200, 64])
def test_split_layers_are_bit_exact_with_int8(encoding, max_bytes, tmp_path):
    model = tm.ternarize_kernels(_wide())
    x = tm.inputs(model, 60)
    result = ptq_tflite.export(model, x[:30], tmp_path, targets=("int8", "micro"), encoding=encoding,
                               max_decode_bytes=max_bytes)  # fmt: skip
    parity = ptq_tflite.verify(model, result.files["micro"], x[30:])
    assert parity.ok and parity.steps[-1].max_lsb == 0, str(parity)
    rep = result.report.targets["micro"]
    # conv 16 x 27 = 432 B, depthwise 9 x 32 = 288 B, fc 40 x 16 = 640 B, logits 6 x 40 = 240 B: all over the bound
    assert sorted(row["op"] for row in rep.split) == [
        "CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "FULLY_CONNECTED"
    ]  # fmt: skip
    for row in rep.split:
        per_channel = row["weight_bytes"] // {"CONV_2D": 16, "DEPTHWISE_CONV_2D": 32}.get(row["op"], 1)
        assert row["parts"] >= 2 and row["largest_part_bytes"] <= max(max_bytes, 2 * per_channel)
    ops = _ops(open(result.files["micro"], "rb").read())
    assert "CONCATENATION" in ops and "SPLIT_V" in ops  # the depthwise input is split with its channels
    assert rep.arena_bytes_unsplit > 0  # measured (on a model this small the part activations outweigh it)
    assert f"max_decode_bytes={max_bytes:,}" in result.summary()


def test_one_channel_per_part_and_a_concatenation_tree():
    """A bound below one channel's bytes gives one channel per part; 40 parts need a tree of CONCATENATIONs."""
    model = keras.Sequential([keras.Input((20,)), L.Dense(40, name="fc"), L.Dense(6, name="logits")])
    tm.ternarize_kernels(model)
    x = tm.inputs(model, 40)
    int8 = ptq_tflite.convert(model, x[:20])
    parsed = flatbuffer.read(int8)
    rows = split.split_model(parsed, 1)
    assert [r["parts"] for r in rows] == [40, 6]
    buf = flatbuffer.write(parsed)
    assert _ops(buf).count("CONCATENATION") == 1 + 4 + 1  # 40 -> 4 groups of 10 -> 1; logits: 6 -> 1
    for encoding in ("lut", "prune"):
        encoded = decode.compress(buf, encoding=encoding)
        np.testing.assert_array_equal(
            verify_mod.predict(encoded, x[20:], "tflm"), verify_mod.predict(int8, x[20:], "tflm")
        )


def test_parts_are_even_and_cover_every_channel():
    assert split.parts_of(10, 100, 250) == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]
    assert split.parts_of(7, 100, 10) == [(k, k + 1) for k in range(7)]
    parts = split.parts_of(128, 1600, 16384)
    assert parts[0][0] == 0 and parts[-1][1] == 128 and all(b - a <= 10 for a, b in parts)
    assert all(a1 == b0 for (_, b0), (a1, _) in zip(parts, parts[1:]))


def test_small_weights_and_shared_weights_stay_whole(tmp_path):
    model = tm.build("residual")
    x = tm.inputs(model, 40)
    int8 = ptq_tflite.convert(model, x[:20])
    parsed = flatbuffer.read(int8)
    assert split.split_model(parsed, 10**6) == []
    assert flatbuffer.write(parsed) == flatbuffer.write(flatbuffer.read(int8))


@pytest.mark.parametrize("bad", [0, -5, 1.5, "16k", True])
def test_bad_max_decode_bytes_is_a_clear_error(bad, tmp_path):
    model = tm.build("mlp")
    x = tm.inputs(model, 20)
    with pytest.raises(ValueError, match="max_decode_bytes must be a positive number of bytes"):
        ptq_tflite.convert(model, x, target="micro", max_decode_bytes=bad)
    with pytest.raises(ValueError, match="max_decode_bytes"):
        ptq_tflite.export(model, x, tmp_path / "out", targets=("micro",), max_decode_bytes=bad)
    assert not (tmp_path / "out").exists()


def test_arena_is_bounded_by_the_largest_part():
    """A 200 x 256 Dense (51,200 B): unsplit the arena holds the whole decoded weight, split at 8 KiB at most
    about one part more than the int8 file's arena."""
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((256,)), L.Dense(200, activation="relu"), L.Dense(10)])
    tm.ternarize_kernels(model, sparsity=0.7)
    x = tm.inputs(model, 20)
    int8 = ptq_tflite.convert(model, x)
    whole = ptq_tflite.convert(model, x, target="micro", max_decode_bytes=None)
    parted = ptq_tflite.convert(model, x, target="micro", max_decode_bytes=8192)
    auto = ptq_tflite.convert(model, x, target="micro")  # the default: "auto"
    base = micro.measure_arena(int8)
    assert micro.measure_arena(whole) >= base + 51_200 - 2048  # the planner overlaps the small activations
    assert micro.measure_arena(parted) <= base + 8192 + 4096
    convert_mod = importlib.import_module("ptq_keras.tflite.convert")
    assert convert_mod.auto_decode_bytes(int8) == 16384  # this model's int8 arena is small: the floor
    assert "CONCATENATION" in _ops(auto) and "CONCATENATION" not in _ops(whole)
    assert micro.measure_arena(auto) <= base + 16384 + 4096
    for buf in (parted, auto):
        np.testing.assert_array_equal(verify_mod.predict(buf, x, "tflm"), verify_mod.predict(int8, x, "tflm"))


def test_auto_split_bound_is_half_the_int8_arena_and_leaves_small_models_whole():
    convert_mod = importlib.import_module("ptq_keras.tflite.convert")
    model = tm.build("cnn")
    x = tm.inputs(model, 20)
    int8 = ptq_tflite.convert(model, x)
    total = micro._report_total(micro.allocation_report(int8))
    assert convert_mod.auto_decode_bytes(int8) == max(16384, total // 2 // 1024 * 1024)
    assert "CONCATENATION" not in _ops(ptq_tflite.convert(model, x, target="micro"))
    assert convert_mod.check_max_decode_bytes("auto") == "auto"
    # a ram_budget replaces the automatic bound (an explicit one is a conflict)
    assert convert_mod.check_ram_budget(50_000, "auto") == 50_000


def _two_dense() -> keras.Model:
    """64 -> 512 -> 256 -> 10: a 131,072 B and a 32,768 B weight whose decode buffers dominate the arena."""
    keras.utils.set_random_seed(2)
    model = keras.Sequential([keras.Input((64,)), L.Dense(512, activation="relu", name="fc1"),
                              L.Dense(256, activation="relu", name="fc2"), L.Dense(10, name="logits")])  # fmt: skip
    return tm.ternarize_kernels(model, sparsity=0.7)


@pytest.mark.slow
def test_ram_budget_chooses_the_split_and_then_int8_weights(tmp_path):
    """``ram_budget``: the first candidate whose measured arena fits is taken (a split when that suffices, the
    largest weights kept plain int8 when even the split parts' bookkeeping is too much); bit-exact either way."""
    model = _two_dense()
    x = tm.inputs(model, 40)
    plain = ptq_tflite.export(model, x[:20], tmp_path / "plain", targets=("int8", "micro"), encoding="huffman",
                              max_decode_bytes=None)  # fmt: skip
    unsplit, int8_arena = plain.report.targets["micro"].arena_bytes, plain.report.targets["int8"].arena_bytes
    assert unsplit > int8_arena + 131_072 - 4096  # the whole decoded fc2 weight is in the arena

    # Between the int8 arena plus one split part and the unsplit arena: a split meets it, no weight stays int8.
    budget = int8_arena + 40_000
    result = ptq_tflite.export(model, x[:20], tmp_path / "split", targets=("int8", "micro"), encoding="huffman",
                               ram_budget=budget)  # fmt: skip
    rep = result.report.targets["micro"]
    assert rep.ram_budget == budget and rep.keep_int8 == 0 and rep.max_decode_bytes is not None
    assert rep.arena_bytes <= budget and rep.split
    assert all(arena > budget for _, _, arena in rep.ram_fit[:-1]) and rep.ram_fit[-1][2] <= budget
    assert "ram_budget=" in result.report.summary()
    parity = ptq_tflite.verify(model, result.files["micro"], x[20:])
    assert parity.ok and parity.steps[-1].max_lsb == 0, str(parity)

    # Just above the int8 file's own arena: only weights kept int8 (no decode buffer) get there; more flash.
    budget = int8_arena + 1024
    result = ptq_tflite.export(model, x[:20], tmp_path / "keep", targets=("int8", "micro"), encoding="huffman",
                               ram_budget=budget, c_array=True)  # fmt: skip
    rep = result.report.targets["micro"]
    assert rep.keep_int8 >= 1 and rep.arena_bytes <= budget
    assert rep.file_bytes > plain.report.targets["micro"].file_bytes
    assert f"_arena_size = {rep.arena_bytes}" in open(result.files["c_header"]).read() + open(
        result.files["c_source"]).read()  # fmt: skip
    parity = ptq_tflite.verify(model, result.files["micro"], x[20:])
    assert parity.ok and parity.steps[-1].max_lsb == 0, str(parity)
    # convert gives the same file
    again = ptq_tflite.convert(model, x[:20], target="micro", encoding="huffman", ram_budget=budget)
    assert again == open(result.files["micro"], "rb").read()


def test_impossible_or_misused_ram_budget_is_a_clear_error(tmp_path):
    model = _two_dense()
    x = tm.inputs(model, 20)
    with pytest.raises(ptq_tflite.ExportError, match=r"ram_budget=1,000 B cannot be met: the smallest TFLM arena"):
        ptq_tflite.export(model, x, tmp_path / "out", targets=("micro",), encoding="huffman", ram_budget=1000)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    with pytest.raises(ValueError, match="not both"):
        ptq_tflite.convert(model, x, target="micro", ram_budget=50_000, max_decode_bytes=8192)
    with pytest.raises(ValueError, match="applies to target 'micro'"):
        ptq_tflite.convert(model, x, target="int8", ram_budget=50_000)
    with pytest.raises(ValueError, match="applies to target 'micro'"):
        ptq_tflite.export(model, x, tmp_path / "o2", targets=("int8",), ram_budget=50_000)
    with pytest.raises(ValueError, match="ram_budget must be a positive number of bytes"):
        ptq_tflite.convert(model, x, target="micro", ram_budget=-1)
