"""The plasticity study: the grid, runs.parquet, the statistics against scipy, the figures and
report, bad input at the door, and resume of a killed study."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_refused, child_runs, kill_after_first_finished_trial
from scipy import stats

from search.study import grid_cells, load_study_config, main, run_row
from search.study_report import (
    RUN_COLUMNS,
    mean_ci,
    paired_vs_random,
    read_runs,
    study_meta,
    summarize,
    tost_paired,
    write_report,
    write_runs,
)
from trainables.protocol.config import METHODS

ROOT = Path(__file__).resolve().parent.parent
PNG = b"\x89PNG\r\n\x1a\n"


def _args(root: Path, tmp: Path, name: str, *extra: str) -> list[str]:
    return [
        f"data.root={root}", "data.val_size=100", "data.batch_size=32", "data.eval_batch_size=100",
        "model.pretrain.epochs=1", f"cache_dir={tmp / 'cache'}", f"output_root={tmp / 'out'}", f"name={name}",
        "study.criteria=[random,l1]", "study.ratios=[0.5]", "study.seeds=[0,1]", "study.control=false",
        "prune.p=0.1", "prune.q=0.3", "prune.score_batches=1", "prune.score_batch_size=16", "measure.latency=false",
        "num_cpus=2", *extra,
    ]


# ---- the grid -----------------------------------------------------------------------------------


def test_default_grid_is_seed_major_flat_and_has_the_control_when_it_exists():
    cfg = load_study_config([])
    cells = grid_cells(cfg)
    control = "control" in METHODS
    assert len(cells) == 4 * 2 * 3 + (3 if control else 0)
    assert {"random", "l1"} <= {c["arm"] for c in cells} and len({c["arm"] for c in cells} - {"control"}) >= 4
    assert all(c.keys() == cells[0].keys() for c in cells)  # one flat shape: Tune samples every key from the cell
    assert [c["seed"] for c in cells] == sorted(c["seed"] for c in cells)  # whole seeds first
    cell_keys = [(c["arm"], c["ratio"], c["seed"], c["fraction"], c["method"]) for c in cells]
    assert len(set(cell_keys)) == len(cells)
    if control:
        assert sorted(c["seed"] for c in cells if c["arm"] == "control") == [0, 1, 2]
        assert all(c["ratio"] == 0.0 and c["method"] == "control" for c in cells if c["arm"] == "control")


def test_flops_targets_replace_ratios_and_fractions_multiply_the_grid():
    cfg = load_study_config(["study.ratios=null", "study.flops_targets=[0.4]", "study.fractions=[0.1,1.0]",
                             "study.control=false", "study.seeds=[3]"])
    cells = grid_cells(cfg)
    assert len(cells) == 4 * 1 * 2
    assert all(c["target_flops_reduction"] == 0.4 and "ratio" not in c for c in cells)
    assert {c["fraction"] for c in cells} == {0.1, 1.0} and {c["seed"] for c in cells} == {3}


# ---- bad input -----------------------------------------------------------------------------------

BAD = [
    (["study.criteria=[random,l3]"], ["unknown criterion 'l3'", "valid: apoz"]),
    (["study.seeds=[]"], ["study.seeds must be a non-empty list, but got []"]),
    (["study.ratios=[0.3,1.0]"], ["study.ratios[1] must be in [0, 1), but got 1.0"]),
    (["study.ratios=[-0.1]"], ["study.ratios[0] must be in [0, 1), but got -0.1"]),
    (["study.seeds=[0,0]"], ["study.seeds must be a list without repeats, but got [0, 0]"]),
    (["study.fractions=[0]"], ["study.fractions[0] must be in (0, 1], but got 0"]),
    (["study.methods=[greedy]"], ["study.methods must be a list of layer_by_layer, one_shot, iterative, greedy_car, but got 'greedy'"]),
    (["study.flops_targets=[0.5]"], ["study.ratios / study.flops_targets must be exactly one of them set"]),
    (["study.margin=0"], ["study.margin must be in (0, 100) points of the score (1.0 = one point), but got 0"]),
    (["study.metric=top5"], ["study.metric must be one of final_test_acc, final_val_acc, but got 'top5'"]),
    (["study.control=maybe"], ["study.control must be auto, true or false, but got 'maybe'"]),
    (["prune.schedule=differential"], ["prune.schedule must be uniform with study.ratios", "but got 'differential'"]),
    (["prune.target_flops_reduction=0.5"], ["prune.target_flops_reduction must be null with study.ratios", "but got 0.5"]),
    (["study.max_concurrent_trials=0"], ["study.max_concurrent_trials must be an integer >= 1, but got 0"]),
    (["study.criteria=[random,class_specific]"], ["prune.target_classes must be a non-empty list", "but got None"]),
]


@pytest.mark.parametrize(("args", "expected"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_before_any_work(args, expected, tmp_path, capsys):
    code = main([f"output_root={tmp_path / 'out'}", f"cache_dir={tmp_path / 'cache'}", *args])
    assert_refused(capsys, code, expected)
    assert list(tmp_path.iterdir()) == []  # no folder, no cache, no MLflow store


# ---- statistics on a table with a known answer ---------------------------------------------------


def _row(arm: str, seed: int, acc: float, *, ratio: float = 0.5, fraction: float = 1.0, damage: float = 0.2) -> dict:
    return {"run_id": f"{arm}-{ratio}-{fraction}-{seed}", "status": "COMPLETED", "cell": 0, "arm": arm,
            "criterion": None if arm == "control" else arm, "method": "control" if arm == "control" else "layer_by_layer",
            "prune_ratio": 0.0 if arm == "control" else ratio, "seed": seed, "fraction": fraction, "final_test_acc": acc,
            "final_val_acc": acc, "base_val_acc": 0.9, "mean_damage": damage, "steps_to_recover": 10 * seed or None,
            "recovery_auc": 0.8, "flops_kept": 0.3, "budget": 1.0, "base_seed": 0, "curve_step": [0, 5, 5, 9, 20],
            "curve_val_acc": [0.9, 0.9 - damage, 0.9 - damage, 0.8, acc],
            "curve_phase": ["base", "damage", "damage", "recovery", "final_finetune"]}


RANDOM = [0.80, 0.82, 0.79, 0.81, 0.83]
NOISE = [0.001, -0.0005, 0.0008, -0.0012, 0.0003]


def _synthetic() -> list[dict]:
    rows = [_row("random", s, a) for s, a in enumerate(RANDOM)]
    rows += [_row("l1", s, a + n) for s, (a, n) in enumerate(zip(RANDOM, NOISE, strict=True))]  # within 0.2 points
    rows += [_row("taylor", s, a + 0.05 + 3 * n) for s, (a, n) in enumerate(zip(RANDOM, NOISE, strict=True))]  # +5 points
    rows += [_row("control", s, 0.9 + n) for s, n in enumerate(NOISE)]
    return rows


def test_paired_comparison_equals_scipy_and_tost_tells_equivalent_from_far():
    paired = {r["arm"]: r for r in paired_vs_random(_synthetic(), confidence=0.95, margin=0.01)}
    assert set(paired) == {"l1", "taylor"}  # the control and random itself are not compared with random
    for arm, offset, scale in (("l1", 0.0, 1), ("taylor", 0.05, 3)):
        a = [x + offset + scale * n for x, n in zip(RANDOM, NOISE, strict=True)]
        expected = stats.ttest_rel(a, RANDOM)
        ci = expected.confidence_interval(0.95)
        got = paired[arm]
        assert got["n_pairs"] == 5
        assert got["diff"] == pytest.approx(np.mean(np.subtract(a, RANDOM)), abs=1e-12)
        assert got["p"] == pytest.approx(expected.pvalue, rel=1e-9)
        assert (got["ci_low"], got["ci_high"]) == pytest.approx((ci.low, ci.high), rel=1e-9)
    assert paired["l1"]["equivalent"] and paired["l1"]["random_noninferior"] and paired["l1"]["p"] > 0.05
    assert not paired["taylor"]["equivalent"] and not paired["taylor"]["random_noninferior"]
    assert paired["taylor"]["p"] < 1e-4 and paired["taylor"]["diff"] == pytest.approx(0.05, abs=1e-3)
    # q: Benjamini-Hochberg over both rows, never below p
    assert all(r["q"] >= r["p"] for r in paired.values())


def test_tost_is_the_larger_one_sided_p_and_identical_samples_are_equivalent():
    same = tost_paired(RANDOM, RANDOM, margin=0.01)
    assert same["equivalent"] and same["p"] == 0.0
    d = np.array(NOISE) * 10 + 0.004  # mean 0.0058, inside 0.01 but noisy
    a = np.add(RANDOM, d)
    lower = stats.ttest_1samp(d, -0.01, alternative="greater").pvalue
    upper = stats.ttest_1samp(d, 0.01, alternative="less").pvalue
    got = tost_paired(list(a), RANDOM, margin=0.01)
    assert got["p"] == pytest.approx(max(lower, upper), rel=1e-6)
    assert got["equivalent"] == (max(lower, upper) < 0.05)
    assert not tost_paired([x + 0.03 for x in RANDOM], RANDOM, margin=0.01)["equivalent"]
    assert not tost_paired([0.5], [0.5], margin=0.01)["equivalent"]  # one pair proves nothing


def test_summary_mean_and_ci_equal_scipy_t_interval():
    mean, low, high = mean_ci(RANDOM, 0.95)
    expected = stats.t.interval(0.95, len(RANDOM) - 1, loc=np.mean(RANDOM), scale=stats.sem(RANDOM))
    assert mean == pytest.approx(np.mean(RANDOM)) and (low, high) == pytest.approx(expected)
    assert mean_ci([0.5], 0.95) == (0.5, None, None)
    by_arm = {s["arm"]: s for s in summarize(_synthetic())}
    assert by_arm["random"]["n"] == 5 and by_arm["random"]["mean"] == pytest.approx(np.mean(RANDOM))
    assert by_arm["random"]["never_recovered"] == 1  # seed 0 has steps_to_recover None


def test_report_and_figures_from_a_synthetic_table(tmp_path):
    rows = _synthetic() + [_row(arm, s, 0.7 + 0.01 * s, fraction=0.1) for arm in ("random", "l1") for s in range(3)]
    write_runs(rows, tmp_path / "runs.parquet", {"model": "small_cnn", "data": "fashion_mnist", "margin": 0.01,
                                                  "confidence": 0.95, "metric": "final_test_acc", "level": "ratio"})
    assert study_meta(tmp_path / "runs.parquet")["margin"] == 0.01
    assert len(read_runs(tmp_path / "runs.parquet")) == len(rows)
    result = write_report(tmp_path / "runs.parquet")
    names = {p.name for p in result["files"]}
    assert names == {"recovery_curves.png", "accuracy_vs_ratio.png", "damage_vs_recovery.png", "data_efficiency.png",
                     "report.md"}
    for path in result["files"][:-1]:
        assert path.read_bytes()[:8] == PNG
    report = (tmp_path / "report.md").read_text()
    assert "equivalent to random within ±1.0 pts" in report  # l1
    assert "better than random (BH q < 0.05)" in report  # taylor: the adjusted verdict
    assert "(TOST): l1 at ratio 0.5 (fraction 1), l1 at ratio 0.5 (fraction 0.1)." in report
    # written once, read many times: the report re-renders from runs.parquet alone, with another margin
    from search.study_report import main as rerender

    assert rerender([str(tmp_path), "margin=0.02"]) == 0  # points, as the report speaks
    # l1's noisy pairs no longer fit in ±0.02 points; its identical pairs (fraction 0.1) fit any margin
    assert "(TOST): l1 at ratio 0.5 (fraction 0.1)." in (tmp_path / "report.md").read_text()
    assert rerender([str(tmp_path), "margin=100"]) == 2 and rerender([str(tmp_path / "nope")]) == 2


def test_write_runs_refuses_unknown_or_missing_keys(tmp_path):
    with pytest.raises(ValueError, match="unknown keys \\['colour'\\]"):
        write_runs([{**_row("l1", 0, 0.8), "colour": "red"}], tmp_path / "r.parquet", {})
    with pytest.raises(ValueError, match="missing required keys \\['seed'\\]"):
        write_runs([{**_row("l1", 0, 0.8), "seed": None}], tmp_path / "r.parquet", {})
    assert not (tmp_path / "r.parquet").exists()


def test_a_record_without_plasticity_fields_is_derived_from_its_curve(tmp_path):
    curve = [{"step": 0, "epoch": 0, "val_acc": 0.90, "phase": "base"},
             {"step": 0, "epoch": 0, "val_acc": 0.50, "phase": "damage"},
             {"step": 10, "epoch": 0.1, "val_acc": 0.85, "phase": "recovery"},
             {"step": 10, "epoch": 0.1, "val_acc": 0.70, "phase": "damage"},
             {"step": 20, "epoch": 0.2, "val_acc": 0.80, "phase": "final_finetune"},
             {"step": 30, "epoch": 0.3, "val_acc": 0.895, "phase": "final_finetune"}]
    record = {"curve": curve, "base_val_acc": 0.90, "final_val_acc": 0.9, "final_test_acc": 0.89, "ratios": [0.5],
              "flops_before": 100, "flops_after": 40, "params_before": 10, "params_after": 4, "wall_s": 1.0,
              "config": {"prune": {"p": 0.1, "q": 0.2, "schedule": "uniform"}, "finetune": {"lr": 0.01}}}
    cell = {"cell": 0, "arm": "l1", "criterion": "l1", "method": "layer_by_layer", "ratio": 0.5, "seed": 0, "fraction": 1.0}
    row = run_row("t0", "COMPLETED", cell, record, None, delta=0.01)
    assert row["metrics_source"] == "curve" and row["n_steps"] == 2
    assert row["mean_damage"] == pytest.approx(((0.90 - 0.50) + (0.85 - 0.70)) / 2)
    steps = json.loads(row["steps_json"])
    assert steps[0]["steps_to_recover"] is None  # 0.85 never within 1 point of 0.90 inside its stage
    assert steps[1]["steps_to_recover"] == 20  # 0.895 >= 0.85 - 0.01 at step 30, 20 after its damage at 10
    assert row["steps_to_recover"] == 20  # the run is back within 1 point of the base (0.9) at step 30
    assert row["flops_kept"] == 0.4
    with_fields = run_row("t0", "COMPLETED", cell, {**record, "mean_damage": 0.3, "steps_to_recover": None,
                                                    "recovery_auc": 0.5, "recovery_delta": 0.02, "steps": []}, None, 0.01)
    assert with_fields["metrics_source"] == "record" and with_fields["mean_damage"] == 0.3
    assert with_fields["recovery_delta"] == 0.02 and with_fields["steps_to_recover"] is None
    assert set(row) <= set(RUN_COLUMNS.names)
    write_runs([row, with_fields], tmp_path / "runs.parquet", {})  # both shapes fit the schema
    assert [r["metrics_source"] for r in read_runs(tmp_path / "runs.parquet")] == ["curve", "record"]


# ---- end to end ----------------------------------------------------------------------------------


def test_tiny_study_writes_one_row_per_cell_the_figures_and_report(tiny_fmnist, tmp_path, capsys, ray_session):
    assert main(_args(tiny_fmnist, tmp_path, "tiny")) == 0
    out = tmp_path / "out" / "tiny"
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out)
    rows = read_runs(out / "runs.parquet")
    assert sorted(r["cell"] for r in rows) == [0, 1, 2, 3]
    assert {(r["arm"], r["seed"]) for r in rows} == {("random", 0), ("l1", 0), ("random", 1), ("l1", 1)}
    for r in rows:
        assert r["status"] == "COMPLETED" and r["prune_ratio"] == 0.5 and r["fraction"] == 1.0
        assert 0 <= r["final_test_acc"] <= 1 and 0 <= r["final_val_acc"] <= 1  # a study reads test at the end
        assert r["flops_after"] < r["flops_before"] and r["mean_damage"] is not None and r["recovery_auc"] is not None
        assert r["curve_phase"][0] == "base" and "damage" in r["curve_phase"] and r["mlflow_run_id"]
    by = {(r["arm"], r["seed"]): r for r in rows}
    # the cell's seed reaches the run: random keeps other filters, the fine-tuning sees other batches
    assert by[("random", 0)]["curve_val_acc"] != by[("random", 1)]["curve_val_acc"]
    assert by[("l1", 0)]["curve_val_acc"] != by[("l1", 1)]["curve_val_acc"]
    for name in ("recovery_curves.png", "accuracy_vs_ratio.png", "damage_vs_recovery.png"):
        assert (out / name).read_bytes()[:8] == PNG
    assert not (out / "data_efficiency.png").exists()  # one fraction: no curve to draw
    report = (out / "report.md").read_text()
    assert "## Every criterion against random, paired by seed" in report and "| ratio 0.5 | l1 | 2 |" in report
    runs = child_runs(out, "prunesearch-study")
    assert sorted(r.data.tags["trial_id"] for r in runs) == sorted(r["run_id"] for r in rows)
    assert all(r.info.status == "FINISHED" and r.data.tags["criterion"] in ("random", "l1") for r in runs)
    assert {r.data.params["seed"] for r in runs} == {"0", "1"}


@pytest.mark.slow
def test_killed_study_resumes_with_every_cell_once(tiny_fmnist, tmp_path):
    out = tmp_path / "out" / "kr"
    # 6 cells one at a time, each long enough that the kill lands between the first and the last
    args = _args(tiny_fmnist, tmp_path, "kr", "study.max_concurrent_trials=1", "study.seeds=[0,1,2]", "prune.q=2")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    kill_after_first_finished_trial([sys.executable, "-m", "search.study", *args], out, env, ROOT)
    assert not (out / "runs.parquet").exists()
    resumed = subprocess.run([sys.executable, "-m", "search.study", f"resume={out}"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert resumed.stdout.strip().splitlines()[-1] == str(out)
    rows = read_runs(out / "runs.parquet")
    assert sorted(r["cell"] for r in rows) == list(range(6))
    assert all(r["status"] == "COMPLETED" for r in rows), ([(r["cell"], r["status"]) for r in rows], resumed.stdout[-3000:])
    runs = child_runs(out, "prunesearch-study")
    assert sorted(r.data.tags["trial_id"] for r in runs) == sorted(r["run_id"] for r in rows)  # one run per cell
    assert all(r.info.status == "FINISHED" for r in runs)


@pytest.mark.slow
def test_control_and_scratch_runs_are_arms_without_a_criterion(tiny_fmnist, tmp_path, ray_session):
    assert main(_args(tiny_fmnist, tmp_path, "base", "study.criteria=[random]", "study.control=true",
                      "study.scratch=true")) == 0
    rows = read_runs(tmp_path / "out" / "base" / "runs.parquet")
    assert sorted(r["arm"] for r in rows) == ["control"] * 2 + ["random"] * 2 + ["scratch"] * 2
    assert all(r["status"] == "COMPLETED" for r in rows)
    for r in rows:
        if r["arm"] == "control":  # nothing pruned, same fine-tuning
            assert r["criterion"] is None and r["prune_ratio"] == 0.0 and r["flops_kept"] == 1.0 and r["mean_damage"] is None
        if r["arm"] == "scratch":  # the pruned architecture, trained from a fresh init
            assert r["criterion"] is None and r["flops_kept"] < 1.0 and "init" in r["curve_phase"]
    pruned = {r["flops_after"] for r in rows if r["arm"] == "random"}
    assert {r["flops_after"] for r in rows if r["arm"] == "scratch"} == pruned  # same architecture as pruning gives
    report = (tmp_path / "out" / "base" / "report.md").read_text()
    assert "| unpruned | control | 2 |" in report and "| ratio 0.5 | scratch | 2 |" in report


def test_error_bars_are_drawn_only_over_possible_scores():
    from search.study_report import _error_bars

    pts = [{"mean": 0.3, "ci_low": -2.2, "ci_high": 2.8},  # two seeds far apart: a t-CI past both ends
           {"mean": 0.9, "ci_low": 0.85, "ci_high": 0.95},  # inside: unchanged
           {"mean": 0.5, "ci_low": None, "ci_high": None}]  # one seed: no bar
    below, above = _error_bars(pts)
    assert below == pytest.approx([30.0, 5.0, 0.0]) and above == pytest.approx([70.0, 5.0, 0.0])
