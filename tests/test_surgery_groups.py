"""Grouped and depthwise convs: depthwise units prune exactly, grouped ones group-wise (the
same positions kept in every group), and the ones that cannot be split are refused."""

from __future__ import annotations

import copy

import pytest
import torch
from test_surgery import _masked_and_pruned, _randomise_bn
from torch import nn

from trainables import describe_units, mask_filters, prunable_layers, prune_layer
from trainables.core.surgery import round_to_groups


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
def test_units_that_touch_a_grouped_conv_are_pruned_group_wise(groups):
    model = TinyNeXt(groups)
    units = {u.name: u for u in describe_units(model)}
    assert list(units) == ["stem.0", "block.reduce.0", "block.grouped.0", "pw.0"]
    # The one feeding the grouped conv and the grouped conv itself are split into its groups.
    assert [u.channel_groups for u in units.values()] == [1, groups, groups, 1]
    # The stem feeds the block's shortcut, so the block's expand conv and the depthwise conv follow it.
    assert units["stem.0"].convs == ("stem.0", "block.expand.0", "dw.0")


@pytest.mark.parametrize(
    "asked, kept",
    [
        (range(9), [0, 1, 4, 5, 8, 9, 12, 13]),  # 9 / 4 groups -> 2 per group, the positions kept most
        ([3, 7, 11, 15, 2], [3, 7, 11, 15]),  # position 3 in every group; one more is not enough for two
        ([5], [1, 5, 9, 13]),  # at least one per group
        (range(16), list(range(16))),
    ],
)
@pytest.mark.parametrize("unit", ["block.reduce.0", "block.grouped.0"])
def test_grouped_keep_sets_are_rounded_and_prune_exactly(unit, asked, kept):
    model, x, _ = _prepared(TinyNeXt(groups=4), seed=0)
    u = next(v for v in describe_units(model) if v.name == unit)
    assert round_to_groups(u, asked) == kept
    masked = copy.deepcopy(model)
    mask_filters(masked, u, kept)
    record = prune_layer(model, unit, asked)
    assert record == {"unit": unit, "filters_before": 16, "filters_after": len(kept), "keep_idxs": kept,
                      "channel_groups": 4, "keep_asked": len(list(asked))}
    assert model.block.grouped[0].groups == 4
    with torch.no_grad():
        ref, out = masked(x), model(x)
    assert (out - ref).abs().max() / ref.abs().max() < 1e-4
    # Replaying the record's keep set gives the same model.
    replay = copy.deepcopy(masked)
    prune_layer(replay, unit, record["keep_idxs"])
    assert torch.equal(replay(x), out)


def test_depthwise_with_a_channel_multiplier():
    # groups = in_channels but out = 2 x in: its inputs are groups of one channel, which cannot
    # be thinned, but its outputs (two per group) can, one from each group.
    model = TinyNeXt(groups=1, dw_multiplier=2)
    units = {u.name: u for u in describe_units(model)}
    assert list(units) == ["block.reduce.0", "block.grouped.0", "dw.0", "pw.0"]
    assert units["dw.0"].channel_groups == 16
    with pytest.raises(ValueError, match=r"^unit 'stem.0' feeds the grouped conv 'dw.0' \(groups=16\), one channel "
                                         r"per group; pruning it would break the groups, so it is not prunable$"):
        prune_layer(model, "stem.0", [0, 1])
    assert prune_layer(model, "dw.0", [0, 3])["keep_idxs"] == [2 * g + p for g in range(16) for p in (0,)]
    assert model(torch.randn(1, 3, 8, 8)).shape == (1, 10)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("groups", [1, 4])
def test_grouped_models_prune_their_listed_units_exactly(groups, seed):
    torch.manual_seed(seed)
    model, x, gen = _prepared(TinyNeXt(groups), seed)
    assert prunable_layers(model) == ["stem.0", "block.reduce.0", "block.grouped.0", "pw.0"]
    _assert_pruned_equals_masked(model, x, gen)
