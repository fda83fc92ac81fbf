"""decode.compress on whole int8 models: bit-exact with the int8 file on TFLM for every encoding
(conv, depthwise on the last axis, fully connected, the 1-channel axis trap), the identity-FC probe with
negative controls, "auto" and its latency budget, describe(), and clear errors."""

from __future__ import annotations

import numpy as np
import pytest
from decode_support import identity_fc_model, make_ternary, random_inputs, run_tflm, to_int8

from ptq_keras.compat import keras, tfmot
from ptq_keras.tflite import decode, flatbuffer

ENCODINGS = ["lut", "huffman", "prune", "auto"]


@pytest.fixture(scope="module")
def ternary_cnn() -> bytes:
    """Conv2D -> DepthwiseConv2D (multiplier 2, channel = last axis) -> Dense -> Dense, ternary kernels."""
    keras.utils.set_random_seed(1)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2, activation="relu")(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(24, activation="relu")(x)
    model = keras.Model(inputs, keras.layers.Dense(10)(x))
    rng = np.random.default_rng(1)
    make_ternary(model, rng, sparsity=0.7)
    return to_int8(model, rng)


@pytest.fixture(scope="module")
def one_channel_depthwise() -> bytes:
    """A depthwise conv with one channel: per-channel quantization with one scale on axis 3 (the trap)."""
    keras.utils.set_random_seed(2)
    model = keras.Sequential(
        [
            keras.Input((6, 6, 1)),
            keras.layers.DepthwiseConv2D(3, padding="same"),
            keras.layers.Conv2D(4, 3),
            keras.layers.Flatten(),
            keras.layers.Dense(5),
        ]
    )
    rng = np.random.default_rng(2)
    make_ternary(model, rng, sparsity=0.5)
    return to_int8(model, rng)


@pytest.fixture(scope="module")
def magnitude_pruned(magnitude_pruned_keras) -> bytes:
    """A tfmot magnitude-pruned (80%) Dense model, int8: many distinct values per channel, not ternary."""
    return to_int8(magnitude_pruned_keras, np.random.default_rng(3))


@pytest.fixture(scope="module")
def magnitude_pruned_keras():
    """The stripped tfmot magnitude-pruned (80%) Dense model."""
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((32,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(4)])
    schedule = tfmot.sparsity.keras.ConstantSparsity(0.8, begin_step=0, frequency=1)
    pruned = tfmot.sparsity.keras.prune_low_magnitude(model, pruning_schedule=schedule)
    pruned.compile(optimizer="sgd", loss="mse")
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(64, 32)).astype("float32"), rng.normal(size=(64, 4)).astype("float32")
    pruned.fit(x, y, batch_size=32, epochs=1, verbose=0, callbacks=[tfmot.sparsity.keras.UpdatePruningStep()])
    return tfmot.sparsity.keras.strip_pruning(pruned)


def _assert_bit_exact(int8: bytes, compressed: bytes, seed: int = 0, **kwargs) -> None:
    inputs = random_inputs(int8, np.random.default_rng(seed))
    expected = run_tflm(int8, inputs)
    for got, want in zip(run_tflm(compressed, inputs, **kwargs), expected):
        np.testing.assert_array_equal(got, want)


def _weight_count(buf: bytes) -> int:
    model = flatbuffer.read(buf)
    names = {"FULLY_CONNECTED", "CONV_2D", "DEPTHWISE_CONV_2D"}
    graph = model.subgraphs[0]
    return len({int(op.inputs[1]) for op in graph.operators if flatbuffer.builtin_name(model, op.opcodeIndex) in names})


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_compressed_cnn_is_bit_exact_with_int8_on_tflm(ternary_cnn, encoding):
    compressed = decode.compress(ternary_cnn, encoding=encoding)
    _assert_bit_exact(ternary_cnn, compressed)
    rows = decode.describe(compressed)
    assert len(rows) == _weight_count(ternary_cnn) == 4
    if encoding != "auto":
        assert {r["encoding"] for r in rows} == {encoding}
    assert len(compressed) < len(ternary_cnn)


def test_decoded_tensors_can_live_outside_the_arena(ternary_cnn):
    compressed = decode.compress(ternary_cnn, encoding="huffman")
    largest = max(r["decode_scratch_bytes"] for r in decode.describe(compressed))
    _assert_bit_exact(ternary_cnn, compressed, alt_decompression_memory_size=largest + 64)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_one_channel_depthwise_gets_axis_zero_and_stays_bit_exact(one_channel_depthwise, encoding):
    model = flatbuffer.read(one_channel_depthwise)
    axes = [t.quantization.quantizedDimension for t in model.subgraphs[0].tensors
            if t.quantization is not None and t.quantization.scale is not None and len(t.shape) == 4
            and t.type == flatbuffer.schema.TensorType.INT8 and flatbuffer.buffer_array(model, t) is not None]
    assert 3 in axes, "the converter should emit the 1-channel depthwise weight on axis 3 (the trap under test)"
    _assert_bit_exact(one_channel_depthwise, decode.compress(one_channel_depthwise, encoding=encoding), seed=1)


def test_graph_shape_pairs_encoded_and_ancillary_and_clears_stale_quantization(ternary_cnn):
    compressed = decode.compress(ternary_cnn, encoding="lut")
    model = flatbuffer.read(compressed)
    graph = model.subgraphs[0]
    ops = graph.operators
    decodes = [i for i, op in enumerate(ops) if flatbuffer.builtin_name(model, op.opcodeIndex) == "TFLM_DECODE"]
    assert len(decodes) == 4
    for i in decodes:
        op, consumer = ops[i], ops[i + 1]
        encoded, ancillary = (graph.tensors[int(t)] for t in op.inputs)
        decoded = graph.tensors[int(op.outputs[0])]
        assert int(op.outputs[0]) == int(consumer.inputs[1])
        assert encoded.type == ancillary.type == flatbuffer.schema.TensorType.UINT8
        assert encoded.quantization is None and ancillary.quantization is None
        assert ancillary.name.decode() == encoded.name.decode() + "_ancillary"
        assert decoded.buffer == 0 or flatbuffer.buffer_array(model, decoded) is None
        channels = len(decoded.quantization.scale)
        anc = flatbuffer.buffer_array(model, ancillary).tobytes()
        # a ternary layer's values {-127, 0, 127} fit one table: stride 0, shared by every channel
        assert channels > 1 and anc[6] == 0 and list(np.frombuffer(anc[16:], np.int8)) == [-127, 0, 127]
        assert anc[5] >> 4 == decoded.quantization.quantizedDimension


@pytest.mark.parametrize("per_channel", [True, False], ids=["per-channel", "per-tensor"])
def test_identity_fc_probe_reads_the_weights_back_and_catches_wrong_bit_or_word_order(per_channel):
    rng = np.random.default_rng(5)
    alpha = rng.integers(20, 127, size=(6, 1)) if per_channel else 90
    weights = (rng.choice([-1, 0, 1], size=(6, 16), p=[0.2, 0.6, 0.2]) * alpha).astype(np.int8)
    int8 = identity_fc_model(weights, per_channel)
    eye = [np.eye(16, dtype=np.int8)]
    np.testing.assert_array_equal(run_tflm(int8, eye)[0], weights.T)
    for encoding in ("lut", "huffman", "prune"):
        compressed = decode.compress(int8, encoding=encoding)
        np.testing.assert_array_equal(run_tflm(compressed, eye)[0], weights.T)
        model = flatbuffer.read(compressed)
        graph = model.subgraphs[0]
        encoded = graph.tensors[int(graph.operators[0].inputs[0])]
        data = flatbuffer.buffer_array(model, encoded)
        if encoding == "huffman":
            wrong = data.view(">u4").astype("<u4").view(np.uint8)  # little-endian words
        else:
            wrong = np.packbits(np.unpackbits(data, bitorder="little"))  # LSB-first bits
        model.buffers[encoded.buffer].data = wrong
        assert not np.array_equal(run_tflm(flatbuffer.write(model), eye)[0], weights.T), encoding


def test_auto_is_never_larger_than_lut(ternary_cnn):
    lut, auto = decode.compress(ternary_cnn, encoding="lut"), decode.compress(ternary_cnn, encoding="auto")
    assert len(auto) <= len(lut)
    by_name = {r["name"]: r for r in decode.describe(lut)}
    for row in decode.describe(auto):
        assert row["payload_bytes"] <= by_name[row["name"]]["payload_bytes"]
        assert row["bits_per_weight"] >= row["entropy_bound_bits"] * 0.99 or row["encoding"] != "huffman"


def test_latency_budget_puts_fully_connected_layers_on_lut(ternary_cnn):
    compressed = decode.compress(ternary_cnn, encoding="auto", latency_budget=0.25)
    _assert_bit_exact(ternary_cnn, compressed)
    rows = {r["name"]: r["encoding"] for r in decode.describe(compressed)}
    fc = [name for name in rows if "dense" in name]
    conv = [name for name in rows if "conv" in name]
    assert fc and all(rows[name] == "lut" for name in fc)
    assert any(rows[name] != "lut" for name in conv)  # 64 output pixels reuse each conv weight


def test_describe_reports_sizes_against_the_entropy_bound(ternary_cnn):
    rows = decode.describe(decode.compress(ternary_cnn, encoding="huffman"))
    for row in rows:
        assert set(row) == {"name", "encoding", "shape", "elements", "payload_bytes", "bits_per_weight",
                            "entropy_bound_bits", "decode_scratch_bytes"}
        assert row["elements"] == int(np.prod(row["shape"])) == row["decode_scratch_bytes"]
        assert 0 < row["entropy_bound_bits"] <= np.log2(3) + 1e-9  # ternary: at most log2(3) bits
        assert row["bits_per_weight"] == pytest.approx(8 * row["payload_bytes"] / row["elements"])
    big = max(rows, key=lambda r: r["elements"])
    assert big["bits_per_weight"] < big["entropy_bound_bits"] + 1
    assert decode.describe(ternary_cnn) == []


def test_magnitude_pruned_int8_model_prune_and_huffman_bit_exact_lut_refused(magnitude_pruned):
    for encoding in ("prune", "huffman", "auto"):
        _assert_bit_exact(magnitude_pruned, decode.compress(magnitude_pruned, encoding=encoding), seed=3)
    with pytest.raises(ValueError, match=r"tensor '.*dense.*' \[16, 32\] cannot be encoded as 'lut'.*distinct values"):
        decode.compress(magnitude_pruned, encoding="lut")


def test_micro_target_encodes_a_magnitude_pruned_keras_model(magnitude_pruned_keras, tmp_path):
    """Target micro with huffman/prune/auto takes any int8 model (a pruning baseline gets entropy-coded bytes);
    with the 2-bit LUT it still needs ternary kernels and names the layer."""
    from ptq_keras import tflite as ptq_tflite

    x = np.random.default_rng(4).normal(size=(32, 32)).astype("float32")
    int8 = ptq_tflite.convert(magnitude_pruned_keras, x)
    for encoding in ("prune", "huffman", "auto"):
        micro = ptq_tflite.convert(magnitude_pruned_keras, x, target="micro", encoding=encoding)
        assert len(micro) < len(int8)
        assert {row["encoding"] for row in decode.describe(micro)} <= {"prune", "huffman"}
        _assert_bit_exact(int8, micro, seed=4)
    with pytest.raises(ptq_tflite.ExportError, match=r"layer 'dense.*': kernel channel \d+ is not ternary"):
        ptq_tflite.convert(magnitude_pruned_keras, x, target="micro")
    result = ptq_tflite.export(
        magnitude_pruned_keras, x, tmp_path, targets=("int8", "micro"), encoding="auto", measure=False
    )
    assert result.report.targets["micro"].file_bytes < result.report.targets["int8"].file_bytes


def test_bad_arguments_name_the_problem(ternary_cnn):
    with pytest.raises(ValueError, match=r"unknown encoding 'zip'.*'auto', 'lut', 'huffman', 'prune'"):
        decode.compress(ternary_cnn, encoding="zip")
    with pytest.raises(ValueError, match="latency_budget applies to encoding='auto' only"):
        decode.compress(ternary_cnn, encoding="lut", latency_budget=0.1)
    with pytest.raises(ValueError, match="latency_budget must be a number >= 0"):
        decode.compress(ternary_cnn, encoding="auto", latency_budget=-1)
    with pytest.raises(flatbuffer.FlatbufferError, match="not a TensorFlow Lite file"):
        decode.compress(b"not a model at all", encoding="lut")


def test_compressing_twice_changes_nothing(ternary_cnn):
    once = decode.compress(ternary_cnn, encoding="huffman")
    twice = decode.compress(once, encoding="lut")
    assert decode.describe(twice) == decode.describe(once)


def test_every_buffer_of_a_compressed_file_is_16_byte_aligned(ternary_cnn):
    compressed = decode.compress(ternary_cnn, encoding="huffman")  # the decoder reads 32-bit words
    base = np.frombuffer(compressed, dtype=np.uint8)
    root = flatbuffer.schema.Model.GetRootAs(compressed, 0)
    start = base.__array_interface__["data"][0]
    offsets = []
    for i in range(root.BuffersLength()):
        data = root.Buffers(i).DataAsNumpy()
        if not isinstance(data, int) and data.size:
            offsets.append(data.__array_interface__["data"][0] - start)
    assert offsets and all(offset % 16 == 0 for offset in offsets), offsets


def test_auto_leaves_a_tensor_plain_int8_where_no_encoding_is_smaller():
    from ptq_keras.tflite.encoders import ChannelLayout

    rng = np.random.default_rng(7)
    small = rng.integers(-127, 128, size=(3, 3, 12)).astype(np.int8)  # a 3x3 depthwise kernel kept int8
    layout = ChannelLayout(12, 2, (0,) * 12)
    assert decode._choose(small, layout, small.size, None) is None
    assert decode.auto_bytes(small, layout) == small.size
    ternary = (rng.integers(-1, 2, size=(64, 64)) * 127).astype(np.int8)
    chosen = decode._choose(ternary, ChannelLayout(64, 0, (0,) * 64), ternary.size, None)
    assert chosen is not None and chosen.payload_bytes + decode.DECODE_OVERHEAD_BYTES < ternary.size
    assert decode.auto_bytes(ternary, ChannelLayout(64, 0, (0,) * 64)) == chosen.payload_bytes


def test_decode_overhead_bound_holds_on_a_slimmed_micro_file():
    """What encoding one tensor costs beyond its payload, measured on an exported file: leaving the largest weight
    plain int8 grows the file by its int8 bytes less its payload less that overhead."""
    import importlib

    import tflite_models as tm

    conv = importlib.import_module("ptq_keras.tflite.convert")
    model = tm.build("cnn")
    prep = conv.prepare(model, tm.inputs(model, 16), 16)
    sizes, payloads = [], []
    for keep in (0, 1):
        buf = conv.convert_micro(prep.with_options(keep_int8=keep)).tflite
        sizes.append(len(buf))
        payloads.append(sorted(row["payload_bytes"] for row in decode.describe(buf)))
    int8_bytes = max(int(np.prod(model.get_layer(n).kernel.shape)) for n in ("conv1", "conv2", "logits"))
    payload = sum(payloads[0]) - sum(payloads[1])
    overhead = int8_bytes - payload - (sizes[1] - sizes[0])
    assert -16 <= overhead <= 48, (overhead, sizes, int8_bytes, payload)  # 0-46 B measured on the zoo models
