"""``search=random_configs`` (Li et al., CVPR 2022): random per-layer ratios under a FLOPs target.

The config must give every trial the same fine-tuning (nothing of p, q, lr searched) and the same
FLOPs target, and the planner must turn any drawn per-layer shape into ratios that keep that shape
and meet the target, which is what makes a random configuration comparable to a searched one.
"""

from __future__ import annotations

import optuna
import pytest

from search._session import trial_prune
from search.launch import load_search_config
from search.space import define_space
from trainables import build_model, describe_units
from trainables.cli.compose import configs_of
from trainables.protocol.config import PruneConfig
from trainables.protocol.planning import FlopsModel, plan_ratios


def test_every_trial_gets_the_same_budget_and_target():
    cfg = load_search_config(["search=random_configs", "search.sampler=nsga2"])
    trial, full = trial_prune(cfg, configs_of(cfg)[0])
    assert trial == full  # full fidelity: what a trial runs is what the front reports
    assert (trial["method"], trial["p"], trial["q"], trial["target_flops_reduction"]) == ("one_shot", 0.0, 0.1, 0.5)
    for key in ("p", "q", "lr"):
        assert cfg.search[key] is None, f"search.{key} would make the trials' fine-tuning differ"


def test_a_bad_target_is_refused_before_work():
    with pytest.raises(ValueError, match="target_flops_reduction"):
        load_search_config(["search=random_configs", "search.prune_overrides.target_flops_reduction=1.5"])


@pytest.mark.parametrize("target", [0.5])  # 0.75: about 1 random shape in 11 is out of reach (docs)
def test_random_shapes_are_scaled_to_the_flops_target(target):
    model = build_model("small_cnn")
    units = describe_units(model)
    flops = FlopsModel(model, units)
    cfg = load_search_config(["search=random_configs"])
    space = define_space(dict(cfg.search), len(units), ["l1"])
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    reductions = []
    for _ in range(4):  # four random configurations, as the search's random sampler draws them
        t = study.ask()
        space(t)
        shape = [t.params[f"ratio_{i}"] for i in range(len(units))]
        prune = PruneConfig(criterion="l1", method="one_shot", schedule="per_layer", ratios=shape,
                            target_flops_reduction=target)
        ratios = plan_ratios(model, units, prune)
        scale = ratios[0] / shape[0]
        assert ratios == pytest.approx([s * scale for s in shape])  # the drawn shape is kept
        reductions.append(1 - flops.flops_with_ratios(ratios, prune.round_to) / flops.base)
        study.tell(t, 0.0)
    assert all(abs(r - target) <= 0.02 for r in reductions), reductions
