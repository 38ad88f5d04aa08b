"""The study's budget axis and base-model level (issue 23): the grid, the pooled statistics
against scipy, power, the per-budget equivalence report and its figure, and a tiny real study
over two budgets and two base models."""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest
import torch
from conftest import assert_refused
from scipy import stats

from search.study import base_seeds, grid_cells, load_study_config, main
from search.study_report import (
    catch_up,
    nested_mean_ci,
    paired_vs_random,
    read_runs,
    seeds_for_power,
    summarize,
    write_report,
    write_runs,
)

PNG = b"\x89PNG\r\n\x1a\n"


# ---- the grid -----------------------------------------------------------------------------------


def test_budgets_and_base_seeds_multiply_the_grid_and_scale_p_and_q_together():
    cfg = load_study_config(["study.budgets=[0.25,1,4]", "study.base_seeds=[3,5]", "study.criteria=[random,l1]",
                             "study.ratios=[0.6]", "study.control=true"])
    cells = grid_cells(cfg)
    assert base_seeds(cfg) == [3, 5] and cfg.seed == 3  # the session's own base model is the first
    # (1 control + 2 criteria) x 1 ratio x 3 seeds x 3 budgets x 2 bases
    assert len(cells) == 3 * 3 * 3 * 2
    for c in cells:
        assert c["p"] == pytest.approx(c["budget"] * cfg.prune.p) and c["q"] == pytest.approx(c["budget"] * cfg.prune.q)
    control = [c for c in cells if c["arm"] == "control"]
    assert sorted({c["budget"] for c in control}) == [0.25, 1.0, 4.0]  # the control gets each budget too
    keys = {(c["arm"], c["seed"], c["budget"], c["base_seed"]) for c in cells}
    assert len(keys) == len(cells)
    assert [c["base_seed"] for c in cells] == sorted(c["base_seed"] for c in cells)  # base-major


def test_default_study_keeps_one_budget_of_1x_and_the_config_seed_as_its_base():
    cfg = load_study_config([])
    cells = grid_cells(cfg)
    assert {c["budget"] for c in cells} == {1.0} and {c["base_seed"] for c in cells} == {cfg.seed}
    assert {(c["p"], c["q"]) for c in cells} == {(cfg.prune.p, cfg.prune.q)}


def test_continued_budgets_group_the_cells_that_differ_only_in_budget():
    from search.study import trial_cells

    args = ["study.budgets=[4,0.25,1]", "study.criteria=[random,l1]", "study.ratios=[0.6]", "study.control=true",
            "study.budget_scales=q"]
    cfg = load_study_config(args)
    cells = grid_cells(cfg)
    assert {c["p"] for c in cells} == {cfg.prune.p}  # budget_scales=q: only q grows
    assert trial_cells(cfg, cells) == {i: [] for i in range(len(cells))}  # not continued: a trial per cell
    cfg = load_study_config([*args, "study.continue_budgets=true", "finetune.anneal_final=false"])
    cells = grid_cells(cfg)
    trials = trial_cells(cfg, cells)
    assert trial_cells(cfg, [{**c, "cell": i} for i, c in enumerate(cells)]) == trials  # numbered cells group alike
    assert len(trials) == len(cells) // 3 and sorted(i for t in trials.items() for i in [t[0], *t[1]]) == list(range(len(cells)))
    for main_cell, shorter in trials.items():
        assert [cells[i]["budget"] for i in [*shorter, main_cell]] == [0.25, 1.0, 4.0]
        same = [{k: v for k, v in cells[i].items() if k not in ("budget", "q")} for i in [*shorter, main_cell]]
        assert same[0] == same[1] == same[2]


BAD = [
    (["study.budgets=[0]"], ["study.budgets[0] must be a multiplier of prune.p and prune.q in (0, 1000], but got 0"]),
    (["study.budgets=[1,-2]"], ["study.budgets[1] must be a multiplier", "but got -2"]),
    (["study.budgets=[1,1.0]"], ["study.budgets must be a list without repeats"]),
    (["study.base_seeds=[0,x]"], ["study.base_seeds[1] must be an integer >= 0, but got 'x'"]),
    (["study.base_seeds=[]"], ["study.base_seeds must be a non-empty list, but got []"]),
    (["study.base_seeds=[0,1]", "model.weights=WEIGHTS"], ["study.base_seeds must be null with model.weights"]),
    (["study.margin=100"], ["study.margin must be in (0, 100) points of the score (1.0 = one point), but got 100"]),
    (["study.budget_scales=p"], ["study.budget_scales must be pq (prune.p and prune.q) or q (prune.q only), but got 'p'"]),
    (["study.continue_budgets=maybe"], ["study.continue_budgets must be true or false, but got 'maybe'"]),
    (["study.continue_budgets=true", "study.budgets=[1,2]"],
     ["study.budget_scales must be q with study.continue_budgets=true", "but got 'pq'"]),
    (["study.continue_budgets=true", "study.budgets=[1,2]", "study.budget_scales=q"],
     ["finetune.anneal_final must be false with study.continue_budgets=true", "but got True"]),
    (["study.continue_budgets=true", "study.budget_scales=q", "finetune.anneal_final=false"],
     ["study.continue_budgets must be false with one budget (nothing to continue), but got [1.0]"]),
    (["study.continue_budgets=true", "study.budgets=[1,2]", "study.budget_scales=q", "finetune.anneal_final=false",
      "study.methods=[layer_by_layer,one_shot]"], ["study.methods must be a list without one_shot with study.continue_budgets=true"]),
]


@pytest.mark.parametrize(("args", "expected"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_budget_or_base_input_is_one_line_before_any_work(args, expected, tmp_path, capsys):
    weights = tmp_path / "given.pt"
    weights.write_bytes(b"")  # exists: the refusal is about the combination, not a missing file
    args = [a.replace("WEIGHTS", str(weights)) for a in args]
    code = main([f"output_root={tmp_path / 'out'}", f"cache_dir={tmp_path / 'cache'}", *args])
    assert_refused(capsys, code, expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["given.pt"]  # no folder, no cache, no MLflow store


# ---- statistics with base models and budgets, against scipy ------------------------------------


RANDOM = [0.80, 0.82, 0.79]


def _row(arm: str, seed: int, acc: float, *, budget: float = 1.0, base: int = 0, ratio: float = 0.6) -> dict:
    return {"run_id": f"{arm}-{budget}-{base}-{seed}", "status": "COMPLETED", "cell": 0, "arm": arm, "criterion": arm,
            "method": "layer_by_layer", "prune_ratio": ratio, "seed": seed, "fraction": 1.0, "budget": budget,
            "base_seed": base, "final_test_acc": acc, "final_val_acc": acc, "base_val_acc": 0.9, "mean_damage": 0.2,
            "steps_to_recover": None, "recovery_auc": 0.8, "flops_kept": 0.17, "optimizer_steps": int(150 * budget),
            "curve_step": [0, 5, 9], "curve_val_acc": [0.9, 0.7, acc], "curve_phase": ["base", "damage", "final_finetune"]}


def test_two_bases_pool_per_base_mean_differences_with_a_t_interval_over_bases():
    # base 0: l1 leads by 2, 3, 1 points; base 1: by 0.5, 1, 0 points
    lead = {0: [0.02, 0.03, 0.01], 1: [0.005, 0.01, 0.0]}
    rows = [_row("random", s, a, base=b) for b in (0, 1) for s, a in enumerate(RANDOM)]
    rows += [_row("l1", s, a + lead[b][s], base=b) for b in (0, 1) for s, a in enumerate(RANDOM)]
    (got,) = paired_vs_random(rows, margin=0.01)
    means = [np.mean(lead[0]), np.mean(lead[1])]
    test = stats.ttest_1samp(means, 0.0)
    ci = test.confidence_interval(0.95)
    assert got["n_bases"] == 2 and got["n_pairs"] == 6 and got["power_unit"] == "bases"
    assert got["per_base"] == pytest.approx(means) and got["diff"] == pytest.approx(np.mean(means))
    assert got["p"] == pytest.approx(test.pvalue) and (got["ci_low"], got["ci_high"]) == pytest.approx((ci.low, ci.high))
    within = np.sqrt((np.var(lead[0], ddof=1) * 2 + np.var(lead[1], ddof=1) * 2) / 4)
    assert got["sd_within"] == pytest.approx(within)
    assert got["sd_between"] == pytest.approx(np.sqrt(max(0.0, np.var(means, ddof=1) - within ** 2 / 3)))
    # for these two bases only: the within-base SD, 6 - 2 degrees of freedom
    half = stats.t.ppf(0.975, 4) * within * np.sqrt(1 / 3 + 1 / 3) / 2
    assert (got["within_ci_low"], got["within_ci_high"]) == pytest.approx((np.mean(means) - half, np.mean(means) + half))
    assert got["within_p"] < got["p"]  # here the bases differ more than the seeds: fixing them narrows the answer
    # one base only: the seed-level paired test, as before
    (one,) = paired_vs_random([r for r in rows if r["base_seed"] == 0])
    assert one["n_bases"] == 1 and one["p"] == pytest.approx(stats.ttest_rel(
        [a + d for a, d in zip(RANDOM, lead[0], strict=True)], RANDOM).pvalue)
    # the summary's CI over two bases is the t interval over the two base means
    by_arm = {s["arm"]: s for s in summarize(rows)}
    base_means = [np.mean([a + d for a, d in zip(RANDOM, lead[b], strict=True)]) for b in (0, 1)]
    expected = stats.t.interval(0.95, 1, loc=np.mean(base_means), scale=stats.sem(base_means))
    assert (by_arm["l1"]["ci_low"], by_arm["l1"]["ci_high"]) == pytest.approx(expected)
    assert nested_mean_ci({0: [0.5, 0.7]}) == pytest.approx((0.6, *stats.t.interval(0.95, 1, loc=0.6, scale=0.1)))


def test_seeds_for_power_matches_the_textbook_paired_t_sizes():
    # one-sample / paired t test, two-sided alpha 0.05, 80% power: d = 1 needs 10, d = 0.5 needs 34 (Cohen; G*Power)
    assert seeds_for_power(1.0, 1.0) == 10
    assert seeds_for_power(0.01, 0.02) == 34
    assert seeds_for_power(0.0, 0.01) is None and seeds_for_power(0.01, 0.0) == 2
    assert seeds_for_power(1e-6, 1.0) is None  # beyond the limit


def test_budget_report_finds_the_smallest_equivalent_budget_and_draws_the_figure(tmp_path):
    noise = [0.001, -0.002, 0.0015]
    lead = {0.25: 0.03, 1.0: 0.015, 4.0: 0.0}  # l1's lead shrinks with the budget; fpgm's never does
    rows = []
    for budget, d in lead.items():
        rows += [_row("random", s, a, budget=budget) for s, a in enumerate(RANDOM)]
        rows += [_row("l1", s, a + d + n, budget=budget) for s, (a, n) in enumerate(zip(RANDOM, noise, strict=True))]
        rows += [_row("fpgm", s, a + 0.03 + n, budget=budget) for s, (a, n) in enumerate(zip(RANDOM, noise, strict=True))]
    write_runs(rows, tmp_path / "runs.parquet", {"model": "small_cnn", "data": "fashion_mnist", "margin": 0.01,
                                                  "confidence": 0.95, "metric": "final_test_acc", "level": "ratio"})
    paired = paired_vs_random(rows, margin=0.01)
    first = {c["arm"]: c for c in catch_up(paired)}
    assert first["l1"]["budget"] == 4.0 and first["l1"]["holds"] and first["fpgm"]["budget"] is None
    result = write_report(tmp_path / "runs.parquet")
    assert (tmp_path / "difference_vs_budget.png").read_bytes()[:8] == PNG
    assert tmp_path / "difference_vs_budget.png" in result["files"]
    report = (tmp_path / "report.md").read_text()
    assert "## When does random catch up?" in report
    assert "| ratio 0.6 | l1 | 4x |" in report and "| ratio 0.6 | fpgm | not within the budgets tried (0.25x-4x) |" in report
    assert "| ratio 0.6 | l1 | 0.25x | 37 |" in report  # optimiser steps of the random runs at that budget
    # the BH-adjusted verdict leads; unadjusted ones are labelled as such
    reading = report[report.index("## Reading"):report.index("## Per arm")]
    assert reading.index("**Better than random** (BH-adjusted)") < reading.index("TOST")


def test_control_has_no_recovery_auc_and_columns_carry_units(tmp_path):
    rows = [_row("random", s, a) for s, a in enumerate(RANDOM)]
    rows += [{**_row("control", s, 0.92), "arm": "control", "criterion": None, "method": "control", "prune_ratio": 0.0,
              "recovery_auc": 0.72} for s in range(3)]
    by_arm = {s["arm"]: s for s in summarize(rows)}
    assert by_arm["control"]["recovery_auc"] is None and by_arm["random"]["recovery_auc"] == pytest.approx(0.8)
    write_runs(rows, tmp_path / "runs.parquet", {"margin": 0.01, "confidence": 0.95, "level": "ratio",
                                                  "metric": "final_test_acc"})
    write_report(tmp_path / "runs.parquet")
    report = (tmp_path / "report.md").read_text()
    assert "recovery AUC (0-1) | FLOPs kept (share) |" in report and "test accuracy (%)" in report
    control_line = next(line for line in report.splitlines() if line.startswith("| unpruned | control |"))
    assert control_line.split(" | ")[-2] == "-"  # recovery AUC: nothing was lost, nothing to win back


# ---- a tiny real study -------------------------------------------------------------------------


def test_tiny_study_over_two_budgets_and_two_base_models(tiny_fmnist, tmp_path, capsys, ray_session):
    args = [f"data.root={tiny_fmnist}", "data.val_size=100", "data.batch_size=32", "data.eval_batch_size=100",
            "model.pretrain.epochs=1", f"cache_dir={tmp_path / 'cache'}", f"output_root={tmp_path / 'out'}",
            "name=budgets", "study.criteria=[random,l1]", "study.ratios=[0.5]", "study.seeds=[0,1]",
            "study.control=false", "study.budgets=[0.5,2]", "study.base_seeds=[0,1]", "prune.p=0.1", "prune.q=0.4",
            "prune.score_batches=1", "prune.score_batch_size=16", "measure.latency=false", "num_cpus=2"]
    assert main(args) == 0
    out = tmp_path / "out" / "budgets"
    rows = read_runs(out / "runs.parquet")
    assert len(rows) == 2 * 2 * 2 * 2 and all(r["status"] == "COMPLETED" for r in rows)
    assert len(list((tmp_path / "cache").rglob("*.pt"))) == 2  # two base models, cached apart
    by = {(r["arm"], r["seed"], r["budget"], r["base_seed"]): r for r in rows}
    for (arm, seed, budget, base), r in by.items():
        assert r["p"] == pytest.approx(0.1 * budget) and r["q"] == pytest.approx(0.4 * budget)
        if budget == 2.0:  # 4x the budget: about 4x the optimiser steps (each stage rounds its own)
            assert 3 <= r["optimizer_steps"] / by[(arm, seed, 0.5, base)]["optimizer_steps"] <= 5
    # another base model is another starting point: same arm, seed and budget, other numbers
    assert by[("l1", 0, 0.5, 0)]["base_val_acc"] != by[("l1", 0, 0.5, 1)]["base_val_acc"]
    paired = paired_vs_random(rows)
    assert len(paired) == 2 and all(p["n_bases"] == 2 and p["n_pairs"] == 4 for p in paired)
    report = (out / "report.md").read_text()
    assert "## When does random catch up?" in report and "Smallest budget" in report
    assert (out / "difference_vs_budget.png").read_bytes()[:8] == PNG


# ---- can a longer budget continue a shorter one? ------------------------------------------------


@pytest.mark.parametrize("anneal", [False, True])
def test_a_longer_q_passes_through_a_shorter_ones_result_only_without_annealing(splits, base, anneal):
    """What a continuation shortcut could reuse: with the same p, a run whose final fine-tuning is
    twice as long takes the very same first steps, so at the shorter run's last step it holds
    the shorter run's weights exactly when the learning rate is constant (anneal_final=false).
    With the default cosine annealing the schedule depends on the stage's length, so the runs
    part after the first step of q. With the default study.budget_scales=pq, budgets scale p too,
    so runs at two budgets part already at the first unit's recovery and the study runs every
    budget from the start; study.continue_budgets needs budget_scales=q and no anneal."""
    from trainables.protocol.config import FinetuneConfig, MeasureConfig, PruneConfig
    from trainables.protocol.finetune import steps_per_epoch
    from trainables.protocol.stages import run_protocol

    ft = FinetuneConfig(lr=0.02, batch_size=32, eval_batch_size=100, anneal_final=anneal)
    per_epoch = steps_per_epoch(splits, ft)
    models, curves, seen = {}, {}, {}
    for n in (8, 16):  # final fine-tuning steps; the 16-step stage evaluates at its step 8 too
        model = copy.deepcopy(base)
        prune = PruneConfig(criterion="l1", ratio=0.5, p=2 / per_epoch, q=n / per_epoch)

        def report(m: dict, model=model, n=n) -> None:  # the weights at every evaluation of the final stage
            if m["phase"] == "final_finetune":
                seen[(n, m["step"])] = {k: v.clone() for k, v in model.state_dict().items()}

        record = run_protocol(model, splits, prune, ft, measure=MeasureConfig(latency=False), seed=0,
                              evaluate_test=False, report=report)
        models[n], curves[n] = model, record["curve"]
    before_q = [[p for p in curves[n] if p["phase"] != "final_finetune"] for n in (8, 16)]
    assert before_q[0] == before_q[1]  # the same p stages: identical up to the final fine-tuning
    end = curves[8][-1]["step"]
    short, long_at_end = models[8].state_dict(), seen[(16, end)]
    same = all(torch.equal(short[k], long_at_end[k]) for k in short)
    assert same == (not anneal)


def test_budget_bench_runs_the_study_cells_resumes_and_reports(tiny_fmnist, tmp_path):
    """bench/budget_study.py: the study's own cells and report without Ray; a second start
    recomputes nothing already on disk."""
    import bench.budget_study as bench

    args = ["--", f"data.root={tiny_fmnist}", "data.val_size=100", "data.batch_size=32", "data.eval_batch_size=100",
            "model.pretrain.epochs=1", f"cache_dir={tmp_path / 'cache'}", "study.criteria=[random,l1]",
            "study.ratios=[0.5]", "study.seeds=[0,1]", "study.control=false", "study.budgets=[0.5,2]",
            "prune.p=0.1", "prune.q=0.4", "prune.score_batches=1", "prune.score_batch_size=16"]
    out = tmp_path / "bench"
    assert bench.main(["--out", str(out), "--worker", "1/2", *args]) == 0  # half of the 8 cells
    assert len(list((out / "cells").glob("*.json"))) == 4
    assert bench.main(["--out", str(out), *args]) == 0  # the other half only
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}
    assert len(stamps) == 8
    assert bench.main(["--out", str(out), *args]) == 0  # nothing left to run
    assert {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")} == stamps
    assert bench.main(["--out", str(out), "--report", *args]) == 0
    rows = read_runs(out / "runs.parquet")
    assert sorted(r["cell"] for r in rows) == list(range(8)) and {r["budget"] for r in rows} == {0.5, 2.0}
    assert "## When does random catch up?" in (out / "report.md").read_text()
    assert bench.main(["--out", str(out), "--worker", "2/2", *args]) == 2

    # A wider grid (one more budget) reuses the 8 finished cells under its own numbers.
    from search.study import load_study_config

    wider_args = [a if not a.startswith("study.budgets=") else "study.budgets=[0.5,2,4]" for a in args[1:]]
    wider, earlier = tmp_path / "wider", {json.loads(p.read_text())["cell"]["cell"]: json.loads(p.read_text())
                                          for p in (out / "cells").glob("*.json")}
    assert bench.reuse_cells(load_study_config(wider_args), wider, out) == 8
    moved = [json.loads(p.read_text()) for p in (wider / "cells").glob("*.json")]
    assert {d["cell"]["budget"] for d in moved} == {0.5, 2.0} and len(moved) == 8
    for d in moved:  # same settings and the very same record, under the wider grid's number
        old = next(e for e in earlier.values() if bench._settings(e["cell"]) == bench._settings(d["cell"]))
        assert d["record"] == old["record"]
    assert sorted(d["cell"]["cell"] for d in moved) != sorted(earlier)  # renumbered: 12 cells now
    assert bench.reuse_cells(load_study_config(wider_args), wider, out) == 0  # already there
    assert bench.main(["--out", str(wider), "--reuse", str(tmp_path / "nowhere"), *args]) == 2


@pytest.mark.parametrize("method", ["layer_by_layer", "iterative", "control"])
def test_q_points_record_exactly_what_shorter_runs_give(splits, base, method):
    """The continuation shortcut: one run with q_points answers a sweep over q. Each continued
    record equals, key for key, the record of a fresh run with that q (anneal_final=false);
    only the wall time differs. The run's own record is unchanged by the extra evaluations."""
    from trainables.protocol.config import FinetuneConfig, MeasureConfig, PruneConfig
    from trainables.protocol.finetune import steps_per_epoch
    from trainables.protocol.stages import run_protocol

    # eval_max_images: the curve reads 60 val images, each result all 100 (read again at every mark)
    ft = FinetuneConfig(lr=0.02, batch_size=32, eval_batch_size=100, anneal_final=False, eval_max_images=60)
    per_epoch = steps_per_epoch(splits, ft)
    measure = MeasureConfig(latency=False)

    def run(n_final: int, **kw) -> dict:
        prune = PruneConfig(criterion="l1", ratio=0.5, p=2 / per_epoch, q=n_final / per_epoch, method=method,
                            steps=2)
        return run_protocol(copy.deepcopy(base), splits, prune, ft, measure=measure, seed=0, **kw)

    def same(a: dict, b: dict) -> None:
        a, b = dict(a), dict(b)
        for r in (a, b):
            r.pop("wall_s")
            r.pop("continued", None)
        assert a == b

    states = []
    long = run(16, q_points=[5 / per_epoch, 8 / per_epoch], checkpoint=states.append)
    assert [c["config"]["prune"]["q"] for c in long["continued"]] == [5 / per_epoch, 8 / per_epoch]
    for n, continued in zip((5, 8), long["continued"], strict=True):
        fresh = run(n)
        same(continued, fresh)
        assert continued["curve"][-1]["step"] - long["curve"][-1]["step"] == n - 16
    same(long, run(16))
    # Resumed just before the final stage, or after it (its checkpoint keeps what the marks read):
    # the same continued records.
    for resume in (states[-2], states[-1]):
        again = run(16, q_points=[5 / per_epoch, 8 / per_epoch], resume=resume)
        for a, b in zip(again["continued"], long["continued"], strict=True):
            same(a, b)
    assert "q_ends" not in states[-2] and len(states[-1]["q_ends"]) == 2


def test_q_points_are_refused_where_a_longer_run_does_not_pass_through(splits, base):
    from trainables.protocol.config import FinetuneConfig, MeasureConfig, PruneConfig
    from trainables.protocol.stages import run_protocol

    measure, flat = MeasureConfig(latency=False), FinetuneConfig(batch_size=32, anneal_final=False)
    cases = [
        (PruneConfig(criterion="l1", ratio=0.5, q=0.5), FinetuneConfig(batch_size=32), [0.25], "anneal_final=false"),
        (PruneConfig(criterion="l1", ratio=0.5, q=0.5, method="one_shot"), flat, [0.25], "one_shot"),
        (PruneConfig(criterion="l1", ratio=0.5, q=0.5), flat, [0.5], "in (0, prune.q=0.5)"),
        (PruneConfig(criterion="l1", ratio=0.5, q=0.5), flat, [1e-6], "optimiser steps; valid: 1 to"),
    ]
    for prune, ft, points, words in cases:
        with pytest.raises(ValueError, match=re.escape(words)):
            run_protocol(copy.deepcopy(base), splits, prune, ft, measure=measure, q_points=points)


def test_a_continued_study_gives_every_budgets_cell_as_runs_from_the_start_give_it(tiny_fmnist, tmp_path, ray_session):
    """study.continue_budgets through Ray Tune: 4 trials give the 8 cells of 2 budgets, and each
    cell's numbers equal those of that cell run from the start (bench/budget_study.py, no Ray),
    as do those of the bench's own continued runs."""
    import bench.budget_study as bench

    common = [f"data.root={tiny_fmnist}", "data.val_size=100", "data.batch_size=32", "data.eval_batch_size=100",
              "model.pretrain.epochs=1", f"cache_dir={tmp_path / 'cache'}", "study.criteria=[random,l1]",
              "study.ratios=[0.5]", "study.seeds=[0,1]", "study.control=false", "study.budgets=[0.5,2]",
              "study.budget_scales=q", "finetune.anneal_final=false", "prune.p=0.1", "prune.q=0.4",
              "prune.score_batches=1", "prune.score_batch_size=16", "measure.latency=false"]
    continued = [*common, "study.continue_budgets=true"]
    assert main([*continued, f"output_root={tmp_path / 'out'}", "name=cont", "num_cpus=2"]) == 0
    rows = read_runs(tmp_path / "out" / "cont" / "runs.parquet")
    assert len(rows) == 8 and all(r["status"] == "COMPLETED" for r in rows)
    assert len({r["mlflow_run_id"] for r in rows}) == 4  # one trial (and MLflow run) per cell group
    assert sum("@b0.5" in r["run_id"] for r in rows) == 4
    assert "multiplies `prune.q` only, each cell's budgets one continued run" in (tmp_path / "out" / "cont" / "report.md").read_text()
    from search.study import load_study_config

    for out, args, runs in (("fresh", common, 8), ("bench-cont", continued, 4)):
        assert bench.run_cells(load_study_config(args), tmp_path / out, 0, 1) == runs
        assert bench.main(["--out", str(tmp_path / out), "--report", "--", *args]) == 0
    keys = ("final_test_acc", "final_val_acc", "optimizer_steps", "recovery_auc", "steps_to_recover", "p", "q",
            "curve_step", "curve_val_acc")
    by_cell = {r["cell"]: r for r in rows}
    for out in ("fresh", "bench-cont"):
        for r in read_runs(tmp_path / out / "runs.parquet"):
            got = by_cell[r["cell"]]
            assert {k: got[k] for k in keys} == {k: r[k] for k in keys}, (out, r["cell"])
    short, long = (next(r for r in rows if r["budget"] == b) for b in (0.5, 2.0))
    assert short["p"] == long["p"] == pytest.approx(0.1) and long["optimizer_steps"] > short["optimizer_steps"]


def test_continue_budgets_bench_compares_both_ways_on_tiny_data(tiny_fmnist, tmp_path, capsys):
    """bench/continue_budgets.py: fewer runs, fewer steps, and every cell's record the same."""
    import bench.continue_budgets as bench

    args = ["--out", str(tmp_path / "cb"), "--", f"data.root={tiny_fmnist}", "data.val_size=100", "data.batch_size=32",
            "data.eval_batch_size=100", "model.pretrain.epochs=1", f"cache_dir={tmp_path / 'cache'}",
            "study.budgets=[0.5,1,2]", "prune.p=0.1", "prune.q=0.4", "prune.score_batches=1", "prune.score_batch_size=16"]
    assert bench.main(args) == 0
    out = capsys.readouterr().out
    assert "| from the start | 6 |" in out and "| continued | 2 |" in out and "**6 of 6** cells" in out
