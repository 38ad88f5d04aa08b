"""One contract for every registered criterion, plus hand-checked values for the simple ones."""

from __future__ import annotations

import copy
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from trainables import ScoringContext, build_model, describe_units, get_criterion, list_criteria
from trainables.criteria import Criterion
from trainables.criteria.activations import histogram_entropy
from trainables.criteria.blended import example_options
from trainables.criteria.car import car_naive

REQUIRED = {
    "random", "l1", "l2", "mean_activation", "apoz", "entropy", "scaled_entropy", "sensitivity",
    "class_specific", "car", "taylor", "fpgm", "bn_gamma", "hrank",
}


def _model(arch: str) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(arch)
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():  # trained-looking BN so that bn_gamma and BN shifts matter
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.1)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    return model.eval()


def _batches(shape, n_batches=3, size=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, *shape, generator=gen), torch.randint(0, 10, (size,), generator=gen)) for _ in range(n_batches)]


# Options the contract test scores a criterion with; a criterion not listed gets none. Only
# criteria that cannot run without options belong here, with options from their own module.
CONTRACT_OPTIONS = {"blended": example_options()}
# Read from the registry at collection time, so a newly registered criterion is covered.
CONTRACT_NAMES = list_criteria()


@pytest.fixture(scope="module", params=["small_cnn", "resnet20_cifar"])
def setting(request):
    model = _model(request.param)
    units = describe_units(model)
    # The last unit of resnet20 is residual-coupled (several convs); small_cnn's last feeds the flatten.
    picked = [units[0], units[-1]] if request.param == "small_cnn" else [units[-1]]
    return model, picked, _batches(model.input_shape)


def test_registry_has_every_required_criterion():
    assert REQUIRED <= set(list_criteria())


def test_contract_runs_over_the_whole_registry():
    assert CONTRACT_NAMES == list_criteria()
    assert set(CONTRACT_OPTIONS) <= set(CONTRACT_NAMES)


def test_cli_lists_names_one_per_line():
    out = subprocess.run([sys.executable, "-m", "trainables.criteria", "--list"], capture_output=True, text=True, check=True)
    assert out.stdout.split() == list_criteria()


def test_unknown_criterion_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown criterion 'l3'; valid: apoz, blended, bn_gamma, car"):
        get_criterion("l3")


@pytest.mark.parametrize("name", CONTRACT_NAMES)
def test_contract(name, setting):
    model, units, batches = setting
    before = copy.deepcopy(model.state_dict())
    crit = get_criterion(name)
    assert crit.doc, f"{name} needs a one-line docstring"

    def context(batches):
        return ScoringContext(batches=batches, seed=3, target_classes=[0, 1, 2], options=CONTRACT_OPTIONS.get(name, {}))

    for unit in units:
        ctx = context(batches)
        scores = crit(model, unit, ctx)
        assert scores.shape == (unit.n_filters,)
        assert torch.isfinite(scores).all()
        assert torch.equal(scores, crit(model, unit, context(batches)))
        reordered = crit(model, unit, context(batches[::-1]))
        torch.testing.assert_close(reordered, scores, rtol=1e-5, atol=1e-7)
        # The unit may be given by name as well.
        torch.testing.assert_close(crit(model, unit.name, ctx), scores)
    # Scoring leaves the model as it was: weights, grads, mode.
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())
    assert not model.training


def test_a_score_of_the_wrong_shape_is_an_error_not_an_assert():
    model = _model("small_cnn")
    unit = describe_units(model)[0]
    bad = Criterion("bad", lambda m, u, ctx: torch.zeros(u.n_filters + 1), needs_data=False, doc="one too many")
    with pytest.raises(ValueError, match=r"^criterion 'bad' returned shape \(17,\) for unit 'features.0'; .* shape \(16,\)$"):
        bad(model, unit)


def test_data_criteria_use_one_pass_over_the_batches():
    model = _model("small_cnn")
    unit = describe_units(model)[2]
    batches = _batches(model.input_shape, n_batches=4)
    calls = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    for name in ["mean_activation", "apoz", "entropy", "scaled_entropy", "hrank", "sensitivity", "taylor", "class_specific"]:
        calls.clear()
        get_criterion(name)(model, unit, ScoringContext(batches=batches, target_classes=[0, 1, 2, 3, 4]))
        assert len(calls) == len(batches), name
    handle.remove()


def test_random_depends_on_seed_and_unit():
    model = _model("small_cnn")
    u0, u1 = describe_units(model)[:2]
    rnd = get_criterion("random")
    a, b = rnd(model, u0, ScoringContext(seed=0)), rnd(model, u0, ScoringContext(seed=1))
    assert not torch.equal(a, b)
    assert not torch.equal(a, rnd(model, u1, ScoringContext(seed=0)))


def _tiny():
    """A 1x1 conv with filters +1 and -1 on a 1x2x2 input, then a flatten into a head."""
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
        model[0].bias.zero_()
    model.input_shape = (1, 2, 2)
    x = torch.tensor([[1.0, -1.0], [0.0, 2.0]]).view(1, 1, 2, 2)
    return model, [(x, torch.tensor([0]))]


def test_hand_checked_values():
    model, batches = _tiny()
    ctx = ScoringContext(batches=batches)
    # Channel 0 sees [[1, -1], [0, 2]], channel 1 its negative; ReLU rank 2 and 1.
    torch.testing.assert_close(get_criterion("l1")(model, "0", ctx), torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(get_criterion("apoz")(model, "0", ctx), torch.tensor([1 - 2 / 4, 1 - 3 / 4]))
    torch.testing.assert_close(get_criterion("mean_activation")(model, "0", ctx), torch.tensor([3 / 4, 1 / 4]))
    torch.testing.assert_close(get_criterion("hrank")(model, "0", ctx), torch.tensor([2.0, 1.0]))

    conv = nn.Conv2d(2, 3, 2, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([3.0, -4.0, 0, 0, 0, 0, 0, 0]).repeat(3, 1).view(3, 2, 2, 2) * torch.tensor([1.0, 2.0, 0.5]).view(3, 1, 1, 1))
    m = nn.Sequential(conv, nn.Flatten(), nn.Linear(3, 2))
    m.input_shape = (2, 2, 2)
    torch.testing.assert_close(get_criterion("l1")(m, "0"), torch.tensor([7.0, 14.0, 3.5]))
    torch.testing.assert_close(get_criterion("l2")(m, "0"), torch.tensor([5.0, 10.0, 2.5]))
    # FPGM: distances between filters 5, 10, 2.5 apart along one direction.
    torch.testing.assert_close(get_criterion("fpgm")(m, "0"), torch.tensor([5 + 2.5, 5 + 7.5, 2.5 + 7.5]))


def test_bn_gamma_reads_the_bn_scale_and_needs_a_bn():
    model = _model("small_cnn")
    unit = describe_units(model)[1]
    torch.testing.assert_close(get_criterion("bn_gamma")(model, unit), model.features[5].weight.detach().abs())
    plain, _ = _tiny()
    with pytest.raises(ValueError, match=r"criterion 'bn_gamma': unit '0' has no BatchNorm"):
        get_criterion("bn_gamma")(plain, "0")


def test_entropy_of_known_histograms():
    values = torch.tensor([[0.0, 1.0], [1.0, 1.0], [0.0, 1.0], [1.0, 1.0]])  # column 0: two equal bins
    torch.testing.assert_close(histogram_entropy(values, bins=4), torch.tensor([math.log(2), 0.0]))


def _assert_same_car(fast, naive, n):
    # The accuracy part is integer counting and must agree exactly; the loss tie-break is
    # the same arithmetic on logits from differently batched forwards, equal here up to float noise.
    assert torch.equal(torch.round(fast.double() * n), torch.round(naive * n))
    torch.testing.assert_close(fast.double(), naive, rtol=1e-5, atol=1e-9)


def test_car_fast_equals_naive_and_is_an_accuracy_drop():
    model = _model("small_cnn")
    batches = _batches(model.input_shape, n_batches=2, size=32)
    for unit in describe_units(model)[-2:]:
        ctx = ScoringContext(batches=batches, car_max_batch=200)  # forces several chunks per batch
        fast = get_criterion("car")(model, unit, ctx)
        _assert_same_car(fast, car_naive(model, unit, ctx), 64)
        # Within half an accuracy step of the accuracy drop, which lies in [-1, 1].
        assert ((fast >= -1 - 0.5 / 64) & (fast <= 1 + 0.5 / 64)).all()


def test_car_on_residual_unit_equals_naive():
    model = _model("resnet20_cifar")
    units = describe_units(model)
    # The stem plus every layer1 block (one coupled unit), and a conv inside a block,
    # whose skip path meets the ablated activation (the batch is expanded at the input).
    for unit in [units[0], next(u for u in units if u.name == "layer1.0.conv1")]:
        ctx = ScoringContext(batches=_batches(model.input_shape, n_batches=1, size=16))
        _assert_same_car(get_criterion("car")(model, unit, ctx), car_naive(model, unit, ctx), 16)
    assert len(units[0].convs) > 1


def test_bad_contexts_raise_clear_errors():
    model = _model("small_cnn")
    with pytest.raises(ValueError, match=r"criterion 'taylor' needs scoring batches"):
        get_criterion("taylor")(model, "features.0", ScoringContext())
    with pytest.raises(ValueError, match=r"criterion 'class_specific' needs target classes"):
        get_criterion("class_specific")(model, "features.0", ScoringContext(batches=_batches((1, 28, 28))))
    with pytest.raises(ValueError, match=r"no scoring image has a label in target_classes=\[99\]"):
        get_criterion("class_specific")(model, "features.0", ScoringContext(batches=_batches((1, 28, 28)), target_classes=[99]))
    with pytest.raises(ValueError, match=r"unknown unit 'nope'; valid: features.0"):
        get_criterion("l1")(model, "nope")


def test_class_specific_ignores_other_classes():
    model = _model("small_cnn")
    batches = _batches(model.input_shape, n_batches=2, size=32)
    only = [(x[y < 3], y[y < 3]) for x, y in batches]
    crit = get_criterion("class_specific")
    torch.testing.assert_close(
        crit(model, "features.4", ScoringContext(batches=batches, target_classes=[0, 1, 2])),
        get_criterion("sensitivity")(model, "features.4", ScoringContext(batches=only)),
    )
