"""Recovery speed on synthetic curves with known answers; evaluation points; fixed-step data
efficiency; the control and scratch baselines' budgets and architecture."""

from __future__ import annotations

import copy

import pytest
import torch

from data import get_data
from trainables import build_model, describe_units
from trainables.cli.base_model import train_base_model
from trainables.protocol.config import FinetuneConfig, MeasureConfig, PretrainConfig, PruneConfig
from trainables.protocol.finetune import Finetuner, stage_eval_steps
from trainables.protocol.recovery import (
    recovery_auc,
    run_recovery,
    stage_recovery,
    steps_to_recover,
)
from trainables.protocol.schedules import kept_count
from trainables.protocol.stages import run_protocol

FT = FinetuneConfig(lr=0.02, batch_size=32, eval_batch_size=100)
NO_LATENCY = MeasureConfig(latency=False)


def _points(steps, accs, phases=None):
    phases = phases or ["recovery"] * len(steps)
    return [{"step": s, "epoch": 0.0, "val_acc": a, "phase": p} for s, a, p in zip(steps, accs, phases, strict=True)]


def test_steps_and_auc_on_a_synthetic_curve_with_a_known_answer():
    steps, accs = [0, 10, 20, 30], [0.5, 0.7, 0.9, 0.9]
    # r = (acc - 0.5) / (0.9 - 0.5) = 0, 0.5, 1, 1; trapezoid: 2.5 + 7.5 + 10 = 20 over 30 steps.
    assert recovery_auc(steps, accs, pre=0.9, damage=0.5) == pytest.approx(2 / 3)
    assert steps_to_recover(steps, accs, 0.9 - 0.01) == 20
    assert steps_to_recover(steps, accs, 0.95) is None  # never
    assert steps_to_recover([5, 9], [0.895, 0.7], 0.89) == 0  # the damage is already within delta
    # Clipped: above pre counts 1, below the damage 0; nothing lost -> 1.
    assert recovery_auc([0, 10], [0.5, 0.99], pre=0.9, damage=0.5) == pytest.approx(0.5)
    assert recovery_auc([0, 10], [0.5, 0.3], pre=0.9, damage=0.5) == 0.0
    assert recovery_auc([0, 10], [0.9, 0.2], pre=0.8, damage=0.9) == 1.0
    assert recovery_auc([7], [0.5], pre=0.9, damage=0.5) == 0.0  # no fine-tuning step: the damage's r
    # Uneven spacing is weighted by steps, not by points.
    assert recovery_auc([0, 1, 100], [0.5, 0.9, 0.9], pre=0.9, damage=0.5) == pytest.approx((0.5 + 99) / 100)
    assert stage_recovery(_points(steps, accs), pre=0.9, delta=0.01) == {"steps_to_recover": 20,
                                                                          "recovery_auc": pytest.approx(2 / 3)}


def test_run_recovery_counts_from_the_last_pruning_and_integrates_from_the_first():
    curve = _points([0, 0, 10, 10, 20, 40], [0.9, 0.6, 0.8, 0.5, 0.7, 0.895],
                    ["base", "damage", "recovery", "damage", "recovery", "final_finetune"])
    out = run_recovery(curve, base=0.9, delta=0.01)
    assert out["steps_to_recover"] == 30  # from step 10 (the last damage) to step 40
    # damage = the run's lowest point 0.5: r = 0.25, 0.75, 0, 0.5, 0.9875 at steps 0, 10, 10, 20, 40.
    area = 10 * (0.25 + 0.75) / 2 + 0 + 10 * (0 + 0.5) / 2 + 20 * (0.5 + 0.9875) / 2
    assert out["recovery_auc"] == pytest.approx(area / 40)
    never = run_recovery(curve[:-1], base=0.9, delta=0.01)
    assert never["steps_to_recover"] is None
    control = run_recovery(_points([0, 5, 10], [0.9, 0.91, 0.92], ["base", "control", "control"]), 0.9, 0.01)
    assert control == {"steps_to_recover": 0, "recovery_auc": 1.0}


def test_stage_eval_steps():
    assert stage_eval_steps(100, 4) == [25, 50, 75, 100]
    assert stage_eval_steps(10, 4) == [2, 5, 8, 10]  # round(2.5) = 2, round(7.5) = 8 (banker's rounding)
    assert stage_eval_steps(3, 4) == [1, 2, 3]  # duplicates merge
    assert stage_eval_steps(10, 1, every=4) == [4, 8, 10]
    assert stage_eval_steps(0, 4) == [0]


@pytest.fixture(scope="module")
def base_and_splits(tiny_fmnist):
    splits = get_data("fashion_mnist", str(tiny_fmnist), val_size=100)
    torch.manual_seed(0)
    model = build_model("small_cnn")
    train_base_model(model, splits, PretrainConfig(epochs=1, batch_size=32), seed=0, progress=False, log=lambda *_: None)
    return model.eval(), splits


def test_every_stage_has_evals_per_stage_points(base_and_splits):
    base, splits = base_and_splits
    prune = PruneConfig(ratio=0.5, p=0.5, q=0.5, score_batches=1, score_batch_size=32)
    record = run_protocol(copy.deepcopy(base), splits, prune, FinetuneConfig(batch_size=32, eval_batch_size=100,
                          evals_per_stage=3), measure=NO_LATENCY, evaluate_test=False)
    n_units = len(describe_units(base))
    phases = [p["phase"] for p in record["curve"]]
    assert phases.count("recovery") == 3 * n_units and phases.count("final_finetune") == 3
    assert phases.count("damage") == n_units


@pytest.mark.parametrize("follow", [False, True])
def test_fine_tuning_steps_do_not_depend_on_the_data_fraction(tiny_fmnist, follow):
    ft = FinetuneConfig(batch_size=32, eval_batch_size=100, steps_follow_fraction=follow)
    counts = {}
    for fraction in (0.05, 0.2, 1.0):
        splits = get_data("fashion_mnist", str(tiny_fmnist), val_size=100, fraction=fraction)
        assert splits.train_size_full == 500 and len(splits.train) == round(500 * fraction)
        tuner = Finetuner(build_model("small_cnn"), splits, ft, seed=0, report=lambda _m: None, progress=False,
                          total_epochs=0)
        tuner.finetune(1.0, "recovery")
        counts[fraction] = tuner.step
    if follow:  # the old behaviour: an epoch is a pass over the fraction
        assert counts[0.05] < counts[0.2] < counts[1.0]
    else:
        assert counts[0.05] == counts[0.2] == counts[1.0] == 500 // 32


def _run(base, splits, **kwargs):
    prune = PruneConfig(**{"ratio": 0.5, "p": 0.25, "q": 0.5, "score_batches": 1, "score_batch_size": 32, **kwargs})
    model = copy.deepcopy(base)
    record = run_protocol(model, splits, prune, FT, measure=NO_LATENCY, evaluate_test=False,
                          pretrain=PretrainConfig(epochs=1, batch_size=32), pretrainer=train_base_model)
    return model, record


def test_control_gets_layer_by_layer_budget_and_prunes_nothing(base_and_splits):
    base, splits = base_and_splits
    _, lbl = _run(base, splits)
    model, control = _run(base, splits, method="control", criterion="class_specific", target_classes=["Sandal"])
    assert control["curve"][-1]["step"] == lbl["curve"][-1]["step"] > 0
    assert control["steps"] == [] and control["units"] == [] and control["prune_log"] == []
    assert control["flops_after"] == control["flops_before"] == lbl["flops_before"]
    assert control["config"]["prune"]["criterion"] == "class_specific"  # recorded as given, ignored
    assert control["method"] == "control" and control["mean_damage"] is None
    n_units = len(describe_units(base))
    phases = [p["phase"] for p in control["curve"]]
    assert phases.count("control") == [p["phase"] for p in lbl["curve"]].count("recovery") == 4 * n_units
    assert [p["step"] for p in control["curve"]] == [p["step"] for p in lbl["curve"] if p["phase"] != "damage"]


def test_scratch_is_the_pruned_architecture_trained_afresh_with_the_whole_budget(base_and_splits):
    base, splits = base_and_splits
    pruned, lbl = _run(base, splits)
    model, scratch = _run(base, splits, method="scratch")
    shapes = lambda m: {k: v.shape for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(model) == shapes(pruned)
    units = describe_units(base)
    assert [u["filters_after"] for u in scratch["units"]] == [
        kept_count(u.n_filters, 0.5, 1) for u in reversed(units)]
    assert all(u["keep_idxs"] == list(range(u["filters_after"])) for u in scratch["units"])
    # Not derived from the base: the first conv's kept filters differ from the base's.
    first = units[0].name + ".weight"
    kept = scratch["units"][-1]["filters_after"]
    assert not torch.allclose(model.state_dict()[first], base.state_dict()[first][:kept], atol=1e-3)
    # Budget: one pretraining epoch of all 500 images, then layer_by_layer's fine-tuning steps.
    assert scratch["curve"][-1]["step"] == 500 // 32 + lbl["curve"][-1]["step"]
    assert scratch["base_val_acc"] == lbl["base_val_acc"] and scratch["steps"] == []
    assert scratch["flops_after"] == lbl["flops_after"]
    phases = [p["phase"] for p in scratch["curve"]]
    assert phases[:3] == ["base", "init", "scratch_pretrain"]


def test_scratch_without_the_pretraining_recipe_fails_before_any_work(base_and_splits):
    base, splits = base_and_splits
    calls = []
    with pytest.raises(ValueError, match="pretrain and pretrainer must be"):
        run_protocol(copy.deepcopy(base), splits, PruneConfig(method="scratch"), FT, report=calls.append)
    assert calls == []


@pytest.mark.parametrize("kwargs, match", [
    ({"evals_per_stage": 0}, r"finetune.evals_per_stage must be an integer >= 1, but got 0"),
    ({"recovery_delta": 1.0}, r"finetune.recovery_delta must be in \(0, 1\), but got 1.0"),
    ({"steps_follow_fraction": 1}, r"finetune.steps_follow_fraction must be true or false, but got 1"),
    ({"eval_every": 0}, r"finetune.eval_every must be a number > 0, but got 0"),
])
def test_bad_finetune_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FinetuneConfig(**kwargs)
