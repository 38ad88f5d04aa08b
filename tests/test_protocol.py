"""The protocol on a tiny generated Fashion-MNIST: record fields, consistency, determinism."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import torch

import trainables.protocol.finetune as finetune_module
import trainables.protocol.stages as protocol
from data import InMemoryDataset, iterate_batches
from tests.conftest import train_small_cnn
from trainables import count_flops, describe_units, get_criterion, prune_layer
from trainables.cli.base_model import train_base_model
from trainables.protocol.config import FinetuneConfig, MeasureConfig, PretrainConfig, PruneConfig
from trainables.protocol.records import ProtocolState
from trainables.protocol.stages import plan_ratios, run_protocol, scoring_batches, select_keep

# The record's keys in order: its JSON shape is an interface (run.py, search, bench read it).
RECORD_KEYS = [
    "base_val_acc", "units", "curve", "final_val_acc", "final_test_acc", "ratios", "unit_names", "flops_before",
    "flops_after", "params_before", "params_after", "latency_ms_before", "latency_ms_after", "latency_batch_size",
    "prune_log", "wall_s", "config", "method", "steps", "recovery_delta", "steps_to_recover", "recovery_auc",
    "mean_damage",
]
UNIT_KEYS = ["name", "filters_before", "filters_after", "damage_val_acc", "recovered_val_acc", "keep_idxs",
             "pre_prune_val_acc", "steps_to_recover", "recovery_auc"]
STEP_KEYS = ["step", "units", "pre_prune_val_acc", "damage_val_acc", "recovered_val_acc", "steps_to_recover",
             "recovery_auc"]
# A checkpoint's keys: the Ray trainable torch.saves it and loads it back with weights_only=True.
CHECKPOINT_KEYS = ["stage", "step", "before", "base_val", "rows", "prune_log", "steps", "curve", "model_state"]
REQUIRED = {
    "base_val_acc", "units", "curve", "final_val_acc", "final_test_acc", "flops_before", "flops_after",
    "params_before", "params_after", "latency_ms_before", "latency_ms_after", "wall_s", "config",
}
FAST = FinetuneConfig(lr=0.02, batch_size=32, eval_batch_size=100, eval_every=0.5)
MEASURE = MeasureConfig(batch_size=4, repeats=2, warmup=1)


@pytest.fixture(scope="module")
def base(splits):
    """This module keeps its 2-epoch base; conftest's is 1 epoch."""
    return train_small_cnn(splits, epochs=2)


def _run(base, splits, **prune_kwargs):
    model = copy.deepcopy(base)
    reports = []
    prune = PruneConfig(**{"p": 0.25, "q": 0.5, "score_batch_size": 32, "score_batches": 2, **prune_kwargs})
    record = run_protocol(model, splits, prune, FAST, measure=MEASURE, seed=0, report=reports.append)
    return model, record, reports


def test_layer_by_layer_record_is_complete_and_consistent(base, splits):
    model, record, reports = _run(base, splits, criterion="l1", ratio=0.5)
    assert REQUIRED <= set(record) and list(record) == RECORD_KEYS  # no final_test_top5: only 10 classes
    json.dumps(record)  # plain data
    units = describe_units(base)
    # Pruning order: output side inward.
    assert [u["name"] for u in record["units"]] == [u.name for u in reversed(units)]
    for row, unit in zip(record["units"], reversed(units), strict=True):
        assert row["filters_before"] == unit.n_filters
        assert row["filters_after"] == math.floor(unit.n_filters * 0.5 + 0.5)
        assert 0.0 <= row["damage_val_acc"] <= 1.0 and 0.0 <= row["recovered_val_acc"] <= 1.0
        assert list(row) == UNIT_KEYS and 0.0 <= row["recovery_auc"] <= 1.0
    # One measured step per unit, the same numbers as its row; each starts where the last ended.
    assert [list(s) for s in record["steps"]] == [STEP_KEYS] * len(units)
    assert record["steps"][0]["pre_prune_val_acc"] == record["base_val_acc"]
    for prev, step, row in zip([None, *record["steps"]], record["steps"], record["units"], strict=False):
        assert step["units"] == [row["name"]]
        assert all(step[k] == row[k] for k in STEP_KEYS[2:])
        if prev is not None:
            assert step["pre_prune_val_acc"] == prev["recovered_val_acc"]
    assert record["method"] == "layer_by_layer" and record["recovery_delta"] == 0.01
    drops = [s["pre_prune_val_acc"] - s["damage_val_acc"] for s in record["steps"]]
    assert record["mean_damage"] == pytest.approx(sum(drops) / len(drops))
    assert record["flops_after"] < record["flops_before"]
    assert record["params_after"] < record["params_before"]
    assert record["flops_after"] == count_flops(model)
    assert record["latency_ms_before"] > 0 and record["latency_ms_after"] > 0
    steps = [p["step"] for p in record["curve"]]
    assert steps == sorted(steps) and steps[-1] > 0
    # Every evaluation went through `report`, and the last one carries the test accuracy.
    assert [r["val_acc"] for r in reports[:-1]] == [p["val_acc"] for p in record["curve"]]
    assert reports[-1]["phase"] == "final" and reports[-1]["test_acc"] == record["final_test_acc"]
    assert record["final_val_acc"] == record["curve"][-1]["val_acc"]
    assert record["base_val_acc"] > 0.5  # the tiny data is learnable


def test_prune_log_replays_to_the_same_architecture(base, splits):
    model, record, _ = _run(base, splits, criterion="random", ratio=0.3)
    replayed = copy.deepcopy(base)
    for rec in record["prune_log"]:
        prune_layer(replayed, rec["unit"], rec["keep_idxs"])
    shapes = lambda m: [p.shape for p in m.parameters()]  # noqa: E731
    assert shapes(replayed) == shapes(model)


def test_same_seed_same_numbers(base, splits):
    _, a, _ = _run(base, splits, criterion="taylor", ratio=0.4)
    _, b, _ = _run(base, splits, criterion="taylor", ratio=0.4)
    for key in ("units", "curve", "final_val_acc", "final_test_acc", "flops_after"):
        assert a[key] == b[key]


@pytest.mark.parametrize("method", ["one_shot", "iterative"])
def test_other_methods(base, splits, method):
    model, record, _ = _run(base, splits, criterion="l2", method=method, ratio=0.5, steps=2)
    assert REQUIRED <= set(record)
    total_before = sum(u["filters_before"] for u in record["units"])
    total_after = sum(u["filters_after"] for u in record["units"])
    planned = sum(math.floor(u.n_filters * 0.5 + 0.5) for u in describe_units(base))
    assert total_after == planned and total_after < total_before
    assert record["flops_after"] == count_flops(model) < record["flops_before"]
    # Honest rows: nothing is measured per unit; the steps carry what was measured.
    assert all(u["damage_val_acc"] is None and u["recovered_val_acc"] is None for u in record["units"])
    assert len(record["steps"]) == {"one_shot": 1, "iterative": 2}[method]
    damages = [p["val_acc"] for p in record["curve"] if p["phase"] == "damage"]
    assert [s["damage_val_acc"] for s in record["steps"]] == damages
    assert record["steps"][0]["pre_prune_val_acc"] == record["base_val_acc"]
    pruned = [n for s in record["steps"] for n in s["units"]]
    assert sorted(set(pruned)) == sorted(u["name"] for u in record["units"])
    if method == "iterative":  # each step's pre-prune accuracy is the previous step's recovered one
        assert record["steps"][1]["pre_prune_val_acc"] == record["steps"][0]["recovered_val_acc"]
    else:  # one_shot's recovery is the final fine-tuning
        assert record["steps"][0]["recovered_val_acc"] == record["curve"][-1]["val_acc"]


def test_differential_prunes_more_near_the_output(base, splits):
    _, record, _ = _run(base, splits, schedule="differential", ratio_low=0.1, ratio_high=0.7, p=0.0, q=0.0)
    ratios = record["ratios"]
    assert ratios[0] == pytest.approx(0.1) and ratios[-1] == pytest.approx(0.7)
    assert ratios == sorted(ratios)


def test_round_to_8(base, splits):
    _, record, _ = _run(base, splits, ratio=0.3, round_to=8, p=0.0, q=0.0)
    assert all(u["filters_after"] % 8 == 0 for u in record["units"])


@pytest.mark.parametrize("target", [0.3, 0.5, 0.7])
def test_flops_target_met_within_two_points(base, target):
    units = describe_units(base)
    prune = PruneConfig(schedule="differential", ratio_low=0.1, ratio_high=0.5, target_flops_reduction=target)
    ratios = plan_ratios(base, units, prune)
    pruned = copy.deepcopy(base)
    for u, r in zip(units, ratios, strict=True):
        prune_layer(pruned, u.name, list(range(math.floor(u.n_filters * (1 - r) + 0.5) or 1)))
    assert abs(1 - count_flops(pruned) / count_flops(base) - target) <= 0.02


def test_select_keep_takes_the_top_scores_and_breaks_ties_by_index():
    assert select_keep(torch.tensor([0.1, 0.9, 0.5, 0.9]), 2) == [1, 3]
    assert select_keep(torch.tensor([1.0, 1.0, 1.0]), 2) == [0, 1]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"ratio": 1.0}, r"prune.ratio must be in \[0, 1\), but got 1.0"),
        ({"ratio": -0.1}, r"prune.ratio must be in \[0, 1\), but got -0.1"),
        ({"p": -1}, r"prune.p must be a number >= 0, but got -1"),
        ({"q": -0.5}, r"prune.q must be a number >= 0, but got -0.5"),
        ({"criterion": "l3"}, r"unknown criterion 'l3'; valid: apoz"),
        ({"method": "greedy"}, r"prune.method must be one of layer_by_layer, one_shot, iterative, control, scratch, greedy_car, but got 'greedy'"),
        ({"schedule": "per_layer", "ratios": [0.1, 0.2]}, r"prune.ratios must have one ratio per prunable unit \(5 .*but got 2"),
        ({"criterion": "class_specific", "target_classes": ["Sandle"]}, r"unknown class 'Sandle'; valid: T-shirt/top"),
    ],
)
def test_bad_input_fails_before_training(base, splits, kwargs, match):
    model = copy.deepcopy(base)
    calls = []
    with pytest.raises(ValueError, match=match):
        run_protocol(model, splits, PruneConfig(**kwargs), FAST, measure=MEASURE, report=calls.append)
    assert calls == []  # nothing was evaluated or trained
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), base.state_dict().values(), strict=True))


@pytest.mark.parametrize("method, resume_after", [("layer_by_layer", 2), ("iterative", 1), ("one_shot", 1),
                                                  ("control", 2), ("scratch", 1), ("scratch", 3), ("greedy_car", 2)])
def test_resume_from_a_stage_checkpoint_gives_the_same_numbers(base, splits, method, resume_after):
    prune = PruneConfig(method=method, criterion="l1", ratio=0.5, p=0.25, q=0.25, steps=2, score_batch_size=32, score_batches=2)
    states = []
    scratch = {"pretrain": PretrainConfig(epochs=1, batch_size=32), "pretrainer": train_base_model}
    full = run_protocol(copy.deepcopy(base), splits, prune, FAST, measure=MEASURE, checkpoint=states.append, **scratch)
    n_stages = {"layer_by_layer": 6, "iterative": 3, "one_shot": 2, "control": 6, "scratch": 7, "greedy_car": 6}[method]
    assert [s["stage"] for s in states] == list(range(1, n_stages + 1))
    json.dumps({k: v for k, v in states[resume_after - 1].items() if k != "model_state"})  # plain data besides weights
    reports = []
    resumed = run_protocol(copy.deepcopy(base), splits, prune, FAST, measure=MEASURE,
                           resume=states[resume_after - 1], report=reports.append, **scratch)
    for key in ("units", "curve", "final_val_acc", "final_test_acc", "flops_after", "prune_log", "base_val_acc",
                "steps", "steps_to_recover", "recovery_auc", "mean_damage"):
        assert resumed[key] == full[key], key
    # Only the evaluations after the checkpoint are reported again.
    assert reports[0]["step"] >= states[resume_after - 1]["step"]
    assert all(r["phase"] != "base" for r in reports)


def test_evaluate_test_false_never_reads_the_test_split(base, splits):
    class Exploding:
        def __len__(self):
            return 10

        def __getitem__(self, i):
            raise AssertionError("the test split was read")

    blind = dataclasses.replace(splits, test=Exploding())
    record = run_protocol(copy.deepcopy(base), blind, PruneConfig(p=0.0, q=0.1), FAST, measure=MEASURE, evaluate_test=False)
    assert record["final_test_acc"] is None


def test_eval_max_images_limits_intermediate_evaluations_only(base, splits, monkeypatch):
    seen = []
    ft = dataclasses.replace(FAST, eval_max_images=30)
    model = copy.deepcopy(base)
    from trainables.protocol.tasks import TASKS

    task = TASKS.get("classification")

    def spy(model, batches, classes=None):
        out = task.evaluate(model, batches, classes)
        seen.append(out["n"])
        return out

    # every evaluation goes through the Finetuner, which asks the model's task to evaluate
    monkeypatch.setitem(TASKS._items, "classification", dataclasses.replace(task, evaluate=spy))
    record = run_protocol(model, splits, PruneConfig(p=0.2, q=0.2, score_batches=1), ft, measure=MEASURE)
    n_val, n_test = len(splits.val), len(splits.test)
    assert seen[0] == n_val and seen[-1] == n_test and seen[-2] == n_val  # base, final val, test: all images
    assert set(seen[1:-2]) == {30}
    from trainables.core.metrics import evaluate

    assert record["final_val_acc"] == evaluate(model, iterate_batches(splits.val, 100, shuffle=False))["top1"]


def test_adaptive_bn_proxy_recalibrates_without_touching_weights_and_is_deterministic(base, splits):
    """The blended search's proxy: one-shot, no fine-tuning, BN statistics re-estimated."""
    kwargs = dict(method="one_shot", criterion="l1", ratio=0.5, p=0.0, q=0.0)
    plain, rec_plain, _ = _run(base, splits, **kwargs)
    adapted, rec, _ = _run(base, splits, **kwargs, adapt_bn_batches=3, adapt_bn_batch_size=32)
    _, rec_again, _ = _run(base, splits, **kwargs, adapt_bn_batches=3, adapt_bn_batch_size=32)
    assert rec["final_val_acc"] == rec_again["final_val_acc"]
    assert rec["prune_log"] == rec_plain["prune_log"]  # same filters removed
    sd_plain, sd = plain.state_dict(), adapted.state_dict()
    for k in sd:
        same = torch.equal(sd_plain[k], sd[k])
        assert same == (not k.endswith(("running_mean", "running_var", "num_batches_tracked"))), k
    assert rec["flops_after"] == rec_plain["flops_after"] and rec["curve"][-1]["step"] == 0  # no gradient step


NO_LATENCY = MeasureConfig(latency=False)


def _augmented(splits):
    """Splits whose ``train`` is an "augmented" copy of ``train_eval``: every pixel +1000, far
    from anything the evaluation transform produces, so a read of ``train`` shows at once."""
    shifted = InMemoryDataset(splits.train.images + 1000.0, splits.train.targets)
    return dataclasses.replace(splits, train=shifted, train_eval=splits.train)


def test_scoring_batches_read_train_eval_not_the_augmented_train(base, splits, monkeypatch):
    fake = _augmented(splits)
    direct = scoring_batches(fake, PruneConfig(score_batches=3, score_batch_size=32), seed=0)
    assert len(direct) == 3 and all(x.max() < 100 for x, _ in direct)
    # And run_protocol hands the criterion exactly those batches.
    seen, l1 = [], get_criterion("l1")

    def spy(model, unit, ctx):
        seen.append(max(float(x.abs().max()) for x, _ in ctx.batches))
        return l1(model, unit, ctx)

    monkeypatch.setattr(protocol, "get_criterion", lambda name: spy)
    prune = PruneConfig(method="one_shot", p=0.0, q=0.0, score_batches=2, score_batch_size=32)
    run_protocol(copy.deepcopy(base), fake, prune, FAST, measure=NO_LATENCY, evaluate_test=False)
    assert len(seen) == len(describe_units(base)) and max(seen) < 100


def test_adaptive_bn_re_estimates_on_train_eval_not_the_augmented_train(base, splits):
    fake = _augmented(splits)
    n = len(fake.train_eval)
    assert n % 100 == 0  # equal batches: BN's average of batch means is the mean over all images
    prune = PruneConfig(method="one_shot", criterion="l1", ratio=0.5, p=0.0, q=0.0,
                        adapt_bn_batches=n // 100, adapt_bn_batch_size=100)
    model = copy.deepcopy(base)
    run_protocol(model, fake, prune, FAST, measure=NO_LATENCY, evaluate_test=False)
    first_bn = model.features[1]

    def bn_input_mean(images):  # per channel, over (N, H, W) of the first BN's input
        with torch.no_grad():
            return model.features[0](images).mean(dim=(0, 2, 3))

    expected = bn_input_mean(fake.train_eval.images)
    assert torch.allclose(first_bn.running_mean, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(first_bn.running_mean, bn_input_mean(fake.train.images), rtol=0.1, atol=1.0)


def test_num_workers_reaches_every_loader(base, splits, monkeypatch):
    calls = []

    def spy(ds, batch_size, **kwargs):
        calls.append((ds, kwargs.get("num_workers")))
        return iterate_batches(ds, batch_size, **kwargs)  # in-memory data: num_workers is moot

    for module in (protocol, finetune_module):
        monkeypatch.setattr(module, "iterate_batches", spy)
    fake = dataclasses.replace(splits, num_workers=3)
    prune = PruneConfig(p=0.25, q=0.25, score_batches=1, score_batch_size=32, adapt_bn_batches=1, adapt_bn_batch_size=32)
    run_protocol(copy.deepcopy(base), fake, prune, FAST, measure=NO_LATENCY)
    read = {id(ds) for ds, _ in calls}
    assert {id(fake.train), id(fake.val), id(fake.test)} <= read  # train_eval is train here (in memory)
    assert [w for _, w in calls] == [3] * len(calls)


def test_checkpoint_is_plain_data_that_survives_a_weights_only_load(base, splits, tmp_path):
    """The Ray trainable's round trip: torch.save, torch.load(weights_only=True), add "done", resume."""
    prune = PruneConfig(method="one_shot", criterion="l1", ratio=0.5, p=0.0, q=0.25, score_batch_size=32, score_batches=2)
    states = []
    full = run_protocol(copy.deepcopy(base), splits, prune, FAST, measure=NO_LATENCY, checkpoint=states.append)
    assert all(list(s) == CHECKPOINT_KEYS for s in states)
    assert isinstance(states[0]["steps"][0]["damage_val_acc"], float) and states[0]["steps"][0]["recovered_val_acc"] is None
    for s in states:  # the typed state reads and writes the same dict
        assert ProtocolState.from_dict(s).to_dict() == {k: v for k, v in s.items() if k != "model_state"}
    torch.save(states[0], tmp_path / "state.pt")
    loaded = {**torch.load(tmp_path / "state.pt", weights_only=True), "done": False}
    resumed = run_protocol(copy.deepcopy(base), splits, prune, FAST, measure=NO_LATENCY, resume=loaded)
    for key in ("units", "curve", "final_val_acc", "final_test_acc", "prune_log"):
        assert resumed[key] == full[key], key


def test_resume_from_something_else_fails_with_one_line(base, splits):
    with pytest.raises(ValueError, match="resume: not a protocol checkpoint, missing"):
        ProtocolState.from_dict({"stage": 1})
    with pytest.raises(ValueError, match="resume: the checkpoint has no model_state"):
        run_protocol(copy.deepcopy(base), splits, PruneConfig(), FAST, measure=NO_LATENCY, resume={"stage": 1})
