"""What the search's samplers and schedulers are told, and the costs a front can be built on."""

from __future__ import annotations

import optuna
import pytest
import torch
from optuna.trial import TrialState

from search.pareto import OBJECTIVES, check_objective, front_rows, mark_pareto, plot_front
from search.retime import retime_models
from search.searcher import FinishedOnlyOptunaSearch
from trainables.core.models import build_model
from trainables.ray_trainable import _Reporter, last_recovery_acc, with_recovery_acc

# ---- Optuna is told only finished trials as COMPLETE ------------------------------------------


def _searcher() -> FinishedOnlyOptunaSearch:
    def space(trial: optuna.Trial) -> None:
        trial.suggest_float("ratio", 0.1, 0.9)

    return FinishedOnlyOptunaSearch(space=space, metric=["val_acc", "flops"], mode=["max", "min"],
                                    sampler=optuna.samplers.RandomSampler(seed=0))


@pytest.mark.parametrize(("result", "error", "state"), [
    ({"val_acc": 0.9, "flops": 10, "trial_done": True}, False, TrialState.COMPLETE),
    ({"val_acc": 0.4, "flops": 10, "phase": "recovery"}, False, TrialState.PRUNED),  # stopped by ASHA
    ({"val_acc": 0.4, "flops": 10}, True, TrialState.FAIL),  # raised after some reports
    (None, False, TrialState.PRUNED),
])
def test_optuna_hears_complete_only_for_finished_trials(result, error, state):
    searcher = _searcher()
    config = searcher.suggest("t1")
    assert 0.1 <= config["ratio"] <= 0.9
    searcher.on_trial_complete("t1", result=result, error=error)
    [trial] = searcher._ot_study.get_trials(deepcopy=False)  # the study Ray's adapter keeps
    assert trial.state == state
    assert (trial.values == [0.9, 10]) if state == TrialState.COMPLETE else trial.values is None


# ---- ASHA compares recovery points only ---------------------------------------------------------


def test_recovery_acc_is_carried_over_damage_points():
    sent = []
    reporter = _Reporter(lambda m, **_: sent.append(m), checkpoint_cls=None, write_checkpoints=False)
    curve = [("base", 0, 0.90), ("damage", 0, 0.30), ("recovery", 5, 0.80), ("damage", 5, 0.20),
             ("recovery", 9, 0.85), ("final_finetune", 20, 0.88)]
    for phase, step, acc in curve:
        reporter.report({"phase": phase, "step": step, "val_acc": acc})
    reporter.flush()
    assert [m["recovery_acc"] for m in sent] == [0.90, 0.90, 0.80, 0.80, 0.85, 0.88]
    assert [m["val_acc"] for m in sent] == [acc for _, _, acc in curve]  # val_acc itself is untouched
    # a restored trial starts from its checkpointed curve's last recovery point
    assert last_recovery_acc([{"phase": p, "val_acc": a} for p, _, a in curve[:4]]) == 0.80
    assert last_recovery_acc([]) is None
    assert "recovery_acc" not in with_recovery_acc({"phase": "damage", "val_acc": 0.1})


# ---- the costs a front follows ------------------------------------------------------------------


def _row(tid: str, acc: float, flops: int, latency: float, params: int) -> dict:
    return {"trial_id": tid, "status": "COMPLETED", "criterion": "l1", "val_acc": acc, "flops": flops,
            "latency_ms": latency, "params": params}


def test_front_follows_the_chosen_cost():
    rows = [_row("a", 0.90, 100, 9.0, 50), _row("b", 0.85, 50, 10.0, 40), _row("c", 0.80, 80, 2.0, 60)]
    assert [r["trial_id"] for r in front_rows(rows, "flops")] == ["b", "a"]
    assert [r["trial_id"] for r in front_rows(rows, "latency_ms")] == ["c", "a"]  # b is slower than a here
    assert [r["trial_id"] for r in front_rows(rows, "params")] == ["b", "a"]
    assert [r["pareto"] for r in mark_pareto(rows, "latency_ms")] == [True, False, True]
    rows.append({**_row("d", 0.99, 10, 1.0, 1), "latency_ms": None})  # not re-timed: off a latency front
    assert "d" not in [r["trial_id"] for r in front_rows(rows, "latency_ms")]


def test_check_objective_names_the_allowed_costs():
    assert check_objective("latency")[0] == "latency_ms"
    with pytest.raises(ValueError, match=r"search.objectives\[1\] must be one of flops, params, latency, but got 'energy'"):
        check_objective("energy")
    assert set(OBJECTIVES) == {"flops", "params", "latency"}


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_plot_front_draws_the_chosen_cost(tmp_path, objective):
    rows = mark_pareto([_row("a", 0.90, 100, 9.0, 50), _row("b", 0.85, 50, 10.0, 40)], check_objective(objective)[0])
    path = tmp_path / f"{objective}.png"
    plot_front(rows, path, base_acc=0.95, base_cost=12.0, objective=objective, title=objective)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- serial re-timing ---------------------------------------------------------------------------


def test_retime_models_orders_models_by_size_and_reports_ratios():
    torch.manual_seed(0)
    models = {f"w{w}": build_model("small_cnn", width=w) for w in (4, 16, 64)}
    base = build_model("small_cnn")
    timed = retime_models(models, base, input_shape=(1, 28, 28), batch_size=16, threads=1, rounds=2, repeats=2)
    assert set(timed.latency_ms) == set(models) and timed.rounds == 2 and timed.base_ms > 0
    # 256x the FLOPs of the smallest: slower on any machine, however busy
    assert timed.latency_ms["w64"] > timed.latency_ms["w4"]
    assert timed.latency_kept["w64"] > timed.latency_kept["w4"] > 0
    assert timed.halves_spearman is not None and -1 <= timed.halves_spearman <= 1
    assert retime_models({"a": models["w4"]}, base, input_shape=(1, 28, 28), rounds=2, repeats=1).halves_spearman is None
    with pytest.raises(ValueError, match="search.retime.rounds must be an integer >= 2, but got 1"):
        retime_models(models, base, input_shape=(1, 28, 28), rounds=1)


# ---- how often a trial saves ----------------------------------------------------------------------


class _FakeCheckpoint:
    @classmethod
    def from_directory(cls, path: str) -> str:
        return sorted(p.name for p in __import__("pathlib").Path(path).iterdir())


@pytest.mark.parametrize(("every_s", "saved_stages"), [(0.0, 3), (3600.0, 0)])
def test_stage_checkpoints_follow_checkpoint_every_s_and_the_final_one_is_always_written(every_s, saved_stages):
    sent = []
    reporter = _Reporter(lambda m, checkpoint=None: sent.append((m, checkpoint)), _FakeCheckpoint,
                         write_checkpoints=True, every_s=every_s)
    for step in (1, 2, 3):
        reporter.report({"phase": "recovery", "step": step, "val_acc": 0.5})
        reporter.checkpoint({"stage": step})
    reporter.report({"phase": "final", "step": 4, "val_acc": 0.6})
    reporter.checkpoint({"stage": 4, "done": True}, record={"final_val_acc": 0.6})
    assert [m["step"] for m, _ in sent] == [1, 2, 3, 4]  # every evaluation is one result either way
    assert sum(c is not None for m, c in sent[:3]) == saved_stages
    # progress.json: the stage/step a resumed trial compares checkpoints by (ray_trainable, issue 22 point 4)
    assert sent[-1][1] == ["progress.json", "record.json", "state.pt"] and reporter.n_checkpoints == saved_stages + 1
    assert all(m["cost"] != m["cost"] for m, _ in sent)  # no flops in these reports: NaN until known
