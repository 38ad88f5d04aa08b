"""Ratio schedules: the paper's differential rule follows filter counts (Mittal et al. 2019),
the depth ramp stays available by name, and an inverted ramp needs its own name."""

from __future__ import annotations

import optuna
import pytest
import torch

from search.space import check_space, define_space
from trainables.core.models import build_model
from trainables.core.surgery import describe_units
from trainables.protocol.config import PruneConfig
from trainables.protocol.planning import plan_ratios
from trainables.protocol.schedules import kept_count, list_schedules, make_ratios

VGG16_FILTERS = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
LOW, HIGH = 0.25, 0.75


@pytest.fixture(scope="module")
def vgg16():
    torch.set_num_threads(1)
    model = build_model("vgg16")  # torchvision's VGG-16, random weights: only the architecture matters
    return model, describe_units(model)


def test_vgg16_units_are_its_13_convs(vgg16):
    _, units = vgg16
    assert [u.n_filters for u in units] == VGG16_FILTERS


def test_differential_ratios_follow_filter_counts_on_vgg16(vgg16):
    _, units = vgg16
    counts = [u.n_filters for u in units]
    ratios = make_ratios("differential", counts, ratio_low=LOW, ratio_high=HIGH)
    for (n_a, r_a) in zip(counts, ratios, strict=True):
        for (n_b, r_b) in zip(counts, ratios, strict=True):
            if n_a < n_b:
                assert r_a < r_b  # more filters, a larger share pruned
            elif n_a == n_b:
                assert r_a == r_b  # equal counts, equal ratios, wherever they sit
    assert all(r == LOW for n, r in zip(counts, ratios, strict=True) if n == min(counts))
    assert all(r == HIGH for n, r in zip(counts, ratios, strict=True) if n == max(counts))
    # Linear in log2(filters): every doubling (every VGG stage) adds the same share.
    step = (HIGH - LOW) / 3
    by_count = dict(zip(counts, ratios, strict=True))
    assert [by_count[n] for n in (64, 128, 256, 512)] == pytest.approx([LOW, LOW + step, LOW + 2 * step, HIGH])


def test_differential_kept_counts_on_vgg16():
    ratios = make_ratios("differential", VGG16_FILTERS, ratio_low=LOW, ratio_high=HIGH)
    kept = [kept_count(n, r) for n, r in zip(VGG16_FILTERS, ratios, strict=True)]
    # 64 x 0.75 = 48; 128 x (1 - 5/12) = 74.7 -> 75; 256 x (1 - 7/12) = 106.7 -> 107; 512 x 0.25 = 128
    assert kept == [48, 48, 75, 75, 107, 107, 107] + [128] * 6
    shares = [k / n for k, n in zip(kept, VGG16_FILTERS, strict=True)]
    assert shares == sorted(shares, reverse=True)


def test_plan_ratios_hands_the_filter_counts_to_the_schedule(vgg16):
    model, units = vgg16
    prune = PruneConfig(schedule="differential", ratio_low=0.1, ratio_high=0.4)
    assert plan_ratios(model, units, prune) == make_ratios("differential", VGG16_FILTERS, ratio_low=0.1, ratio_high=0.4)


def test_differential_follows_counts_not_position_on_a_resnet_like_model():
    # ResNet-50's first bottleneck: three 64-filter convs, then the 256-filter expansion, then 64 again.
    counts = [64, 64, 64, 256, 64, 64, 128]
    ratios = make_ratios("differential", counts, ratio_low=0.1, ratio_high=0.5)
    assert ratios[3] == 0.5 and ratios[4] == ratios[0] == 0.1 and 0.1 < ratios[6] < 0.5


def test_differential_depth_is_the_linear_ramp_by_position():
    ratios = make_ratios("differential_depth", VGG16_FILTERS, ratio_low=LOW, ratio_high=HIGH)
    assert ratios == [LOW + (HIGH - LOW) * i / 12 for i in range(13)]
    assert ratios[0] != ratios[1]  # equal counts, different positions: the depth ramp separates them
    assert make_ratios("differential_depth", [32], ratio_low=LOW, ratio_high=HIGH) == [HIGH]


def test_equal_counts_everywhere_get_the_midpoint():
    assert make_ratios("differential", [32, 32, 32], ratio_low=0.2, ratio_high=0.6) == pytest.approx([0.4] * 3)


@pytest.mark.parametrize("schedule", ["differential", "differential_depth"])
def test_an_inverted_ramp_is_refused_in_one_line_naming_the_alternative(schedule):
    message = (rf"^prune\.ratio_high must be >= prune\.ratio_low=0\.7 \(prune\.schedule={schedule} .*"
               rf"prune\.schedule={schedule}_inverted\), but got 0\.2$")
    with pytest.raises(ValueError, match=message):
        make_ratios(schedule, VGG16_FILTERS, ratio_low=0.7, ratio_high=0.2)
    with pytest.raises(ValueError, match=message):
        PruneConfig(schedule=schedule, ratio_low=0.7, ratio_high=0.2)


@pytest.mark.parametrize("schedule", ["differential", "differential_depth"])
def test_an_inverted_ramp_asked_for_by_name(schedule):
    inverted = make_ratios(f"{schedule}_inverted", VGG16_FILTERS, ratio_low=0.6, ratio_high=0.1)
    assert inverted[0] == 0.6 and inverted[-1] == 0.1 and inverted == sorted(inverted, reverse=True)
    assert PruneConfig(schedule=f"{schedule}_inverted", ratio_low=0.6, ratio_high=0.1).ratio_high == 0.1
    # Naming the inverted schedule with a rising pair is the swap the other way round.
    with pytest.raises(ValueError, match=rf"^prune\.ratio_high must be <= prune\.ratio_low=0\.1 .*"
                                         rf"use prune\.schedule={schedule}\), but got 0\.6$"):
        make_ratios(f"{schedule}_inverted", VGG16_FILTERS, ratio_low=0.1, ratio_high=0.6)


def test_schedules_other_than_differential_ignore_an_inverted_pair():
    assert PruneConfig(schedule="uniform", ratio_low=0.7, ratio_high=0.2).ratio == 0.5
    assert make_ratios("uniform", [8, 16], ratio=0.3, ratio_low=0.7, ratio_high=0.2) == [0.3, 0.3]


def test_the_registry_names():
    assert list_schedules() == ["differential", "differential_depth", "differential_depth_inverted",
                                "differential_inverted", "global", "per_layer", "uniform"]


def test_per_layer_with_the_wrong_length_fails_as_before():
    with pytest.raises(ValueError, match=r"^prune\.ratios must have one ratio per prunable unit \(3 for this model\), "
                                         r"but got 1$"):
        make_ratios("per_layer", [8, 8, 8], ratios=[0.1])
    assert make_ratios("per_layer", [8, 16], ratios=[0.1, 0.2]) == [0.1, 0.2]


@pytest.mark.parametrize("bad", [3, [], [8, 0], [8, 2.5], "64"])
def test_filter_counts_must_be_a_list_of_positive_integers(bad):
    with pytest.raises(ValueError, match=r"^n_filters must be a non-empty list of filter counts >= 1 .*but got "):
        make_ratios("uniform", bad)


def test_ratios_out_of_range_are_refused_for_every_differential_name():
    for schedule in ("differential", "differential_depth", "differential_inverted", "differential_depth_inverted"):
        with pytest.raises(ValueError, match=r"^prune\.ratio_high must be in \[0, 1\), but got 1\.0$"):
            make_ratios(schedule, [8, 16], ratio_low=0.5, ratio_high=1.0)


def test_the_search_samples_both_differential_schedules_rising():
    space = {"criteria": ["l1"], "schedules": ["differential", "differential_depth"],
             "ratio": {"low": 0.1, "high": 0.8}, "p": None, "q": None, "lr": None}
    check_space(space, ["l1"])
    sample = define_space(space, 5, ["l1"])
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(12):
        trial = study.ask()
        sample(trial)
        p = trial.params
        seen.add(p["schedule"])
        assert 0.1 <= p["ratio_low"] <= p["ratio_high"] <= 0.8
        # What a trial builds from these values passes the ramp check.
        PruneConfig(schedule=p["schedule"], ratio_low=p["ratio_low"], ratio_high=p["ratio_high"])
        study.tell(trial, 0.0)
    assert seen == {"differential", "differential_depth"}


def test_the_search_results_read_the_base_models_filter_counts():
    from search.results import _unit_filters

    assert _unit_filters("small_cnn", 10, "{}") == (16, 32, 32, 64, 64)
