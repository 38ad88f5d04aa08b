"""FLOPs-target planning: the analytical FLOPs model equals ``count_flops`` of the model
physically pruned with ``prune_layer``, and a planned target is met on the pruned model."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from torch import nn

from trainables import build_model, count_flops, describe_units, prune_layer
from trainables.protocol.config import PruneConfig
from trainables.protocol.planning import FlopsModel, plan_ratios
from trainables.protocol.schedules import kept_count

FAST_MODELS = ["small_cnn", "vgg16_bn_cifar", "resnet20_cifar", "resnet56_cifar"]


class _Branchy(nn.Module):
    """Two convs concatenated into a third (its input is owned by two units), a depthwise conv
    (in = out = groups: its FLOPs scale once), then a flatten into the linear head."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 12, 1)
        self.c = nn.Conv2d(20, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pw = nn.Conv2d(16, 24, 1)
        self.head = nn.Linear(24 * 4 * 4, 5)
        self.input_shape = (3, 8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c(torch.cat([self.a(x), self.b(x)], dim=1)))  # (B, 16, 8, 8)
        x = torch.relu(self.pw(torch.relu(self.dw(x))))  # (B, 24, 8, 8)
        return self.head(torch.flatten(nn.functional.max_pool2d(x, 2), 1))  # (B, 5)


class _MatmulOutsideLayers(nn.Module):
    """FLOPs in a bare matmul of the forward, which no conv or linear layer holds."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.mix = nn.Parameter(torch.randn(8, 8))
        self.input_shape = (3, 8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).flatten(2).transpose(1, 2) @ self.mix  # (B, 64, 8)


class _ReadsValues(nn.Module):
    """A forward that branches on a value: it cannot run on weightless (meta) tensors."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 16, 3, padding=1)
        self.head = nn.Linear(16, 4)
        self.input_shape = (3, 8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a(x)
        if x.abs().sum() >= 0:  # always true; evaluating it needs the numbers
            x = torch.relu(x)
        return self.head(self.b(x).mean((2, 3)))


def _model(name: str) -> nn.Module:
    return {"branchy": _Branchy, "reads_values": _ReadsValues}.get(name, lambda: build_model(name))()


def _pruned(model: nn.Module, units, ratios, round_to: int) -> nn.Module:
    """A copy of ``model`` with each unit physically pruned to its first ``kept_count`` filters."""
    pruned = copy.deepcopy(model)
    for u, r in zip(units, ratios, strict=True):
        prune_layer(pruned, u.name, list(range(kept_count(u.n_filters, r, round_to))))
    return pruned


def _random_ratios(n: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [rng.uniform(0.0, 0.95) for _ in range(n)]


def _check_exact(name: str, round_to: int, seeds: list[int]) -> None:
    model = _model(name)
    units = describe_units(model)
    flops = FlopsModel(model, units)
    assert flops.base == count_flops(model)
    assert flops.flops([u.n_filters for u in units]) == flops.base
    vectors = [_random_ratios(len(units), s) for s in seeds] + [[0.99] * len(units)]  # + the narrowest model
    for ratios in vectors:
        assert flops.flops_with_ratios(ratios, round_to) == count_flops(_pruned(model, units, ratios, round_to))


@pytest.mark.parametrize("round_to", [1, 8])
@pytest.mark.parametrize("name", ["branchy", "reads_values", *FAST_MODELS])
def test_analytical_flops_equal_count_flops_of_the_pruned_model(name, round_to):
    # resnet56_cifar prunes unit by unit slowly (about 2 s per vector on 2 quiet cores): one seed.
    _check_exact(name, round_to, seeds=[0] if name == "resnet56_cifar" else [0, 1, 2])


@pytest.mark.slow
@pytest.mark.parametrize("round_to", [1, 8])
@pytest.mark.parametrize("name", ["resnet50", "vgg16"])
def test_analytical_flops_equal_count_flops_on_imagenet_models(name, round_to):
    _check_exact(name, round_to, seeds=[0])


def test_the_branchy_model_exercises_concat_depthwise_and_flatten():
    # Without these couplings the exactness test above would not cover the general formula.
    model = _Branchy()
    flops = FlopsModel(model, describe_units(model))
    layers = {layer.name: layer for layer in flops.layers}
    assert len(layers["c"].in_units) == 2  # its input is the concatenation of two units
    assert layers["dw"].n_in == 1 and not layers["dw"].in_units and layers["dw"].out_units
    assert [c for _, c in layers["head"].in_units] == [16]  # one filter is 4 x 4 flattened features


def test_the_flops_model_leaves_the_model_alone():
    model = build_model("small_cnn").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    FlopsModel(model, describe_units(model))
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.device.type == "cpu" for p in model.parameters())


@pytest.mark.filterwarnings("ignore:Unwrapped parameters detected")  # torch-pruning, about `mix`
def test_flops_outside_conv_and_linear_layers_are_refused():
    model = _MatmulOutsideLayers()
    with pytest.raises(ValueError, match=r"conv and linear layers only, but 8192 of the model's \d+ FLOPs") as err:
        FlopsModel(model, describe_units(model))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "name, target, round_to",
    [("small_cnn", 0.3, 1), ("small_cnn", 0.65, 8), ("small_cnn", 0.8, 1), ("resnet20_cifar", 0.5, 1),
     ("resnet20_cifar", 0.4, 8), ("vgg16_bn_cifar", 0.7, 8), ("branchy", 0.5, 1),
     # With round_to=8 small_cnn's reduction jumps from 0.551 to 0.633 here: the upper side is within 2 points.
     ("small_cnn", 0.615, 8)],
)
def test_a_planned_target_is_met_on_the_pruned_model(name, target, round_to):
    model = _model(name)
    units = describe_units(model)
    prune = PruneConfig(schedule="differential_depth", ratio_low=0.1, ratio_high=0.5, round_to=round_to,
                        target_flops_reduction=target)
    ratios = plan_ratios(model, units, prune)
    got = 1 - count_flops(_pruned(model, units, ratios, round_to)) / count_flops(model)
    assert abs(got - target) <= 0.02
    assert max(ratios) <= 0.95  # no unit loses more than 95% of its filters to a target


def test_a_target_between_two_jumps_is_refused_in_one_line():
    # small_cnn with round_to=8 and this shape reaches 0.551 or 0.633, nothing in between.
    model = build_model("small_cnn")
    prune = PruneConfig(schedule="differential_depth", ratio_low=0.1, ratio_high=0.5, round_to=8, target_flops_reduction=0.59)
    with pytest.raises(ValueError, match=r"^prune.target_flops_reduction=0.59 cannot be met within 2% with round_to=8$"):
        plan_ratios(model, describe_units(model), prune)


def test_a_zero_schedule_spreads_the_target_evenly():
    model = build_model("small_cnn")
    units = describe_units(model)
    ratios = plan_ratios(model, units, PruneConfig(ratio=0.0, target_flops_reduction=0.5))
    assert len(set(ratios)) == 1 and ratios[0] > 0


@pytest.mark.parametrize(
    "prune, match",
    [
        # Only one unit may be pruned: its FLOPs share caps the reduction.
        (PruneConfig(schedule="per_layer", ratios=[0.0, 0.0, 0.0, 0.0, 0.3], target_flops_reduction=0.9),
         r"^prune.target_flops_reduction=0.9 is out of reach: at most 0\.\d{3} with this schedule$"),
        (PruneConfig(schedule="per_layer", ratios=[0.5, 0.0, 0.0, 0.0, 0.0], target_flops_reduction=0.5),
         r"^prune.target_flops_reduction=0.5 is out of reach: at most 0\.\d{3} with this schedule$"),
    ],
)
def test_an_unreachable_target_is_refused_in_one_line(prune, match):
    model = build_model("small_cnn")
    with pytest.raises(ValueError, match=match):
        plan_ratios(model, describe_units(model), prune)


def test_without_a_target_the_schedule_is_returned_as_is():
    model = build_model("small_cnn")
    prune = PruneConfig(schedule="differential_depth", ratio_low=0.2, ratio_high=0.6)
    assert plan_ratios(model, describe_units(model), prune) == pytest.approx([0.2, 0.3, 0.4, 0.5, 0.6])
