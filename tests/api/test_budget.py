"""``ternarize(..., flash_budget=N, budget_data=x)``: per-layer sparsities that fit the micro file into N bytes."""

from __future__ import annotations

import numpy as np
import pytest

import ptq_keras
from ptq_keras import budget, keras
from ptq_keras import tflite as ptq_tflite
from ptq_keras.tflite import decode

L = keras.layers


def _model(seed: int = 0) -> keras.Model:
    """A small conv layer and a large dense layer: the dense layer is where zeros are cheap in bytes."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((12, 12, 1)),
            L.Conv2D(8, 3, activation="relu", name="conv"),
            L.Flatten(name="flatten"),
            L.Dense(64, activation="relu", name="fc"),
            L.Dense(10, name="logits"),
        ],
        name="budget_model",
    )


def _data(n: int = 128) -> np.ndarray:
    return np.random.default_rng(1).uniform(0, 1, (n, 12, 12, 1)).astype(np.float32)


def _micro_bytes(qmodel, x) -> int:
    return len(ptq_tflite.convert(qmodel, x, target="micro", encoding="auto"))


def test_budget_is_met_by_the_trained_and_exported_model(capsys):
    model, x = _model(), _data()
    y = np.random.default_rng(2).integers(0, 10, len(x))
    q = ptq_keras.ternarize(model, flash_budget=11_000, budget_data=x)
    allocation = q.ptq_allocation
    assert "flash budget 11,000 B" in capsys.readouterr().out
    assert set(allocation.sparsities) == {"conv", "fc", "logits"}
    assert allocation.file_bytes <= 11_000
    # the large layer pays: its sparsity is the highest
    assert allocation.sparsities["fc"] == max(allocation.sparsities.values())
    assert allocation.sparsities["fc"] > allocation.sparsities["conv"]
    # every layer trains at its chosen sparsity, and the exported micro file keeps the budget
    q.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    q.fit(x, y, epochs=1, batch_size=32, verbose=0)
    report = ptq_keras.summary(q)
    for row in report.layers:
        if row.ternary:
            assert row.sparsity == pytest.approx(allocation.sparsities[row.name], abs=0.02)
    assert _micro_bytes(q, x) <= 11_000  # the export's default file: its 51,200 B dense layer split in parts
    assert {r["encoding"] for r in decode.describe(ptq_tflite.convert(q, x, target="micro", encoding="auto"))}


def test_a_looser_budget_gives_lower_sparsities_and_a_larger_file():
    model, x = _model(), _data()
    tight = ptq_keras.ternarize(model, flash_budget=11_000, budget_data=x).ptq_allocation
    loose = ptq_keras.ternarize(model, flash_budget=13_000, budget_data=x).ptq_allocation
    assert loose.file_bytes > tight.file_bytes
    assert sum(loose.sparsities.values()) < sum(tight.sparsities.values())
    assert all(loose.sparsities[n] <= tight.sparsities[n] for n in tight.sparsities)


def test_impossible_budget_states_the_smallest_reachable_size():
    model, x = _model(), _data()
    with pytest.raises(
        ValueError, match=r"flash_budget=1,000 B cannot be met: the smallest micro file .* about [\d,]+ B"
    ):
        ptq_keras.ternarize(model, flash_budget=1_000, budget_data=x)


def test_overrides_keep_their_sparsity_and_options_are_saved(tmp_path):
    model, x = _model(), _data()
    q = ptq_keras.ternarize(model, flash_budget=12_000, budget_data=x, overrides={"conv": {"sparsity": 0.5}})
    assert "conv" not in q.ptq_allocation.sparsities
    path = str(tmp_path / "q.h5")
    q.save(path)
    loaded = ptq_keras.load_model(path, compile=False)
    chosen = {**q.ptq_allocation.sparsities, "conv": 0.5}
    for layer in loaded.layers:
        config = getattr(layer, "quantize_config", None)
        if config is not None:
            name = layer.layer.name
            assert config.options["sparsity"] == pytest.approx(chosen[name])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(flash_budget=4000), "flash_budget needs budget_data="),
        (dict(flash_budget=4000, budget_data=_data(8), sparsity=0.7), "either sparsity= or flash_budget="),
        (dict(budget_data=_data(8)), "budget_data is only used with flash_budget"),
        (dict(flash_budget=-5, budget_data=_data(8)), "flash_budget must be a positive number of bytes"),
        (dict(flash_budget=4000.5, budget_data=_data(8)), "flash_budget must be a positive number of bytes"),
        (dict(ram_budget=20_000), "ram_budget needs budget_data="),
        (dict(ram_budget=0, budget_data=_data(8)), "ram_budget must be a positive number of bytes"),
    ],
)
def test_bad_budget_arguments_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ptq_keras.ternarize(_model(), **kwargs)


def test_greedy_spends_zeros_where_they_cost_least():
    """Two layers of equal bytes: the one whose output error grows less takes the zeros."""
    candidates = [0.5, 0.7, 0.9]
    layer_bytes = {"a": {0.5: 100, 0.7: 80, 0.9: 60}, "b": {0.5: 100, 0.7: 80, 0.9: 60}}
    sensitivity = {"a": {0.5: 0.0, 0.7: 0.1, 0.9: 0.5}, "b": {0.5: 0.0, 0.7: 0.01, 0.9: 0.02}}
    assert budget._greedy(layer_bytes, sensitivity, candidates, 160) == {"a": 0.5, "b": 0.9}
    assert budget._greedy(layer_bytes, sensitivity, candidates, 200) == {"a": 0.5, "b": 0.5}
    assert budget._greedy(layer_bytes, sensitivity, candidates, 140) == {"a": 0.7, "b": 0.9}


def test_ram_budget_is_checked_before_training_and_met_by_the_export(capsys, tmp_path):
    """The 800 x 64 dense weight (51,200 B decoded) does not fit a 24 KB arena whole: the check and the export
    split it; a budget under the activations' own need is refused before any training."""
    model, x = _model(), _data()
    q = ptq_keras.ternarize(model, sparsity=0.7, ram_budget=24_000, budget_data=x)
    assert "ram budget 24,000 B" in capsys.readouterr().out
    assert q.ptq_allocation.arena_bytes <= 24_000
    y = np.random.default_rng(2).integers(0, 10, len(x))
    q.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    q.fit(x, y, epochs=1, batch_size=32, verbose=0)
    result = ptq_tflite.export(q, x, tmp_path, targets=("int8", "micro"), encoding="auto", ram_budget=24_000)
    rep = result.report.targets["micro"]
    assert rep.arena_bytes <= 24_000 and rep.split
    unsplit = rep.ram_fit[0]
    assert unsplit[0] is None and unsplit[2] > 24_000  # whole, it would not have fit
    with pytest.raises(ValueError, match=r"ram_budget=500 B cannot be met: the smallest TFLM arena reached"):
        ptq_keras.ternarize(model, sparsity=0.7, ram_budget=500, budget_data=x)


def test_flash_and_ram_budgets_together():
    """Every size the allocation measures is of the file fitted to the RAM budget (split parts cost flash)."""
    model, x = _model(), _data()
    allocation = ptq_keras.ternarize(model, flash_budget=15_000, ram_budget=24_000, budget_data=x).ptq_allocation
    assert allocation.file_bytes <= 15_000 and allocation.arena_bytes <= 24_000
    assert "TFLM arena" in allocation.table()


def test_sizes_are_measured_at_the_sparsity_min_kept_allows():
    # A 3x3 depthwise kernel keeps 4 weights per channel on average (as the quantizer keeps it in training), so
    # the allocator never counts bytes that training would not save; min_kept=0 lifts the cap.
    from ptq_keras.core.ternary import keep_count

    kernel = np.random.default_rng(0).normal(size=(3, 3, 16, 1)).astype("float32")
    assert np.count_nonzero(budget._project(kernel, 2, 0.9, {})) == keep_count(1 - 4 / 9, kernel.size)
    assert np.count_nonzero(budget._project(kernel, 2, 0.9, {"min_kept": 0})) == keep_count(0.9, kernel.size)


def test_the_table_names_kernels_min_kept_holds_below_the_chosen_sparsity(capsys):
    # A 1x1 convolution over 4 channels has a fan-in of 4: min_kept=4 keeps it dense whatever sparsity the
    # allocator picks, and the 3x3 depthwise kernel (fan-in 9) is held at 1 - 4/9 when its layer goes above that.
    from ptq_keras.core.ternary import max_sparsity

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((12, 12, 4)),
            L.Conv2D(16, 1, activation="relu", name="mix"),
            L.DepthwiseConv2D(3, activation="relu", name="dw"),
            L.Flatten(name="flatten"),
            L.Dense(10, name="logits"),
        ]
    )
    x = np.random.default_rng(1).uniform(0, 1, (64, 12, 12, 4)).astype(np.float32)
    allocation = ptq_keras.ternarize(model, flash_budget=7_000, budget_data=x).ptq_allocation
    table = capsys.readouterr().out
    assert allocation.capped["mix"] == {"kernel": 0.0}
    assert "min_kept holds kernel 0.00" in table
    # the depthwise kernel is named only when its layer's sparsity is above its cap
    kernel = np.zeros((3, 3, 16, 1), np.float32)
    parts = {"dw": [("depthwise_kernel", 2, kernel)]}
    dw_cap = max_sparsity(kernel.shape, 2, 4)
    assert budget._capped(parts, {"dw": 0.9}, {"dw": {}}) == {"dw": {"depthwise_kernel": pytest.approx(dw_cap)}}
    assert budget._capped(parts, {"dw": 0.5}, {"dw": {}}) == {}
    assert budget._capped(parts, {"dw": 0.9}, {"dw": {"min_kept": 0}}) == {}
    assert "logits" not in allocation.capped  # fan-in 1600: no cap below any candidate
