"""TFLM_DECODE encoders: byte layouts, reference decoders that mirror the runtime, and runtime probes with
negative controls (a wrong bit order or word order must fail)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from decode_support import ref_huffman, ref_lut, ref_prune, runtime_decode
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ptq_keras.tflite import encoders
from ptq_keras.tflite.encoders import ChannelLayout, HuffmanEncoder, LutEncoder, PruneEncoder

LUT, HUFFMAN, PRUNE = LutEncoder(), HuffmanEncoder(), PruneEncoder()
WORKED = np.array([0, 127, 0, 0, -127, 0, 0, 0, 127, 0], dtype=np.int8)


def _swap_words(data: bytes) -> bytes:
    """Little-endian instead of big-endian 32-bit words."""
    return np.frombuffer(data, dtype=">u4").astype("<u4").tobytes()


def _reverse_bits(data: bytes) -> bytes:
    """LSB-first instead of MSB-first within each byte."""
    return np.packbits(np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")).tobytes()


def _entropy(values: np.ndarray) -> float:
    _, counts = np.unique(values, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


# ----------------------------------------------------------------------------- byte layouts
def test_huffman_worked_example_one_bit_root_matches_the_documented_bytes():
    enc = HUFFMAN.encode(WORKED, ChannelLayout())
    assert enc.ancillary[:6] == bytes([1, 1, 0, 0, 1, 0x00])
    assert enc.ancillary[6:16] == bytes(10)
    assert np.frombuffer(enc.ancillary[16:], "<u2").tolist() == [0x8800, 0x0001, 0x8881, 0x887F]
    assert enc.data[:4] == bytes([0x64, 0x30, 0x00, 0x00])
    assert len(enc.data) % 4 == 0 and len(enc.data) >= 8  # padded words + the guard word


def test_huffman_worked_example_two_bit_root_matches_the_documented_bytes():
    enc = HuffmanEncoder(one_bit_root_probability=1.1).encode(WORKED, ChannelLayout())
    assert enc.ancillary[:6] == bytes([1, 1, 0, 0, 1, 0x10])
    assert np.frombuffer(enc.ancillary[16:], "<u2").tolist() == [0x8800, 0x8800, 0x9081, 0x907F]
    assert enc.data[:4] == bytes([0x64, 0x30, 0x00, 0x00])


def test_huffman_root_width_follows_the_most_frequent_value():
    half = np.array([0, 0, 5, -5] * 8, dtype=np.int8)  # p(0) = 0.5: codes {1, 2, 2}, 2-bit root
    assert HUFFMAN.encode(half, ChannelLayout()).ancillary[5] >> 4 == 2 - 1
    sparse = np.array([0, 0, 0, 0, 0, 0, 0, 5, -5, 0] * 4, dtype=np.int8)  # p(0) = 0.8: 1-bit root
    assert HUFFMAN.encode(sparse, ChannelLayout()).ancillary[5] >> 4 == 0


def test_lut_header_tables_and_msb_first_indices():
    values = np.array([[-5, 0, 5, 0], [7, 7, -7, 0]], dtype=np.int8)
    enc = LUT.encode(values, ChannelLayout(2, 0, (0, 0)))
    assert enc.ancillary[:7] == bytes([0, 1, 0, 0, 1, (0 << 4) | 2, 3])
    assert np.frombuffer(enc.ancillary[16:], np.int8).tolist() == [-5, 0, 5, -7, 0, 7]
    # indices 0 1 2 1 | 2 2 0 1 -> 00 01 10 01 | 10 10 00 01
    assert enc.data == bytes([0b00011001, 0b10100001])
    single = LUT.encode(np.array([1, -1, 0], dtype=np.int8), ChannelLayout())
    assert single.ancillary[5] == (15 << 4) | 2  # axis 15: one table


def test_prune_bitmap_and_values_in_memory_order():
    values = np.array([0, 3, 0, 0, -2, 0, 0, 0, 9], dtype=np.int8)
    enc = PRUNE.encode(values, ChannelLayout())
    assert enc.ancillary[:5] == bytes([2, 1, 0, 0, 1]) and enc.ancillary[5:16] == bytes(11)
    assert np.frombuffer(enc.ancillary[16:], np.int8).tolist() == [3, -2, 9]
    assert enc.data == bytes([0b01001000, 0b10000000])


def test_prune_fill_values_follow_per_channel_zero_points_on_the_last_axis():
    layout = ChannelLayout(3, 1, (0, 5, -4))
    values = np.array([[0, 5, -4], [1, 5, 7]], dtype=np.int8)
    enc = PRUNE.encode(values, layout)
    assert np.frombuffer(enc.ancillary[16:], np.int8).tolist() == [1, 7]
    np.testing.assert_array_equal(ref_prune(enc.data, enc.ancillary, values.shape, layout), values)


def test_lut_error_names_the_channel_and_the_fix():
    values = np.arange(10, dtype=np.int8).reshape(2, 5)
    with pytest.raises(encoders.EncodingError, match=r"channel 0 has 5 distinct values.*huffman"):
        LUT.encode(values, ChannelLayout(2, 0, (0, 0)))


def test_unknown_encoder_lists_the_choices():
    with pytest.raises(ValueError, match=r"unknown encoding 'zip'.*huffman.*lut.*prune"):
        encoders.get("zip")


def test_huffman_forced_32bit_entries_and_deep_trees_use_sub_tables():
    rng = np.random.default_rng(3)
    values = np.clip(np.round(rng.laplace(0, 6, size=3000)), -128, 127).astype(np.int8)
    enc = HuffmanEncoder(max_root_bits=3, max_sub_bits=2, table32=True).encode(values, ChannelLayout())
    assert enc.ancillary[5] == ((3 - 1) << 4) | 1
    np.testing.assert_array_equal(ref_huffman(enc.data, enc.ancillary, values.size), values)
    np.testing.assert_array_equal(runtime_decode(enc, values, ChannelLayout()), values)


# ----------------------------------------------------------------------------- properties
@st.composite
def tensors(draw, max_side: int = 6):
    """(values, layout): random shape, channel axis, zero points, sparsity and symbol distribution."""
    rank = draw(st.integers(1, 4))
    shape = tuple(draw(st.lists(st.integers(1, max_side), min_size=rank, max_size=rank)))
    kind = draw(st.sampled_from(["one", "first", "last"]))
    channels = {"one": 1, "first": shape[0], "last": shape[-1]}[kind]
    axis = rank - 1 if kind == "last" and channels > 1 else 0
    if draw(st.booleans()):
        zero_points = tuple(draw(st.lists(st.integers(-128, 127), min_size=channels, max_size=channels)))
    else:
        zero_points = (0,) * channels
    layout = ChannelLayout(channels, axis, zero_points)
    seed = draw(st.integers(0, 2**32 - 1))
    sparsity = draw(st.floats(0.0, 1.0))
    symbols = draw(st.sampled_from(["ternary", "few", "wide"]))
    rng = np.random.default_rng(seed)
    count = int(np.prod(shape))
    channel = layout.channel_of(count)
    fill = layout.fill_values(count).astype(np.int64)
    if symbols == "ternary":
        alpha = rng.integers(1, 128, size=channels)[channel]
        other = rng.choice([-1, 1], size=count) * alpha
    elif symbols == "few":
        other = rng.choice(rng.integers(-128, 128, size=3), size=count)
    else:
        other = np.round(rng.laplace(0, rng.uniform(1, 40), size=count))
    values = np.where(rng.random(count) < sparsity, fill, other)
    return np.clip(values, -128, 127).astype(np.int8).reshape(shape), layout


def _lut_capacity_ok(values: np.ndarray, layout: ChannelLayout) -> bool:
    return max(len(np.unique(row)) for row in layout.by_channel(values.reshape(-1))) <= 4


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=tensors())
def test_every_encoder_round_trips_through_the_runtime_mirroring_reference(case):
    values, layout = case
    count = values.size
    flat = values.reshape(-1)
    if _lut_capacity_ok(values, layout):
        enc = LUT.encode(values, layout)
        np.testing.assert_array_equal(ref_lut(enc.data, enc.ancillary, values.shape, layout), values)
        np.testing.assert_array_equal(LUT.decode(enc.data, enc.ancillary, count, layout), flat)
        assert len(enc.data) == math.ceil(2 * count / 8)
    else:
        with pytest.raises(encoders.EncodingError, match="distinct values"):
            LUT.encode(values, layout)
    enc = PRUNE.encode(values, layout)
    np.testing.assert_array_equal(ref_prune(enc.data, enc.ancillary, values.shape, layout), values)
    np.testing.assert_array_equal(PRUNE.decode(enc.data, enc.ancillary, count, layout), flat)
    kept = int((flat != layout.fill_values(count)).sum())
    assert enc.payload_bytes == math.ceil(count / 8) + 16 + kept
    enc = HUFFMAN.encode(values, layout)
    np.testing.assert_array_equal(ref_huffman(enc.data, enc.ancillary, count), flat)
    np.testing.assert_array_equal(HUFFMAN.decode(enc.data, enc.ancillary, count, layout), flat)
    # Huffman stays within one bit per weight of the entropy bound (plus words, guard and tables).
    assert 8 * len(enc.data) <= (_entropy(flat) + 1) * count + 8 * 12 + 32


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=tensors(max_side=5))
def test_the_runtime_decodes_every_encoding_bit_exactly(case):
    values, layout = case
    for encoder in (HUFFMAN, PRUNE, HuffmanEncoder(max_root_bits=2, max_sub_bits=1)):
        enc = encoder.encode(values, layout)
        np.testing.assert_array_equal(runtime_decode(enc, values, layout), values)
    if _lut_capacity_ok(values, layout):
        np.testing.assert_array_equal(runtime_decode(LUT.encode(values, layout), values, layout), values)


# ----------------------------------------------------------------------------- negative controls
RNG = np.random.default_rng(7)
PROBE = RNG.choice([-90, 0, 90], size=(6, 40), p=[0.2, 0.5, 0.3]).astype(np.int8)
PROBE_LAYOUT = ChannelLayout(6, 0, (0,) * 6)


@pytest.mark.parametrize("encoder", [LUT, PRUNE, HUFFMAN], ids=lambda e: e.name)
def test_runtime_probe_decodes_right_and_detects_a_wrong_bit_order(encoder):
    enc = encoder.encode(PROBE, PROBE_LAYOUT)
    np.testing.assert_array_equal(runtime_decode(enc, PROBE, PROBE_LAYOUT), PROBE)
    wrong = encoders.Encoded(enc.encoding, _reverse_bits(enc.data), enc.ancillary)
    assert not np.array_equal(runtime_decode(wrong, PROBE, PROBE_LAYOUT), PROBE)


def test_runtime_probe_detects_little_endian_huffman_words():
    enc = HUFFMAN.encode(PROBE, PROBE_LAYOUT)
    wrong = encoders.Encoded(enc.encoding, _swap_words(enc.data), enc.ancillary)
    assert not np.array_equal(runtime_decode(wrong, PROBE, PROBE_LAYOUT), PROBE)
    assert not np.array_equal(ref_huffman(wrong.data, wrong.ancillary, PROBE.size), PROBE.reshape(-1))


def test_runtime_probe_detects_a_single_table_on_a_per_channel_tensor():
    enc = LUT.encode(PROBE, ChannelLayout())  # one table read as six per-channel tables: the documented trap
    assert not np.array_equal(runtime_decode(enc, PROBE, PROBE_LAYOUT), PROBE)
    np.testing.assert_array_equal(runtime_decode(LUT.encode(PROBE, PROBE_LAYOUT), PROBE, PROBE_LAYOUT), PROBE)


def test_runtime_rejects_one_channel_on_the_last_axis():
    values = PROBE.reshape(1, 2, 3, 40)
    layout = ChannelLayout(1, 3, (0,))
    enc = LUT.encode(values, layout)
    with pytest.raises(RuntimeError):
        runtime_decode(enc, values, layout)
    np.testing.assert_array_equal(runtime_decode(enc, values, ChannelLayout(1, 0, (0,))), values)


@pytest.mark.parametrize("axis", [0, 3], ids=["first-axis", "last-axis"])
def test_lut_one_shared_table_with_stride_zero_decodes_every_channel_on_the_runtime(axis):
    rng = np.random.default_rng(11)
    shape = [4, 3, 3, 4] if axis == 0 else [1, 3, 3, 4]
    values = (rng.choice([-1, 0, 1], size=shape, p=[0.2, 0.6, 0.2]) * 90).astype(np.int8)
    if axis == 0:
        values[1] = np.abs(values[1])  # a channel without -90 still reads the shared table
    else:
        values[..., 2] = np.abs(values[..., 2])
    layout = ChannelLayout(4, axis, (0,) * 4)
    enc = LUT.encode(values, layout)
    assert enc.ancillary[6] == 0 and np.frombuffer(enc.ancillary[16:], np.int8).tolist() == [-90, 0, 90]
    np.testing.assert_array_equal(runtime_decode(enc, values, layout), values)
    np.testing.assert_array_equal(ref_lut(enc.data, enc.ancillary, shape, layout), values)
    np.testing.assert_array_equal(LUT.decode(enc.data, enc.ancillary, values.size, layout), values.reshape(-1))
