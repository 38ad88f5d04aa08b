"""The whole torchvision classification zoo: every CNN family prunes exactly or is refused by name.

For each family (its smallest member, random weights, randomised BN statistics, small input)
a sample of units across depth is pruned by half, and the pruned model must compute what the
original computes when every layer holding the unit's filters outputs zeros for the dropped
ones and every norm over channels normalises the kept ones only (``_reference``). That is
what "the dropped channels are ignored downstream" means, computed by the original modules,
not by the pruned ones. Vision transformers are refused as a whole, in one line.
"""

from __future__ import annotations

import copy
import re
import time

import pytest
import torch
import torchvision
from torch import nn

from bench.zoo_coverage import (
    CNN_REFUSED,
    SMALLEST,
    TRANSFORMERS,
    build,
    family,
    half,
    prune_and_compare,
    sample,
)
from trainables import ScoringContext, get_criterion, list_criteria
from trainables.core.surgery import (
    Unit,
    describe_units,
    prunable_layers,
    prune_layer,
    round_to_groups,
)

CNNS = sorted(set(SMALLEST) - TRANSFORMERS)


def _assert_prunes_exactly(model: nn.Module, keeps: dict[Unit, list[int]], x: torch.Tensor) -> list[dict]:
    """Prune ``model`` in place and check it against the original with the dropped channels
    ignored downstream (``bench.zoo_coverage.reference``); returns the records."""
    error, records = prune_and_compare(model, keeps, x)
    assert error < 1e-4, [u.name for u in keeps]
    return records


def test_families_cover_the_whole_torchvision_zoo():
    names = torchvision.models.list_models(module=torchvision.models)
    assert {family(n) for n in names} == set(SMALLEST)
    assert all(family(member) == fam for fam, member in SMALLEST.items())
    assert family("regnet_x_400mf") != family("regnet_y_400mf") and family("vgg11_bn") == "vgg"


@pytest.mark.parametrize("fam", CNNS)
def test_family_prunes_exactly_or_refuses_by_name(fam):
    model = build(SMALLEST[fam])
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, *model.input_shape, generator=gen)
    units = describe_units(model)
    assert units, f"{fam}: no prunable unit"
    convs = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    reached = {c for u in units for c in u.convs}
    refused = CNN_REFUSED.get(fam, {})
    # Every conv is reached by some unit, except the ones refused by name (and their groups).
    assert reached <= convs and (reached == convs) == (not refused), sorted(convs - reached)[:5]
    for name, why in refused.items():
        assert name not in reached
        with pytest.raises(ValueError, match="^" + re.escape(why)) as err:
            prune_layer(model, name, [0])
        assert "\n" not in str(err.value) and str(err.value).endswith("so it is not prunable")
    keeps = {unit: half(unit, gen) for unit in sample(units)}
    for unit, record in zip(keeps, _assert_prunes_exactly(model, keeps, x), strict=True):
        assert record["filters_after"] == len(keeps[unit]) < record["filters_before"] == unit.n_filters


def test_shufflenet_prunes_every_branch_inside_the_shuffle():
    model = build("shufflenet_v2_x0_5")
    units = {u.name: u for u in describe_units(model)}
    # Each block's first branch conv (with its depthwise partner) never meets the shuffle.
    assert {f"stage{s}.{b}.branch2.0" for s, n in ((2, 4), (3, 8), (4, 4)) for b in range(n)} <= set(units)
    assert units["stage2.0.branch2.0"].convs == ("stage2.0.branch2.0", "stage2.0.branch2.3")
    assert "conv5.0" in units and "conv1.0" in units


@pytest.mark.parametrize("name", ["resnext50_32x4d", "regnet_x_400mf", "regnet_y_400mf"])
def test_grouped_convs_prune_group_wise(name):
    model = build(name)
    units = describe_units(model)
    grouped = [u for u in units if u.channel_groups > 1]
    assert grouped and all(u.n_filters % u.channel_groups == 0 for u in grouped)
    unit = grouped[len(grouped) // 2]
    blocks, size = unit.channel_groups, unit.n_filters // unit.channel_groups
    asked = list(range(0, unit.n_filters, 3))  # a third, not a multiple of the groups
    x = torch.randn(2, *model.input_shape, generator=torch.Generator().manual_seed(3))
    pruned = copy.deepcopy(model)
    (record,) = _assert_prunes_exactly(pruned, {unit: round_to_groups(unit, asked)}, x)
    per_block = min(size, max(1, round(len(asked) / blocks)))
    assert record["channel_groups"] == blocks and record["filters_after"] == blocks * per_block
    kept = record["keep_idxs"]
    assert all({k % size for k in kept if k // size == b} == {k % size for k in kept if k < size} for b in range(blocks))
    # prune_layer rounds an arbitrary keep set itself, and says so in the record.
    direct = prune_layer(model, unit.name, asked)
    assert direct == {**record, "keep_asked": len(asked)}
    assert torch.equal(model(x), pruned(x))


@pytest.mark.parametrize("fam", sorted(TRANSFORMERS))
def test_vision_transformers_are_refused_in_one_line(fam):
    model = build(SMALLEST[fam])
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"is a vision transformer \(attention layer '.+'") as err:
        prunable_layers(model)
    assert "\n" not in str(err.value) and "not prunable" in str(err.value)
    assert time.perf_counter() - start < 1.0  # refused up front, not after tracing


def _scored_unit(model: nn.Module) -> Unit:
    """The unit with the fewest filters, one with BatchNorms if any (for bn_gamma)."""
    units = describe_units(model)
    with_bn = [u for u in units if u.bns] or units
    return min(with_bn, key=lambda u: (u.n_filters, len(u.convs)))


@pytest.mark.parametrize("fam", CNNS)
def test_every_criterion_scores_a_unit_of_every_family(fam):
    from trainables.criteria.blended import example_options

    model = build(SMALLEST[fam])
    if fam not in ("alexnet", "inception_v3"):  # 32x32 is enough to score; their stems need 63 and 75
        model.input_shape = (3, 32, 32)
    unit = _scored_unit(model)
    gen = torch.Generator().manual_seed(5)
    batches = [(torch.randn(2, *model.input_shape, generator=gen), torch.tensor([0, 1]))]
    for name in list_criteria():
        options = example_options() if name == "blended" else {}
        ctx = ScoringContext(batches=batches, seed=1, target_classes=[0, 1], options=options)
        if name == "bn_gamma" and not unit.bns:
            with pytest.raises(ValueError, match="has no BatchNorm after its conv"):
                get_criterion(name)(model, unit, ctx)
            continue
        scores = get_criterion(name)(model, unit, ctx)
        assert scores.shape == (unit.n_filters,), (fam, name)
        assert torch.isfinite(scores).all(), (fam, name)


@pytest.mark.parametrize("pooled", [False, True])
def test_a_conv_making_the_output_is_never_a_unit(pooled):
    # Directly (a fully convolutional head) or through pooling and flatten (SqueezeNet's classifier).
    tail = [nn.AdaptiveAvgPool2d(1), nn.Flatten()] if pooled else []
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 5, 1), *tail).eval()
    model.input_shape = (3, 8, 8)
    assert prunable_layers(model) == ["0"]
    with pytest.raises(ValueError, match=r"^unit '2' makes channels of the model's output .*so it is not prunable$"):
        prune_layer(model, "2", [0, 1])
    assert model[2].out_channels == 5


@pytest.mark.parametrize("name, refused", [("convnext_atto", 0), ("cs3darknet_s", 4)])
def test_timm_cnns_prune_exactly_or_refuse_by_name(name, refused):
    pytest.importorskip("timm")
    from bench.zoo_coverage import build_timm

    model = build_timm(name)
    units = describe_units(model)
    convs = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    missing = convs - {c for u in units for c in u.convs}
    # CS3-DarkNet splits conv_exp's filters and concatenates half of them again: refused by name.
    assert len({n.rsplit(".", 1)[0] for n in missing if "conv_exp" in n}) == refused
    for name_ in missing:
        if name_.endswith("conv_exp.conv"):
            with pytest.raises(ValueError, match=rf"^unit '{re.escape(name_)}': torch-pruning maps its filters beyond"):
                prune_layer(model, name_, [0])
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, *model.input_shape, generator=gen)
    _assert_prunes_exactly(model, {u: half(u, gen) for u in sample(units)}, x)
