"""Grouped and depthwise convs: depthwise units prune exactly, grouped ones are refused."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from test_surgery import _masked_and_pruned, _randomise_bn
from torch import nn

from trainables import describe_units, prunable_layers, prune_layer


def _conv_bn(c_in: int, c_out: int, k: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, padding=k // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out))


class NeXtBlock(nn.Module):
    """A ResNeXt bottleneck: 1x1 reduce, grouped 3x3, 1x1 expand, identity shortcut."""

    def __init__(self, channels: int, width: int, groups: int):
        super().__init__()
        self.reduce = _conv_bn(channels, width)
        self.grouped = _conv_bn(width, width, 3, groups)
        self.expand = _conv_bn(width, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.grouped(torch.relu(self.reduce(x))))
        return torch.relu(self.expand(out) + x)


class TinyNeXt(nn.Module):
    """Stem, one ResNeXt block, then a MobileNet-style depthwise + pointwise pair and a head."""

    def __init__(self, groups: int = 4, dw_multiplier: int = 1):
        super().__init__()
        self.stem = _conv_bn(3, 16, 3)
        self.block = NeXtBlock(16, 16, groups)
        self.dw = _conv_bn(16, 16 * dw_multiplier, 3, groups=16)
        self.pw = _conv_bn(16 * dw_multiplier, 12)
        self.head = nn.Linear(12, 10)
        self.input_shape = (3, 8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(torch.relu(self.stem(x)))
        x = torch.relu(self.pw(torch.relu(self.dw(x))))
        return self.head(x.mean(dim=(2, 3)))


class MobileStyle(nn.Module):
    """Only plain and depthwise convs (groups = in = out channels): every unit is prunable."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn(3, 8, 3), nn.ReLU(),
            _conv_bn(8, 8, 3, groups=8), nn.ReLU(),  # depthwise
            _conv_bn(8, 16), nn.ReLU(),  # pointwise
            _conv_bn(16, 16, 3, groups=16), nn.ReLU(),  # depthwise
            _conv_bn(16, 24), nn.ReLU(),
        )
        self.head = nn.Linear(24 * 8 * 8, 10)
        self.input_shape = (3, 8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(x), 1))


def _prepared(model: nn.Module, seed: int) -> tuple[nn.Module, torch.Tensor, torch.Generator]:
    gen = torch.Generator().manual_seed(seed)
    _randomise_bn(model, gen)
    return model.eval(), torch.randn(4, *model.input_shape, generator=gen), gen


def _assert_pruned_equals_masked(model: nn.Module, x: torch.Tensor, gen: torch.Generator) -> None:
    _, _, masked, pruned, _ = _masked_and_pruned(model, gen)
    with torch.no_grad():
        ref, out = masked(x), pruned(x)
    assert (out - ref).abs().max() / ref.abs().max().clamp_min(1e-6) < 1e-4


@pytest.mark.parametrize("seed", range(3))
def test_depthwise_units_prune_exactly(seed):
    torch.manual_seed(seed)
    model, x, gen = _prepared(MobileStyle(), seed)
    units = describe_units(model)
    # A depthwise conv follows the unit feeding it: both lose the same channels.
    assert [u.convs for u in units] == [
        ("features.0.0", "features.2.0"), ("features.4.0", "features.6.0"), ("features.8.0",)
    ]
    _assert_pruned_equals_masked(model, x, gen)


@pytest.mark.parametrize("groups", [2, 4, 8])
def test_units_that_touch_a_grouped_conv_are_not_listed(groups):
    model = TinyNeXt(groups)
    assert prunable_layers(model) == ["stem.0", "pw.0"]
    stem = describe_units(model)[0]
    # The stem feeds the block's shortcut, so the block's expand conv and the depthwise conv follow it.
    assert stem.convs == ("stem.0", "block.expand.0", "dw.0")


@pytest.mark.parametrize(
    "unit, why",
    [
        ("block.reduce.0", "unit 'block.reduce.0' feeds the grouped conv 'block.grouped.0' (groups=4)"),
        ("block.grouped.0", "unit 'block.grouped.0' contains the grouped conv 'block.grouped.0' (groups=4)"),
    ],
)
def test_pruning_a_unit_that_touches_a_grouped_conv_raises(unit, why):
    model = TinyNeXt(groups=4)
    before = copy.deepcopy(model.state_dict())
    # 9 kept filters cannot be split into 4 groups: torch-pruning used to build a model that crashed.
    with pytest.raises(ValueError, match=f"^{re.escape(why)}; pruning it would break the groups, so it is not prunable$"):
        prune_layer(model, unit, list(range(9)))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_depthwise_with_a_channel_multiplier_is_refused():
    # groups = in_channels but out = 2 x in: torch-pruning would prune its inputs and outputs alike.
    model = TinyNeXt(groups=1, dw_multiplier=2)
    assert prunable_layers(model) == ["block.reduce.0", "block.grouped.0", "pw.0"]
    with pytest.raises(ValueError, match=r"^unit 'stem.0' feeds the grouped conv 'dw.0' \(groups=16\); pruning"):
        prune_layer(model, "stem.0", [0, 1])
    with pytest.raises(ValueError, match=r"^unit 'dw.0' contains the grouped conv 'dw.0' \(groups=16\); pruning"):
        prune_layer(model, "dw.0", [0, 1])


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("groups", [1, 4])
def test_grouped_models_prune_their_listed_units_exactly(groups, seed):
    torch.manual_seed(seed)
    model, x, gen = _prepared(TinyNeXt(groups), seed)
    if groups == 1:  # a plain bottleneck: the block's own convs are units again
        assert prunable_layers(model) == ["stem.0", "block.reduce.0", "block.grouped.0", "pw.0"]
    _assert_pruned_equals_masked(model, x, gen)
