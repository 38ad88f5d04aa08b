"""Surgery is correct when the pruned model computes what the masked model computes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from trainables import build_model, describe_units, mask_filters, prunable_layers, prune_layer
from trainables.core.surgery import round_to_groups

# Small spatial sizes keep the ImageNet models fast; their adaptive pooling accepts them.
ARCHS = {
    "small_cnn": (1, 28, 28),
    "small_alexnet": (3, 28, 28),
    "vgg16_bn_cifar": (3, 32, 32),
    "resnet20_cifar": (3, 32, 32),
    "vgg16": (3, 64, 64),
    "vgg16_bn": (3, 64, 64),
    "alexnet": (3, 96, 96),
    "resnet18": (3, 64, 64),
    "resnet50": (3, 64, 64),
}


def _randomise_bn(model: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial BN statistics, so that a missed BN channel shows up in the output."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=gen) * 0.1)


def _random_keep(n: int, gen: torch.Generator) -> list[int]:
    k = int(torch.randint(1, n + 1, (1,), generator=gen))
    return sorted(torch.randperm(n, generator=gen)[:k].tolist())


def _masked_and_pruned(model: nn.Module, gen: torch.Generator):
    """Random keep sets for every unit (drawn from ``gen``), then two copies of ``model``: one
    with the other filters masked, one with them removed unit by unit from the input side
    (a unit's keep indices are unaffected by pruning other units). Returns ``(units, keeps,
    masked, pruned, records)``, ``records`` being ``prune_layer``'s."""
    units = describe_units(model)
    # A grouped unit keeps the same positions in every block: round the draw as prune_layer would.
    keeps = {u.name: round_to_groups(u, _random_keep(u.n_filters, gen)) for u in units}
    masked, pruned = copy.deepcopy(model), copy.deepcopy(model)
    for u in units:
        mask_filters(masked, u, keeps[u.name])
    records = [prune_layer(pruned, u.name, keeps[u.name]) for u in units]
    return units, keeps, masked, pruned, records


def _setup(arch: str, seed: int):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = build_model(arch, num_classes=10)
    model.input_shape = ARCHS[arch]
    _randomise_bn(model, gen)
    x = torch.randn(2, *ARCHS[arch], generator=gen)
    return model.eval(), x, gen


@pytest.mark.parametrize("arch", list(ARCHS))
def test_pruned_equals_masked_all_units(arch):
    model, x, gen = _setup(arch, seed=0)
    units, keeps, masked, pruned, records = _masked_and_pruned(model, gen)

    with torch.no_grad():
        ref, out = masked(x), pruned.eval()(x)
    scale = ref.abs().max().clamp_min(1e-6)
    assert (out - ref).abs().max() / scale < 1e-4
    for u, rec in zip(units, records, strict=True):
        assert rec == {
            "unit": u.name,
            "filters_before": u.n_filters,
            "filters_after": len(keeps[u.name]),
            "keep_idxs": keeps[u.name],
        }
        for conv in u.convs:
            assert pruned.get_submodule(conv).out_channels == len(keeps[u.name]) >= 1


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("arch", ["small_cnn", "resnet20_cifar"])
def test_pruned_equals_masked_one_unit_random(arch, seed):
    model, x, gen = _setup(arch, seed)
    units = describe_units(model)
    u = units[int(torch.randint(len(units), (1,), generator=gen))]
    keep = _random_keep(u.n_filters, gen)
    masked = copy.deepcopy(model)
    mask_filters(masked, u, keep)
    prune_layer(model, u.name, keep)
    with torch.no_grad():
        ref, out = masked(x), model(x)
    assert (out - ref).abs().max() / ref.abs().max() < 1e-4


def test_units_in_network_order_and_residual_coupling():
    model = build_model("resnet50")
    model.input_shape = (3, 64, 64)
    units = {u.name: u for u in describe_units(model)}
    names = list(units)
    assert names[0] == "conv1" and "fc" not in names
    stage1 = units["layer1.0.conv3"]
    assert set(stage1.convs) == {"layer1.0.conv3", "layer1.0.downsample.0", "layer1.1.conv3", "layer1.2.conv3"}
    assert stage1.act_points[0] == "layer1.0.bn3"
    assert names.index("layer1.0.conv1") < names.index("layer1.0.conv3") < names.index("layer2.0.conv1")


def test_flatten_into_linear_follows_pruning():
    model = build_model("small_cnn").eval()
    last = prunable_layers(model)[-1]
    in_before = model.classifier.in_features
    prune_layer(model, last, list(range(0, 64, 2)))
    assert model.classifier.in_features == in_before // 2
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)


def test_training_mode_is_restored():
    model = build_model("small_cnn").train()
    prune_layer(model, "features.0", [0, 1, 2])
    assert model.training
    model.eval()
    prunable_layers(model)
    assert not model.training


@pytest.mark.parametrize(
    "unit, keep, match",
    [
        ("features.0", [], r"unit 'features.0': keep_idxs is empty; keep between 1 and 16 of the filters 0..15"),
        ("features.0", [0, 16], r"unit 'features.0': keep_idxs \[16\] out of range; valid indices are 0..15"),
        ("features.0", [-1, 3], r"out of range; valid indices are 0..15"),
        ("features.0", [1, 1], r"unit 'features.0': keep_idxs has duplicates: 1$"),
        ("features.1", [0], r"unknown unit 'features.1'; valid: features.0, features.4, features.7, features.11, features.14"),
        ("classifier", [0], r"unknown unit 'classifier'"),
    ],
)
def test_bad_prune_requests_raise_value_error(unit, keep, match):
    model = build_model("small_cnn")
    with pytest.raises(ValueError, match=match):
        prune_layer(model, unit, keep)
    assert model.features[0].out_channels == 16  # nothing was touched


def test_replay_records_rebuilds_the_same_model():
    torch.manual_seed(0)
    base = build_model("small_cnn").eval()
    pruned = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(1)
    records = [prune_layer(pruned, u.name, _random_keep(u.n_filters, gen)) for u in describe_units(pruned)][::-1]
    replayed = copy.deepcopy(base)
    for rec in records:
        prune_layer(replayed, rec["unit"], rec["keep_idxs"])
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(pruned(x), replayed(x))
