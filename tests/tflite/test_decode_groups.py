"""Encoding ``huffman_group``: Huffman over groups of four weights, rebuilt with CAST / GATHER / RESHAPE on TFLM.

Runtime probes read the weights back through a FULLY_CONNECTED with identity input (with negative controls: a
swapped group table or reordered groups must fail), property tests over shapes and sparsities (padding
included), whole models bit-exact with ``int8`` on TFLM, sizes, ``auto`` and the reader's checks."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import tflite_models as tm
from decode_support import identity_fc_model, run_tflm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ptq_keras import tflite as ptq_tflite
from ptq_keras.tflite import decode, flatbuffer, groups, report

verify_mod = importlib.import_module("ptq_keras.tflite.verify")


def _ternary(shape, sparsity: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    p = [(1 - sparsity) / 2, sparsity, (1 - sparsity) / 2]
    return (rng.choice([-1, 0, 1], size=shape, p=p) * 127).astype(np.int8)


def _grouped_fc(weights: np.ndarray, edit=None) -> bytes:
    """``identity_fc_model(weights)`` with its weight tensor grouped (``edit(model, grouped)`` may damage it)."""
    model = flatbuffer.read(identity_fc_model(weights))
    grouped = groups.encode(weights)
    if edit is not None:
        grouped = edit(grouped)
    groups.insert(model, 0, 1, grouped, decode._decode_opcode(model))
    flatbuffer.drop_unreferenced_buffers(model)
    return flatbuffer.write(model)


def _read_back(buf: bytes, in_ch: int) -> np.ndarray:
    return run_tflm(buf, [np.eye(in_ch, dtype=np.int8)], arena_size=64 * 1024 + 16 * in_ch * in_ch)[0].T


@pytest.mark.parametrize("shape", [(16, 32), (6, 9), (3, 5)], ids=["aligned", "padded", "tiny-padded"])
def test_runtime_reads_the_grouped_weights_back(shape):
    weights = _ternary(shape, 0.7)
    buf = _grouped_fc(weights)
    np.testing.assert_array_equal(_read_back(buf, shape[1]), weights)
    ops = ptq_tflite.inspect(buf).ops
    padded = weights.size % 4 != 0
    expected = ["TFLM_DECODE", "CAST", "GATHER"] + (["RESHAPE", "SLICE"] if padded else []) + ["RESHAPE"]
    assert ops == expected + ["FULLY_CONNECTED"]


def test_runtime_probe_catches_a_swapped_table_and_reordered_groups():
    weights = _ternary((16, 32), 0.6, seed=3)

    def swap_rows(g):
        table = g.table.copy()
        table[[0, 1]] = table[[1, 0]]
        return groups.GroupEncoded(g.encoded, table, g.count)

    def reverse_groups(g):
        rows = np.asarray(weights).reshape(-1, 4)[::-1].reshape(-1)
        return groups.GroupEncoded(groups.encode(rows).encoded, groups.encode(rows).table, g.count)

    for damage in (swap_rows, reverse_groups):
        out = _read_back(_grouped_fc(weights, damage), 32)
        assert not np.array_equal(out, weights), damage.__name__


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    out_ch=st.integers(1, 12),
    in_ch=st.integers(1, 24),
    sparsity=st.sampled_from([0.0, 0.5, 0.85, 0.95, 1.0]),
    seed=st.integers(0, 1000),
)
def test_grouped_weights_round_trip_on_the_runtime_and_in_numpy(out_ch, in_ch, sparsity, seed):
    weights = _ternary((out_ch, in_ch), sparsity, seed)
    grouped = groups.encode(weights)
    assert len(grouped.table) <= 81 and grouped.groups == -(-weights.size // 4)
    ref = groups.decode(grouped.encoded.data, grouped.encoded.ancillary, grouped.table, grouped.count)
    np.testing.assert_array_equal(ref, weights.reshape(-1))
    np.testing.assert_array_equal(_read_back(_grouped_fc(weights), in_ch), weights)


def test_more_than_128_distinct_groups_is_a_clear_error():
    values = np.random.default_rng(0).integers(-127, 128, size=(64, 16)).astype(np.int8)
    with pytest.raises(groups.encoders.EncodingError, match="distinct groups of 4 weights"):
        groups.encode(values)
    keras = tm.keras
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(32, name="float_dense")])  # not ternary
    x = tm.inputs(model, 24)
    with pytest.raises(ptq_tflite.ExportError, match="float_dense.*cannot be encoded as 'huffman_group'"):
        ptq_tflite.convert(model, x, target="micro", encoding="huffman_group")


@pytest.mark.parametrize("name", tuple(tm.BUILDERS))
def test_whole_models_are_bit_exact_with_int8_on_tflm(name, tmp_path):
    model = tm.build(name)
    x = tm.inputs(model, 60)
    result = ptq_tflite.export(model, x[:30], tmp_path, targets=("int8", "micro"), encoding="huffman_group",
                               measure=False)  # fmt: skip
    parity = ptq_tflite.verify(model, result.files["micro"], x[30:])
    assert parity.ok, str(parity)
    assert parity.steps[-1].max_lsb == 0 and parity.steps[-1].runtime == "tflm"
    rows = result.report.targets["micro"].encodings
    assert rows and {r["encoding"] for r in rows} == {"huffman_group"}
    payload = report.weight_payload(open(result.files["micro"], "rb").read())
    assert payload["weights"] == report.weight_payload(open(result.files["int8"], "rb").read())["weights"]
    assert payload["weight_payload_bytes"] == sum(r["payload_bytes"] for r in rows)


def _big_fc(sparsity: float) -> bytes:
    """An int8 FULLY_CONNECTED with a 256 x 512 ternary weight (131,072 weights)."""
    return identity_fc_model(_ternary((256, 512), sparsity, seed=1))


@pytest.mark.parametrize("sparsity, most_bits", [(0.85, 0.85), (0.95, 0.5)])
def test_groups_go_below_one_bit_per_weight_near_the_entropy(sparsity, most_bits):
    int8 = _big_fc(sparsity)
    grouped = decode.compress(int8, encoding="huffman_group")
    plain = decode.compress(int8, encoding="huffman")
    (row,) = decode.describe(grouped)
    (plain_row,) = decode.describe(plain)
    assert row["encoding"] == "huffman_group" and row["elements"] == 256 * 512
    assert plain_row["bits_per_weight"] >= 1.0  # one codeword per weight
    assert row["bits_per_weight"] <= most_bits
    assert row["bits_per_weight"] >= row["entropy_bound_bits"] * 0.99 - 0.01 or sparsity > 0.9  # groups may beat it
    assert row["decode_scratch_bytes"] > 2 * 256 * 512  # the chain's tensors: positions, groups, the weight
    assert len(grouped) < len(plain)
    x = [np.eye(512, dtype=np.int8)]
    np.testing.assert_array_equal(run_tflm(grouped, x, 2_000_000)[0], run_tflm(int8, x, 2_000_000)[0])


def test_auto_takes_groups_for_large_sparse_tensors_and_huffman_for_tiny_ones():
    int8 = _big_fc(0.85)
    auto = decode.compress(int8, encoding="auto")
    assert [r["encoding"] for r in decode.describe(auto)] == ["huffman_group"]
    assert len(auto) <= len(decode.compress(int8, encoding="lut"))
    small = identity_fc_model(_ternary((4, 8), 0.5))
    assert [r["encoding"] for r in decode.describe(decode.compress(small, encoding="auto"))] != ["huffman_group"]


def test_reader_refuses_a_group_table_too_short_for_the_indices():
    weights = _ternary((16, 32), 0.5)

    def short_table(g):
        return groups.GroupEncoded(g.encoded, g.table[:2], g.count)

    buf = _grouped_fc(weights, short_table)
    with pytest.raises(flatbuffer.FlatbufferError, match="group table"):
        decode.describe(buf)
    assert verify_mod.detect_target(_grouped_fc(weights)) == "micro"


def test_default_interpreter_arena_grows_for_files_that_decode_to_many_times_their_size():
    """A 0.95-sparse grouped file is about 8 KB and decodes to 128 KB of weights plus the chain's tensors: more
    than the first default arena (10x the file plus 64 KiB). The default interpreter and the arena measure grow it."""
    from ptq_keras.tflite import micro

    grouped = decode.compress(_big_fc(0.95), encoding="huffman_group")
    first_default = 10 * len(grouped) + 65536
    with pytest.raises(RuntimeError):
        micro.interpreter(grouped, arena_size=first_default)  # an explicit arena is never grown
    arena = micro.measure_arena(grouped)
    assert arena > first_default
    it = micro.interpreter(grouped)
    it.set_input(np.eye(512, dtype=np.int8), 0)
    it.invoke()
    np.testing.assert_array_equal(it.get_output(0), run_tflm(_big_fc(0.95), [np.eye(512, dtype=np.int8)], 2_000_000)[0])
