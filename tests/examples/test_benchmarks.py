"""The logic of ``benchmarks/accuracy_size.py`` that decides what its table claims: which PTQ rows a baseline
beats, the Pareto front, when a cached run is stale, and its flag errors (no training here)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys

import pytest
from absl import app, flags

FLAGS = flags.FLAGS
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_PATH = os.path.join(_ROOT, "benchmarks", "accuracy_size.py")
_spec = importlib.util.spec_from_file_location("accuracy_size", _PATH)
accuracy_size = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(accuracy_size)


@pytest.fixture(autouse=True)
def fresh_flags():
    FLAGS.unparse_flags()
    yield
    FLAGS.unparse_flags()


def _point(kind, label, nbytes, accuracy, sd, target="micro"):
    return {"model": "m", "key": label, "label": label, "kind": kind, "target": target, "seeds": 3,
            "bytes": float(nbytes), "accuracy": accuracy, "sd": sd, "keras_accuracy": accuracy, "keras_sd": sd,
            "encodings": ["huffman"], "bits_per_weight": 1.5, "arena_bytes": 1000, "per_seed": []}  # fmt: skip


def test_a_baseline_beats_a_ptq_row_only_when_no_larger_and_ahead_by_more_than_one_sd():
    ptq = _point("ptq", "PTQ 0.7", 17_000, 87.0, 0.3)
    smaller_better = _point("prune", "pruning 0.9", 16_000, 88.0, 0.4)  # ahead by 1.0 > 0.4
    within_sd = _point("twn", "TWN", 16_500, 87.3, 0.2)  # ahead by 0.3 <= 0.3
    larger = _point("int8", "int8", 40_000, 89.5, 0.1, target="int8")
    other_ptq = _point("ptq", "PTQ 0.9", 10_000, 95.0, 0.1)  # PTQ rows never beat PTQ rows
    beaten = accuracy_size.dominated([ptq, smaller_better, within_sd, larger, other_ptq])
    assert [(p["label"], b["label"]) for p, b in beaten] == [("PTQ 0.7", "pruning 0.9")]
    # one seed (no sd): any lead counts
    alone = _point("twn", "TWN", 16_000, 87.1, math.nan)
    assert accuracy_size.dominated([_point("ptq", "PTQ", 17_000, 87.0, math.nan), alone])


def test_the_markdown_names_the_beaten_row_with_its_numbers():
    points = [_point("float", "float32", 80_000, 89.0, 0.1, "fp32"), _point("ptq", "PTQ 0.7", 17_000, 87.0, 0.3),
              _point("prune", "pruning 0.9", 16_000, 88.0, 0.4)]  # fmt: skip
    meta = dict(date="d", machine="m", command="c", quick=False, float_epochs=6, finetune_epochs=4,
                train_examples=60_000, test_examples=10_000, results_name="accuracy_size_ds_cnn")  # fmt: skip
    text = accuracy_size._markdown({"ds_cnn": points}, meta)
    assert "PTQ 0.7 (micro, 17,000 B, 87.00 ± 0.30%) is beaten by pruning 0.9 (micro, 16,000 B, 88.00 ± 0.40%)" in text
    assert "No baseline file" not in text
    assert "Plot: `accuracy_size_ds_cnn.png`" in text
    points[2]["accuracy"] = 87.2
    assert "No baseline file is both no larger" in accuracy_size._markdown({"ds_cnn": points}, meta)


def test_pareto_front_keeps_points_nothing_beats_in_both_size_and_accuracy():
    points = [(10, 80.0), (20, 85.0), (15, 79.0), (30, 84.0), (40, 90.0), (20, 83.0)]
    assert accuracy_size.pareto(points) == [0, 1, 4]


@pytest.mark.parametrize(
    "cached, ste, min_kept, fresh",
    [
        ({"ste": "psg", "min_kept": 4}, "psg", 4, True),
        ({"ste": "psg"}, "psg", 4, False),  # trained before min_kept existed (0): stale
        ({"ste": "psg"}, "psg", None, True),  # TWN: min_kept does not apply
        ({"ste": "identity", "min_kept": 4}, "psg", 4, False),
        ({"ste": "psg", "min_kept": 0}, "psg", 4, False),
    ],
)
def test_a_cached_run_is_stale_once_a_library_default_changed(cached, ste, min_kept, fresh):
    assert accuracy_size._same_recipe(cached, ste, min_kept) is fresh


def test_flag_errors_name_the_problem(tmp_path):
    with pytest.raises(app.UsageError, match=r"--rows: unknown \['ptq0.75'\]; known: \['float', 'qat'"):
        accuracy_size.main(FLAGS(["prog", "--rows=ptq0.75", f"--work_dir={tmp_path}"]))
    FLAGS.unparse_flags()
    with pytest.raises(app.UsageError, match="--models: unknown model 'vgg'"):
        accuracy_size.main(FLAGS(["prog", "--models=vgg", f"--work_dir={tmp_path}"]))
    FLAGS.unparse_flags()
    with pytest.raises(app.UsageError, match="--results_name: 'a/b' is not a file name"):
        accuracy_size.main(FLAGS(["prog", "--results_name=a/b", f"--work_dir={tmp_path}"]))
    FLAGS.unparse_flags()
    with pytest.raises(app.UsageError, match=r"--cached_only: no cached float model of \['small_cnn'\]"):
        accuracy_size.main(FLAGS(["prog", "--models=small_cnn", "--cached_only", f"--work_dir={tmp_path}",
                                  f"--results_dir={tmp_path / 'results'}"]))  # fmt: skip
    assert not os.path.exists(tmp_path / "results" / "accuracy_size.md")


def test_only_seeds_picks_a_subset_and_rejects_seeds_outside_the_range():
    assert accuracy_size.seed_list(3, None) == [0, 1, 2]
    assert accuracy_size.seed_list(3, ["2", "0", "2"]) == [0, 2]
    with pytest.raises(app.UsageError, match=r"--only_seeds: \[3\] outside 0 .. 2; raise --seeds"):
        accuracy_size.seed_list(3, ["1", "3"])
    with pytest.raises(app.UsageError, match="--only_seeds: .* not all integers"):
        accuracy_size.seed_list(3, ["one"])


def test_results_files_record_the_command_without_this_machine_s_paths(monkeypatch, tmp_path):
    from examples import common

    root = _ROOT
    monkeypatch.chdir(tmp_path)  # a worktree elsewhere, run with paths into this checkout
    argv = [f"--work_dir={root}/out/bench/ablation", f"--results_dir={tmp_path}/results", "--seeds=3"]
    assert common.command_line("benchmarks/ablation.py", argv) == (
        "python benchmarks/ablation.py --work_dir=out/bench/ablation --results_dir=results --seeds=3"
    )


def test_the_readme_table_is_the_headline_of_the_committed_results():
    with open(os.path.join(_ROOT, "benchmarks", "results", "accuracy_size.json"), encoding="utf-8") as f:
        results = json.load(f)
    with open(os.path.join(_ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    table = accuracy_size.headline(results["points"], results["meta"].get("parameters", {}))
    assert accuracy_size.replace_headline(readme, table) == readme, (
        "README.md's table differs from benchmarks/results/accuracy_size.json: rerun "
        "benchmarks/accuracy_size.py --cached_only --update_readme"
    )


def test_headline_bolds_ptq_rows_skips_missing_ones_and_needs_the_markers():
    points = [_point("float", "float32", 80_000, 89.0, 0.1, "fp32"), _point("ptq", "PTQ 0.7", 16_000, 88.5, 0.3),
              _point("prune", "pruning", 20_000, 88.0, 0.4)]  # fmt: skip
    for p, key in zip(points, ["float", "ptq0.7", "prune0.9"]):
        p["key"] = key  # prune0.9 is not a headline row
    table = accuracy_size.headline({"ds_cnn": points}, {"ds_cnn": 22_218})
    assert table[2:] == [
        "| `ds_cnn` (22k parameters, depthwise) | float32 .tflite | 80,000 | 1.0x | 89.00 +- 0.10 | +0.00 |",
        "| | **PTQ 0.7, `micro`** | **16,000** | **5.0x** | **88.50 +- 0.30** | **-0.50** |",
    ]
    start, end = accuracy_size.README_MARKERS
    assert accuracy_size.replace_headline(f"a\n{start}\nold\n{end}\nb", ["new"]) == f"a\n{start}\n\nnew\n\n{end}\nb"
    with pytest.raises(ValueError, match="README.md has no headline markers"):
        accuracy_size.replace_headline("no table here", table)


def test_jobs_pieces_put_the_slowest_model_first_and_forward_only_the_flags_given(tmp_path):
    expected = [("ds_cnn", 0), ("ds_cnn", 2), ("ds_resnet", 0), ("ds_resnet", 2), ("small_cnn", 0), ("small_cnn", 2)]
    assert accuracy_size.pieces(["small_cnn", "ds_resnet", "ds_cnn"], [0, 2]) == expected
    FLAGS(["prog", "--jobs=2", "--finetune_epochs=2", "--ptq_sparsities=0.5,0.9", "--update_readme",
           f"--work_dir={tmp_path}"])  # fmt: skip
    command = accuracy_size._piece_command("ds_cnn", 1, str(tmp_path / "parts"))
    assert command[2:] == ["--finetune_epochs=2", "--ptq_sparsities=0.5,0.9", f"--work_dir={tmp_path}",
                           "--models=ds_cnn", "--seeds=3", "--only_seeds=1", "--results_name=ds_cnn_seed1",
                           f"--results_dir={tmp_path / 'parts'}"]  # fmt: skip


def test_jobs_run_each_piece_pinned_to_one_core_and_report_failures(monkeypatch, tmp_path):
    script = ("import os, sys; print(os.environ['TF_NUM_INTRAOP_THREADS'], len(os.sched_getaffinity(0)), "
              "flush=True); sys.exit(3 if sys.argv[1] == 'bad' else 0)")  # fmt: skip
    monkeypatch.setattr(accuracy_size, "_piece_command", lambda m, s, d: [sys.executable, "-c", script, m])
    accuracy_size.run_pieces([("good", 0), ("good", 1), ("good", 2)], str(tmp_path), 2)
    for seed in range(3):
        assert (tmp_path / "good" / f"seed{seed}" / "log.txt").read_text().split() == ["1", "1"]
    with pytest.raises(RuntimeError, match=r"--jobs: 1 piece\(s\) failed: \[\('bad', 0\)\]"):
        accuracy_size.run_pieces([("good", 0), ("bad", 0)], str(tmp_path), 2)


def test_jobs_beyond_the_cores_run_unpinned(monkeypatch, tmp_path):
    script = "import os; print(len(os.sched_getaffinity(0)), flush=True)"
    monkeypatch.setattr(accuracy_size, "_piece_command", lambda m, s, d: [sys.executable, "-c", script])
    cores = len(os.sched_getaffinity(0))
    accuracy_size.run_pieces([("m", 0)], str(tmp_path), cores + 1)
    assert (tmp_path / "m" / "seed0" / "log.txt").read_text().split() == [str(cores)]


def test_jobs_log_how_many_runs_are_cached_while_they_train(monkeypatch, tmp_path, capsys):
    for key in ("float", "ptq0.7"):  # seed 0 has two of its three runs, seed 1 none
        os.makedirs(tmp_path / "m" / "seed0" / key)
        (tmp_path / "m" / "seed0" / key / "bench.json").write_text("{}")
    keys = ["float", "ptq0.7", "twn"]
    assert accuracy_size.progress([("m", 0), ("m", 1)], str(tmp_path), keys) == "2 of 6 runs cached"
    sleep = [sys.executable, "-c", "import time; time.sleep(1)"]  # a piece that trains nothing for a second
    monkeypatch.setattr(accuracy_size, "_piece_command", lambda m, s, d: sleep)
    accuracy_size.run_pieces([("m", 0), ("m", 1)], str(tmp_path), 2, keys, every=0.2)
    captured = capsys.readouterr()
    assert "--jobs: 2 of 6 runs cached" in captured.out + captured.err


def test_vs_float_is_the_paired_difference_over_the_seeds_both_rows_have():
    ref = _point("float", "float32", 80_000, 89.0, 1.0, "fp32")
    ref.update(per_seed=[88.0, 90.0, 89.0], seed_ids=[0, 1, 2])
    row = _point("ptq", "PTQ 0.7", 17_000, 88.5, 1.0)
    row.update(per_seed=[87.5, 89.0], seed_ids=[0, 2])  # seed 1 not run: compared on seeds 0 and 2
    mean, sd = accuracy_size.paired(row, ref)
    assert mean == pytest.approx(-0.25) and sd == pytest.approx(math.sqrt(0.125))
    assert accuracy_size.vs_float(row, ref) == "-0.25 ± 0.35"
    row.update(per_seed=[87.5], seed_ids=[1])
    assert accuracy_size.vs_float(row, ref) == "-2.50"  # one seed: no spread
    del row["seed_ids"]  # results from before per-seed ids: the difference of the means
    assert accuracy_size.vs_float(row, ref) == "-0.50"
    assert accuracy_size.vs_float(ref, ref) == "+0.00"  # the reference row itself: no spread to show


def test_plot_labels_of_nearby_points_move_apart_and_lone_ones_stay():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xy = [(10.0, 80.0), (10.1, 80.05), (30.0, 70.0)]  # two points closer than a line of text, one far away
    ax.plot(*zip(*xy), "o")
    offsets = accuracy_size.label_offsets(ax, xy, ["PTQ 0.7 (micro)", "PTQ 0.7 + distill (micro)", "TWN (micro)"])
    plt.close(fig)
    assert offsets[1] == (0.0, 0.0) and offsets[2] == (0.0, 0.0)  # the top one and the lone one stay
    assert offsets[0][1] <= -9.0  # the lower of the close pair goes a line down at least


def test_main_checks_only_seeds_and_the_readme_markers_before_training(monkeypatch, tmp_path):
    with pytest.raises(app.UsageError, match=r"--only_seeds: \[5\] outside 0 .. 2"):
        accuracy_size.main(FLAGS(["prog", "--only_seeds=5", f"--work_dir={tmp_path}"]))
    FLAGS.unparse_flags()
    readme = tmp_path / "README.md"
    readme.write_text("a README without the markers\n")
    monkeypatch.setattr(accuracy_size, "README", str(readme))
    with pytest.raises(app.UsageError, match="--update_readme: README.md has no headline markers"):
        accuracy_size.main(FLAGS(["prog", "--update_readme", f"--work_dir={tmp_path}"]))
    assert readme.read_text() == "a README without the markers\n"


def test_main_with_jobs_trains_the_pieces_then_renders_only_the_cache(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(accuracy_size, "run_pieces", lambda *args: calls.append(args))
    argv = ["prog", "--jobs=2", "--models=small_cnn,ds_cnn", "--only_seeds=1", f"--work_dir={tmp_path}",
            f"--results_dir={tmp_path / 'results'}"]  # fmt: skip
    # nothing was cached (run_pieces is a stand-in), so the render that follows finds no float model
    with pytest.raises(app.UsageError, match=r"--cached_only: no cached float model"):
        accuracy_size.main(FLAGS(argv))
    assert [c[:3] for c in calls] == [([("ds_cnn", 1), ("small_cnn", 1)], str(tmp_path), 2)]
    keys = calls[0][3]  # the runs the progress lines count: the float model and every row of a piece
    assert keys[0] == "float" and {"ptq0.7", "ptq0.7_mixed", "twn", "qat"} <= set(keys)
    assert len(keys) == len(set(keys))


def test_comparisons_pair_rows_on_shared_seeds_and_skip_rows_a_run_lacks():
    plain = _point("ptq", "PTQ 0.7", 10_000, 87.0, 1.0)
    plain.update(key="ptq0.7", per_seed=[86.0, 88.0, 87.0], seed_ids=[0, 1, 2])
    mixed = _point("ptq", "PTQ 0.7, mixed", 12_000, 89.0, 1.0)
    mixed.update(key="ptq0.7_mixed", per_seed=[88.5, 89.5], seed_ids=[0, 2])  # seed 1 not run
    twn = _point("twn", "TWN", 11_000, 86.0, 1.0, target="int8")  # not a micro file: not compared
    twn.update(key="twn", per_seed=[86.0, 86.0, 86.0], seed_ids=[0, 1, 2])
    lines = accuracy_size.comparisons([plain, mixed, twn])
    assert lines == ["- PTQ 0.7, mixed against PTQ 0.7: +2.50 ± 0.00 points over 2 seeds, +2,000 B (+20% of its file)"]
    assert accuracy_size.comparisons([plain]) == []
