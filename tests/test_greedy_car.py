"""Greedy CAR: the fast order equals the naive greedy order, rescore_every, ties by loss, the
screening after the next conv (its bounds, exact tie-breaks and fallbacks), bad inputs, the
caller's model untouched, and the protocol method end to end."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

import trainables.protocol.greedy_car as greedy
from trainables import build_model, describe_units
from trainables.protocol.config import FinetuneConfig, MeasureConfig, PruneConfig
from trainables.protocol.greedy_car import greedy_car_order, greedy_car_order_naive
from trainables.protocol.schedules import kept_count
from trainables.protocol.stages import run_protocol


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: these forwards are tiny, and on a busy machine extra threads mostly
    wait for each other (the file ran 10x slower under load with two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _self_labelled(model: nn.Module, n: int, batch: int, seed: int, noise: float = 0.0, side: int | None = None) -> list:
    """Random images labelled with the model's own predictions (a share flipped by ``noise``),
    so that removing filters flips predictions that count; ``side``: another image size."""
    g = torch.Generator().manual_seed(seed)
    c, h, w = model.input_shape
    x = torch.randn(n, c, side or h, side or w, generator=g)
    with torch.no_grad():
        y = model.eval()(x).argmax(dim=1)
    flip = torch.rand(n, generator=g) < noise
    y[flip] = (y[flip] + 1) % 10
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def _bn_net() -> nn.Module:
    """A small conv net with BN: the unit "0" has 8 filters, "3" has 12."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.Conv2d(8, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(48, 10),
    )
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):  # non-trivial statistics, so BN matters
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    model.input_shape = (3, 8, 8)
    return model.eval()


@pytest.fixture(scope="module")
def bn_case():
    model = _bn_net()
    return model, _self_labelled(model, 96, 32, seed=1, noise=0.1)


@pytest.mark.parametrize("unit, n_remove, rescore_every", [("0", 6, 1), ("0", 6, 2), ("3", 7, 1), ("3", 7, 3)])
def test_order_equals_the_naive_greedy_order_with_bn(bn_case, unit, n_remove, rescore_every):
    model, batches = bn_case
    fast = greedy_car_order(model, unit, batches, n_remove=n_remove, rescore_every=rescore_every)
    naive = greedy_car_order_naive(model, unit, batches, n_remove=n_remove, rescore_every=rescore_every)
    assert fast == naive
    assert len(set(fast)) == n_remove


def test_the_cached_split_and_the_hook_fallback_give_the_same_order(bn_case, monkeypatch):
    model, batches = bn_case
    unit = describe_units(model)[0]
    images = torch.cat([x for x, _ in batches])
    _, exact = greedy._evaluators(model, unit, images, batches, None)
    assert isinstance(exact, greedy._SplitEvaluator)  # traced and cached
    cached = greedy_car_order(model, "0", batches, n_remove=5)

    def untraceable(*_a, **_k):
        raise RuntimeError("no fx")

    monkeypatch.setattr(greedy._SplitEvaluator, "__init__", untraceable)
    screen, exact = greedy._evaluators(model, unit, images, batches, None)
    assert isinstance(exact, greedy._HookEvaluator) and screen is exact
    assert greedy_car_order(model, "0", batches, n_remove=5) == cached


# ---- screening after the next conv (_DeltaEvaluator) ----

def _rows(n_filters: int, n_images: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (candidate, image) row, candidate -1 (nothing removed) included."""
    cands = torch.arange(-1, n_filters).repeat_interleave(n_images)
    return cands, torch.arange(n_images).repeat(n_filters + 1)


def test_a_first_layer_is_screened_after_the_next_conv_and_keeps_the_naive_order():
    """small_cnn's first layer (conv, BN, ReLU, max-pool, conv, ...): the screening subtracts a
    filter's share from the next conv's output; its logits match the masked network's to
    float rounding, and the order is the naive one."""
    torch.manual_seed(0)
    model = build_model("small_cnn", width=8).eval()
    batches = _self_labelled(model, 48, 24, seed=4, noise=0.2)
    unit = describe_units(model)[0]
    images = torch.cat([x for x, _ in batches])
    screen, exact = greedy._evaluators(model, unit, images, batches, None)
    assert isinstance(screen, greedy._DeltaEvaluator) and isinstance(exact, greedy._SplitEvaluator)
    base = torch.ones(unit.n_filters)
    base[3] = 0  # a filter already removed
    cands, idx = _rows(unit.n_filters, 6)
    with torch.no_grad():
        screened, masked = screen.logits(base, cands, idx), exact.logits(base, cands, idx)
    assert torch.allclose(screened, masked, rtol=0, atol=1e-4 * float(masked.abs().max()))
    fast = greedy_car_order(model, unit.name, batches, n_remove=5)
    assert fast == greedy_car_order_naive(model, unit.name, batches, n_remove=5)


def test_the_screening_falls_back_to_exact_evaluations_where_it_does_not_apply(bn_case, resnet_case):
    """Not after a lone plain conv (unit "3" feeds a pooling and the linear head), several
    activation points (a residual-coupled unit), or a custom loss (no error bound): the
    screening is the exact evaluator itself, and the order still the naive one."""
    model, batches = bn_case
    images = torch.cat([x for x, _ in batches])
    first, second = describe_units(model)
    assert greedy._evaluators(model, second, images, batches, None)[0].exact
    assert greedy._evaluators(model, first, images, batches, nn.functional.cross_entropy)[0].exact
    assert not greedy._evaluators(model, first, images, batches, None)[0].exact
    resnet, rbatches = resnet_case
    coupled = next(u for u in describe_units(resnet) if len(u.act_points) > 1)
    assert greedy._evaluators(resnet, coupled, torch.cat([x for x, _ in rbatches]), rbatches, None)[0].exact
    assert greedy_car_order(model, "3", batches, n_remove=5) == greedy_car_order_naive(model, "3", batches, n_remove=5)


def _dead_filters_case() -> tuple[nn.Module, list]:
    """``_bn_net`` with filters 2 and 5 of unit "0" dead (BN output -1, zero after the ReLU):
    removing either changes nothing, so the two tie exactly and the index decides."""
    model = _bn_net()
    with torch.no_grad():
        model[1].weight[[2, 5]] = 0
        model[1].bias[[2, 5]] = -1.0
    return model, _self_labelled(model, 64, 32, seed=0)


def _count_exact(monkeypatch) -> list:
    verified: list = []
    original = greedy._Scoring._verify

    def verify(self, ids):
        verified.extend(self.cands[i] for i in ids)
        return original(self, ids)

    monkeypatch.setattr(greedy._Scoring, "_verify", verify)
    return verified


def test_screened_near_ties_are_decided_by_exact_evaluations(monkeypatch):
    """The screened keys of the two dead filters are equal: within each other's error bounds,
    so both are evaluated exactly, and the lower index goes first, as in the naive loop."""
    model, batches = _dead_filters_case()
    verified = _count_exact(monkeypatch)
    order = greedy_car_order(model, "0", batches, n_remove=4)
    assert order[:2] == [2, 5] and sorted(verified) == [2, 5]
    assert order == greedy_car_order_naive(model, "0", batches, n_remove=4)


def test_with_every_screened_value_in_doubt_the_order_is_still_the_naive_one(bn_case, monkeypatch):
    monkeypatch.setattr(greedy, "_SAFETY", 1e9)  # eps so large that no screened value decides anything
    model, batches = bn_case
    verified = _count_exact(monkeypatch)
    fast = greedy_car_order(model, "0", batches, n_remove=6, rescore_every=2)
    assert verified and fast == greedy_car_order_naive(model, "0", batches, n_remove=6, rescore_every=2)


def test_a_screening_error_beyond_its_bound_switches_to_exact_evaluations(monkeypatch):
    """After calibration the screened logits of the two dead filters are skewed by far more
    than eps (alike, so they still tie): the exact evaluation of the tie notices, warns, and
    the unit is scored exactly, same order. (A skew that moved the ranking without a tie to
    check would go unnoticed: the guard is the calibration, this check only backs it up.)"""
    model, batches = _dead_filters_case()
    calibrate = greedy._Race._calibrate

    def skewed(self, base, cands):
        calibrate(self, base, cands)
        clean = self.screen.logits
        skew = 1e-3 * torch.arange(10.0)  # moves the loss by far more than eps

        def logits(b, c, i):
            dead = ((c == 2) | (c == 5)).unsqueeze(1)
            return clean(b, c, i) + dead * skew

        self.screen.logits = logits

    monkeypatch.setattr(greedy._Race, "_calibrate", skewed)
    with pytest.warns(RuntimeWarning, match="off by more than its bound"):
        order = greedy_car_order(model, "0", batches, n_remove=4)
    assert order == greedy_car_order_naive(model, "0", batches, n_remove=4)


@pytest.fixture(scope="module")
def resnet_case():
    torch.manual_seed(0)
    model = build_model("resnet20_cifar").eval()
    # Recalibrate BN on the data: fresh statistics give every image the same class. 12x12
    # images (the net pools adaptively) keep the naive loop short.
    batches = _self_labelled(model, 16, 8, seed=2, side=12)
    model.train()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None
        for x, _ in batches:
            model(x)
    model.eval()
    return model, _self_labelled(model, 16, 8, seed=3, noise=0.2, side=12)


def test_order_equals_naive_inside_a_residual_block(resnet_case):
    """``layer1.0.conv1``: its output meets the block's skip path again; the cached split
    holds that skip tensor, the hooks would expand the input."""
    model, batches = resnet_case
    unit = next(u for u in describe_units(model) if u.name == "layer1.0.conv1")
    assert len(unit.act_points) == 1
    fast = greedy_car_order(model, unit.name, batches, n_remove=2)
    assert fast == greedy_car_order_naive(model, unit.name, batches, n_remove=2)


def test_order_equals_naive_for_a_residual_coupled_unit(resnet_case):
    """A unit of several convs feeding one residual stream: later activation points lie
    downstream of the first, so they are masked inside the tail."""
    model, batches = resnet_case
    unit = next(u for u in describe_units(model) if len(u.act_points) > 1)
    fast = greedy_car_order(model, unit.name, batches, n_remove=2)
    assert fast == greedy_car_order_naive(model, unit.name, batches, n_remove=2)


def test_rescore_every_takes_the_best_of_one_scoring_in_order(bn_case):
    model, batches = bn_case
    one_shot = greedy_car_order_naive(model, "3", batches, n_remove=7, rescore_every=7)  # a single scoring
    for r in (1, 3, 7, 50):
        order = greedy_car_order(model, "3", batches, n_remove=7, rescore_every=r)
        assert order[: min(r, 7)] == one_shot[: min(r, 7)]  # the first r come from the first scoring
    greedy_order = greedy_car_order(model, "3", batches, n_remove=7)
    assert greedy_order[0] == one_shot[0]
    assert greedy_order != one_shot  # re-scoring changes the order on this data (else the test proves nothing)


def _tie_model() -> tuple[nn.Module, list]:
    """Two images; filters 0 and 1 feed class 0 with 2 and 1, filter 2 feeds nothing.

    Removing filter 2 changes nothing; then removing 0 or 1 keeps both images correct, but
    removing 0 lowers the class-0 logit more (a larger loss increase), so 1 goes first.
    """
    model = nn.Sequential(nn.Conv2d(1, 3, 1), nn.ReLU(), nn.Flatten(), nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([2.0, 1.0, 0.5]).view(3, 1, 1, 1))
        model[0].bias.zero_()
        model[3].weight.copy_(torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]))
        model[3].bias.zero_()
    model.input_shape = (1, 1, 1)
    return model.eval(), [(torch.ones(2, 1, 1, 1), torch.tensor([0, 0]))]


def test_equal_accuracy_is_broken_by_loss_increase_not_index():
    model, batches = _tie_model()
    order = greedy_car_order(model, "0", batches, n_remove=2)
    assert order == [2, 1]  # by index the second removal would be filter 0
    assert greedy_car_order_naive(model, "0", batches, n_remove=2) == order


def test_a_custom_loss_is_applied_per_image(bn_case):
    model, batches = bn_case

    def loss_fn(logits, y):  # a mean-reduced loss like cross-entropy, but another one
        return nn.functional.multi_margin_loss(logits, y)

    fast = greedy_car_order(model, "0", batches, n_remove=4, loss_fn=loss_fn)
    assert fast == greedy_car_order_naive(model, "0", batches, n_remove=4, loss_fn=loss_fn)


def test_the_callers_model_is_left_as_it_was(bn_case):
    model, batches = bn_case
    model = copy.deepcopy(model).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    greedy_car_order(model, "3", batches, n_remove=3)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_zero_removals_is_an_empty_order(bn_case):
    model, batches = bn_case
    assert greedy_car_order(model, "0", batches, n_remove=0) == []


@pytest.mark.parametrize("kwargs, musts", [
    ({"unit_name": "9"}, ["unit_name must be one of 0, 3, but got '9'"]),
    ({"n_remove": 8}, ["n_remove must be below the unit's 8 filters, but got 8"]),
    ({"n_remove": -1}, ["n_remove must be an integer >= 0, but got -1"]),
    ({"n_remove": True}, ["n_remove must be an integer >= 0, but got True"]),
    ({"rescore_every": 0}, ["rescore_every must be an integer >= 1, but got 0"]),
    ({"rescore_every": 1.5}, ["rescore_every must be an integer >= 1, but got 1.5"]),
    ({"batches": []}, ["batches must be a non-empty list of (images, labels)"]),
    ({"batches": [(torch.zeros(2, 3, 8, 8), torch.zeros(3, dtype=torch.long))]}, ["batches must be (images, labels) pairs"]),
    ({"loss_fn": "mse"}, ["loss_fn must be None or a callable", "but got 'mse'"]),
])
def test_bad_inputs_are_refused_in_one_line(bn_case, kwargs, musts):
    model, batches = bn_case
    args = {"unit_name": "0", "batches": batches, "n_remove": 2, **kwargs}
    unit_name, batches = args.pop("unit_name"), args.pop("batches")
    for fn in (greedy_car_order, greedy_car_order_naive):
        with pytest.raises(ValueError) as info:
            fn(model, unit_name, batches, **args)
        message = str(info.value)
        assert "\n" not in message
        for must in musts:
            assert must in message


# ---- the protocol method ----

FAST = FinetuneConfig(lr=0.02, batch_size=32, eval_batch_size=100)
MEASURE = MeasureConfig(latency=False)


@pytest.mark.parametrize("extra", [{}, {"rescore_every": 3, "greedy_retrain_steps": 2}])
def test_protocol_greedy_car_record(base, splits, extra):
    model = copy.deepcopy(base)
    prune = PruneConfig(method="greedy_car", ratio=0.25, p=0.1, q=0.1, score_batches=2, score_batch_size=32, **extra)
    record = run_protocol(model, splits, prune, FAST, measure=MEASURE, seed=0)
    json.dumps(record)
    units = describe_units(base)
    assert record["method"] == "greedy_car"
    assert [u["name"] for u in record["units"]] == [u.name for u in reversed(units)]  # output side inward
    for row, unit in zip(record["units"], reversed(units), strict=True):
        kept = kept_count(unit.n_filters, 0.25, 1)
        assert row["filters_after"] == len(row["keep_idxs"]) == kept
        assert row["damage_val_acc"] is not None and row["recovered_val_acc"] is not None
        logs = [e for e in record["prune_log"] if e["unit"] == unit.name]
        order = logs[0]["removal_order"]
        assert sorted(order + row["keep_idxs"]) == list(range(unit.n_filters))
        assert all(e["rescore_every"] == extra.get("rescore_every", 1) for e in logs)
        assert len(logs) == (math.ceil(len(order) / 3) if extra else 1)  # one physical pruning per retraining round
    assert len(record["steps"]) == len(units)
    # The record replays: the prune log rebuilds the architecture of the pruned model.
    replay = copy.deepcopy(base)
    from trainables import prune_layer

    for rec in record["prune_log"]:
        prune_layer(replay, rec["unit"], rec["keep_idxs"])
    assert [p.shape for p in replay.parameters()] == [p.shape for p in model.parameters()]
    if not extra:  # without retraining the first unit pruned follows greedy_car_order on the validation batches
        from trainables.protocol.stages import validation_batches

        first = units[-1]
        expect = greedy_car_order(base, first.name, validation_batches(splits, prune, 0),
                                  n_remove=first.n_filters - kept_count(first.n_filters, 0.25, 1))
        assert record["prune_log"][0]["removal_order"] == expect


# ---- the search and the study ----

def test_the_search_space_offers_greedy_car_among_the_criteria():
    import optuna
    from omegaconf import OmegaConf

    from search.space import check_space, define_space
    from trainables import list_criteria
    from trainables.cli.compose import compose

    space = OmegaConf.to_container(compose("launch", []).search, resolve=True)
    space["criteria"] = ["l1", "greedy_car"]
    with pytest.raises(ValueError, match="must not include global when search.criteria includes greedy_car"):
        check_space(space, list_criteria())  # greedy CAR has no scores for the global schedule to rank
    space["schedules"] = [s for s in space["schedules"] if s != "global"]
    check_space(space, list_criteria())  # accepted, though not a registered criterion
    fn = define_space(space, 5, list_criteria())
    drawn = {"criterion": "greedy_car", "schedule": "uniform", "ratio": 0.3, "p": 0.01, "q": 0.2, "lr": 0.01}
    constants = fn(optuna.trial.FixedTrial(drawn))
    assert constants == {"criterion": "car", "method": "greedy_car"}  # Tune lays these over the suggestions
    PruneConfig(**{k: v for k, v in {**drawn, **constants}.items() if k in ("criterion", "method", "ratio", "p", "q")})
    assert fn(optuna.trial.FixedTrial({**drawn, "criterion": "l1"})) is None


def test_the_study_runs_greedy_car_once_per_level_not_per_criterion():
    from search.study import grid_cells, load_study_config

    cfg = load_study_config(["study.methods=[layer_by_layer,greedy_car]", "study.control=false"])
    cells = grid_cells(cfg)
    greedy_cells = [c for c in cells if c["method"] == "greedy_car"]
    assert len(greedy_cells) == len(cfg.study.ratios) * len(cfg.study.seeds)
    assert all(c["arm"] == "greedy_car" and c["criterion"] == "car" for c in greedy_cells)
    assert len(cells) - len(greedy_cells) == len(cfg.study.criteria) * len(cfg.study.ratios) * len(cfg.study.seeds)


def test_the_benchmarks_floor_is_at_most_what_the_fast_path_evaluates(bn_case, monkeypatch):
    """bench/greedy_car.py reports the fewest rows any exact row-by-row method could evaluate
    (knowing every outcome): a valid floor lies between a full evaluation of each step's winner
    and what the fast path actually evaluates (its bounds are certificates too)."""
    import importlib
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "bench"))
    bench = importlib.import_module("greedy_car")
    fewest_rows, rows_evaluated = bench.fewest_rows, bench.rows_evaluated

    model, batches = bn_case
    order = greedy_car_order(model, "0", batches, n_remove=4)
    least, pairs, kinds = fewest_rows(model, "0", batches, order)
    done, evaluated = rows_evaluated(model, "0", batches, 4)
    n = sum(len(y) for _, y in batches)
    assert pairs == n * (8 + 7 + 6 + 5)
    assert 4 * n < least <= done < pairs
    # per step and candidate: the winner on every image, each loser on at least its share of the floor
    assert [sorted(s) for s in evaluated] == [sorted(s) for s in kinds] and len(kinds) == 4
    assert sum(r for step in kinds for _, r in step.values()) == least
    for step, seen, winner in zip(kinds, evaluated, order, strict=True):
        assert step[winner] == (bench.KINDS[0], n) and seen[winner] == n
        assert all(seen[j] >= r for j, (_, r) in step.items())
    table = bench.floor_table(done, evaluated, kinds)
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in table[2:]]
    assert [c[0] for c in cells[:3]] == list(bench.KINDS) and sum(int(c[2]) for c in cells) == done
    assert sum(int(c[3]) for c in cells) == least
