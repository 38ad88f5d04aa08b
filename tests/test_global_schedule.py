"""prune.schedule=global: one ranking of unit-normalised criterion scores over all units
(torch-pruning's global pruning), a floor per unit, the overall ratio as promised."""

from __future__ import annotations

import copy
import math

import optuna
import pytest
import torch

from search.space import check_global_choice, check_space, define_space
from trainables.core.models import build_model
from trainables.core.surgery import describe_units
from trainables.criteria import ScoringContext, get_criterion
from trainables.protocol.config import FinetuneConfig, MeasureConfig, PruneConfig
from trainables.protocol.planning import FlopsModel, plan_ratios
from trainables.protocol.schedules import global_floors, global_kept, kept_count, make_ratios
from trainables.protocol.stages import run_protocol


def _scores(counts: list[int], seed: int = 0) -> list[torch.Tensor]:
    """Positive scores on very different scales per unit (as L1 norms of wide and narrow layers)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(n, generator=g) * 10.0 ** (i % 3) for i, n in enumerate(counts)]


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.37, 0.5, 0.8])
def test_global_removes_the_promised_share_of_all_filters(ratio):
    counts = [16, 32, 64, 64, 128, 10]
    kept = global_kept(_scores(counts), ratio, min_keep=0.1)
    total = sum(counts)
    assert sum(kept) == math.floor(total * (1 - ratio) + 0.5)
    # ...and make_ratios's ratios give back exactly those counts through kept_count
    ratios = make_ratios("global", counts, ratio=ratio, scores=_scores(counts), min_keep=0.1)
    assert [kept_count(n, r) for n, r in zip(counts, ratios, strict=True)] == kept


def test_global_respects_each_units_floor():
    counts = [8, 30, 64, 100]
    scores = _scores(counts)
    # Normalised by its mean, unit 1's 29 weak filters sit far below every other unit's: one
    # strong filter, 29 near zero.
    scores[1] = torch.cat([torch.full((29,), 1e-3), torch.tensor([100.0])])
    kept = global_kept(scores, 0.6, min_keep=0.25)
    floors = global_floors(counts, 0.25)
    assert floors == [2, 8, 16, 25]  # ceil(0.25 n): 7.5 -> 8 for 30 filters
    assert all(k >= f for k, f in zip(kept, floors, strict=True))
    assert kept[1] == floors[1]  # the unit whose normalised scores are lowest is cut down to its floor


def test_global_is_not_uniform_and_follows_normalised_scores():
    # Two units of equal width; unit 0's scores spread widely, unit 1's are all equal: after
    # normalisation unit 0's weak filters fall below unit 1's, so unit 0 loses more.
    spread = torch.tensor([0.01, 0.02, 0.03, 0.04, 2.0, 3.0, 4.0, 5.0])
    flat = torch.full((8,), 7.0)
    kept = global_kept([spread, flat], 0.25, min_keep=0.1)
    assert kept == [4, 8]
    # scale does not matter: multiplying a unit's scores by 1000 changes nothing
    assert global_kept([spread * 1000, flat], 0.25, min_keep=0.1) == kept


def test_global_is_deterministic_and_ties_go_towards_the_input():
    counts = [12, 12, 12]
    tied = [torch.ones(n) for n in counts]
    a = global_kept(tied, 0.25, min_keep=0.1)
    assert a == global_kept([t.clone() for t in tied], 0.25, min_keep=0.1)
    assert a == [3, 12, 12]  # all equal: the 9 dropped filters all come from the unit nearest the input
    scores = _scores([20, 40, 80], seed=3)
    assert global_kept(scores, 0.5, 0.1) == global_kept([s.clone() for s in scores], 0.5, 0.1)


def test_global_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match=r"^prune.ratio must be <= 0.7500 with prune.global_min_keep=0.25"):
        global_kept([torch.rand(8), torch.rand(8)], 0.8, min_keep=0.25)
    with pytest.raises(ValueError, match=r"^prune.schedule=global needs the criterion's scores"):
        make_ratios("global", [8, 8], ratio=0.5)
    with pytest.raises(ValueError, match=r"^scores must have one tensor per unit"):
        make_ratios("global", [8, 8], ratio=0.5, scores=[torch.rand(8)])
    with pytest.raises(ValueError, match=r"^prune.global_min_keep must be in \(0, 1\), but got 1.5"):
        global_kept([torch.rand(8)], 0.5, min_keep=1.5)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"schedule": "global", "method": "control"}, r"^prune.method must be layer_by_layer or one_shot with prune.schedule=global"),
    ({"schedule": "global", "method": "iterative"}, r"^prune.method must be .*iterative ranks all units globally"),
    ({"schedule": "global", "method": "scratch"}, r"^prune.method must be .* but got 'scratch'$"),
    ({"schedule": "global", "method": "greedy_car"}, r"^prune.method must be .* but got 'greedy_car'$"),
    ({"schedule": "global", "global_min_keep": 0.0}, r"^prune.global_min_keep must be in \(0, 1\), but got 0.0$"),
    ({"schedule": "global", "ratio": 0.85, "global_min_keep": 0.2}, r"^prune.ratio must be <= 1 - prune.global_min_keep = 0.8"),
])
def test_config_refuses_global_combinations_in_one_line(kwargs, message):
    with pytest.raises(ValueError, match=message) as err:
        PruneConfig(**kwargs)
    assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def vgg16():
    torch.set_num_threads(1)
    model = build_model("vgg16")
    return model, describe_units(model)


def test_plan_ratios_global_on_vgg16_with_l1(vgg16):
    model, units = vgg16
    prune = PruneConfig(schedule="global", ratio=0.5, criterion="l1", global_min_keep=0.2)
    criterion, ctx = get_criterion("l1"), ScoringContext(batches=[], seed=0)
    ratios = plan_ratios(model, units, prune, scorer=lambda u: criterion(model, u, ctx))
    counts = [u.n_filters for u in units]
    kept = [kept_count(n, r) for n, r in zip(counts, ratios, strict=True)]
    assert sum(kept) == sum(counts) // 2
    assert all(k >= math.ceil(0.2 * n) for k, n in zip(kept, counts, strict=True))
    assert len(set(ratios)) > 1  # not uniform
    with pytest.raises(ValueError, match=r"^prune.schedule=global ranks the criterion's scores"):
        plan_ratios(model, units, prune)  # no scorer


def test_plan_ratios_global_meets_a_flops_target(vgg16):
    model, units = vgg16
    prune = PruneConfig(schedule="global", criterion="l1", target_flops_reduction=0.5)
    criterion, ctx = get_criterion("l1"), ScoringContext(batches=[], seed=0)
    ratios = plan_ratios(model, units, prune, scorer=lambda u: criterion(model, u, ctx))
    flops = FlopsModel(model, units)
    assert abs(1 - flops.flops_with_ratios(ratios) / flops.base - 0.5) <= 0.02


FAST = FinetuneConfig(lr=0.02, batch_size=32, eval_batch_size=100, evals_per_stage=1)
MEASURE = MeasureConfig(latency=False)


@pytest.mark.parametrize("method", ["one_shot", "layer_by_layer"])
def test_protocol_runs_global_and_records_its_ratios(base, splits, method):
    prune = PruneConfig(method=method, schedule="global", ratio=0.5, criterion="l1", p=0.0, q=0.0,
                        score_batch_size=32, score_batches=1, global_min_keep=0.25)
    runs = [run_protocol(copy.deepcopy(base), splits, prune, FAST, measure=MEASURE, seed=0) for _ in range(2)]
    record = runs[0]
    units = describe_units(base)
    before = {u.name: u.n_filters for u in units}
    after = {row["name"]: row["filters_after"] for row in record["units"]}
    assert sum(after.values()) == math.floor(sum(before.values()) * 0.5 + 0.5)
    assert all(after[n] >= math.ceil(0.25 * before[n]) for n in before)
    assert [kept_count(before[n], r) for n, r in zip(record["unit_names"], record["ratios"], strict=True)] == \
        [after[n] for n in record["unit_names"]]
    assert runs[1]["ratios"] == record["ratios"]  # deterministic
    if method == "one_shot":  # scored once on the unpruned net: keeps exactly the top of the one ranking
        assert [r["keep_idxs"] for r in runs[1]["prune_log"]] == [r["keep_idxs"] for r in record["prune_log"]]


def _space(**over):
    return {"criteria": ["l1", "random"], "schedules": ["uniform", "global"], "ratio": {"low": 0.1, "high": 0.8},
            "p": None, "q": None, "lr": None, **over}


def test_search_offers_global_with_one_overall_ratio():
    space = _space(schedules=["global"])
    check_space(space, ["l1", "random"])
    fn = define_space(space, n_units=5, criteria=["l1", "random"])
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: (fn(t), 0.0)[1], n_trials=3)
    for trial in study.trials:
        assert trial.params["schedule"] == "global"
        assert set(trial.params) == {"criterion", "schedule", "ratio"}


def test_search_refuses_global_where_trials_could_not_run():
    with pytest.raises(ValueError, match=r"^search.schedules must not include global when search.criteria includes greedy_car"):
        check_space(_space(criteria=["l1", "greedy_car"]), ["l1"])
    with pytest.raises(ValueError, match=r"^search.schedules must not include global with prune.method=iterative"):
        check_global_choice(_space(), {"method": "iterative"})
    with pytest.raises(ValueError, match=r"^search.ratio.high must be <= 1 - prune.global_min_keep = 0.7"):
        check_global_choice(_space(), {"method": "one_shot", "global_min_keep": 0.3})
    check_global_choice(_space(), {"method": "one_shot", "global_min_keep": 0.1})  # fine
    check_global_choice(_space(schedules=["uniform"]), {"method": "iterative"})  # global not offered: fine


@pytest.mark.parametrize(("command", "argv", "musts"), [
    ("run", ["prune.global_min_keep=0.3"], ["prune.global_min_keep is read only with prune.schedule=global, "
                                            "but got prune.schedule=uniform"]),
    ("run", ["prune.schedule=global", "prune.method=iterative"], ["prune.method must be layer_by_layer or one_shot "
                                                                  "with prune.schedule=global"]),
    ("run", ["prune.schedule=global", "prune.ratio=0.95"], ["prune.ratio must be <= 1 - prune.global_min_keep = 0.9"]),
    ("launch", ["prune.global_min_keep=0.3", "search.schedules=[uniform]"],
     ["prune.global_min_keep is read only with prune.schedule=global"]),
    ("launch", ["prune.global_min_keep=0.3", "search.ratio.high=0.9"],
     ["search.ratio.high must be <= 1 - prune.global_min_keep = 0.7 with global in search.schedules, but got 0.9"]),
    ("launch", ["prune.method=iterative"], ["search.schedules must not include global with prune.method=iterative"]),
])
def test_command_lines_refuse_global_misuse_before_any_work(capsys, command, argv, musts):
    from search.launch import main as launch
    from tests.conftest import assert_refused
    from trainables.run import main as run

    assert_refused(capsys, {"run": run, "launch": launch}[command](argv), musts)
