"""CAR's tie-break by loss increase, its choice of where to expand the batch, and its errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainables import ScoringContext, build_model, describe_units, get_criterion, mask_filters
from trainables.criteria.car import _needs_input_expansion, car_naive, combine
from trainables.protocol.stages import select_keep


def _two_filter_model() -> tuple[nn.Module, list]:
    """One image; filters 0 and 1 feed class 0 with 1 and 2. Either alone keeps it correct.

    Removing filter 1 lowers the class-0 logit more, so its loss increase is larger.
    """
    model = nn.Sequential(nn.Conv2d(1, 3, 1), nn.ReLU(), nn.Flatten(), nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([1.0, 2.0, 0.5]).view(3, 1, 1, 1))
        model[0].bias.zero_()
        model[3].weight.copy_(torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]))
        model[3].bias.zero_()
    model.input_shape = (1, 1, 1)
    return model.eval(), [(torch.ones(1, 1, 1, 1), torch.tensor([0]))]


def test_equal_accuracy_drops_are_ordered_by_loss_increase_not_index():
    model, batches = _two_filter_model()
    ctx = ScoringContext(batches=batches)
    scores = get_criterion("car")(model, "0", ctx)
    # No filter flips the prediction: all accuracy drops are 0. Filter 2 changes nothing.
    assert torch.equal(torch.round(scores * 1), torch.zeros(3))
    assert scores[1] > scores[0] > scores[2] == 0
    assert select_keep(scores, 1) == [1]  # broken by filter index, this would be [0]
    torch.testing.assert_close(scores.double(), car_naive(model, describe_units(model)[0], ctx))
    # The tie-break is exactly atan(mean loss increase) / pi, in units of one accuracy step.
    with torch.no_grad():
        base = F.cross_entropy(model(batches[0][0]), batches[0][1])
    logit0 = {0: 2.0, 1: 1.0}  # class-0 logit without filter j; the class-1 logit stays 0
    for j in (0, 1):
        increase = F.cross_entropy(torch.tensor([[logit0[j], 0.0]]), torch.tensor([0])) - base
        assert math.isclose(float(scores[j]), math.atan(float(increase)) / math.pi, rel_tol=1e-5)


def test_accuracy_drop_outranks_any_loss_increase():
    drops = torch.tensor([1, 0, 0, 2, 1])
    losses = torch.tensor([-0.5, 50.0, 0.1, -1e6, 1e6], dtype=torch.float64)
    scores = combine(drops, losses, n=10)
    order = sorted(range(5), key=lambda j: (int(drops[j]), float(losses[j])))
    assert scores.argsort().tolist() == order
    assert torch.equal(torch.round(scores * 10).long(), drops)


def test_scores_are_lexicographic_in_accuracy_drop_and_loss_increase():
    torch.manual_seed(0)
    model = build_model("small_cnn").eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 28, 28, generator=gen)
    with torch.no_grad():
        y = model(x).argmax(dim=1)  # own predictions: every flipped prediction is a lost one
    unit = describe_units(model)[-1]
    scores = get_criterion("car")(model, unit, ScoringContext(batches=[(x, y)])).double()
    with torch.no_grad():
        base_loss = float(F.cross_entropy(model(x), y))
    keys = []
    for j in range(unit.n_filters):
        ablated = build_model("small_cnn").eval()
        ablated.load_state_dict(model.state_dict())
        mask_filters(ablated, unit, [i for i in range(unit.n_filters) if i != j])
        with torch.no_grad():
            logits = ablated(x)
        keys.append((64 - int((logits.argmax(1) == y).sum()), float(F.cross_entropy(logits, y)) - base_loss))
    assert any(k[0] > 0 for k in keys) and len({k[0] for k in keys}) < len(keys)  # drops and ties both occur
    assert torch.equal(torch.round(scores * 64).long(), torch.tensor([k[0] for k in keys]))
    by_key = sorted(range(unit.n_filters), key=lambda j: keys[j])
    assert scores[by_key].diff().ge(0).all()  # never out of (drop, loss) order; float rounding may tie


def test_input_expansion_only_where_a_skip_path_meets_the_unit():
    torch.manual_seed(0)
    resnet = build_model("resnet20_cifar").eval()
    x = torch.randn(2, *resnet.input_shape)
    units = {u.name: u for u in describe_units(resnet)}
    assert not _needs_input_expansion(resnet, units["conv1"], x)  # the skip path carries the unit itself
    assert _needs_input_expansion(resnet, units["layer1.0.conv1"], x)  # the block's identity bypasses it
    small = build_model("small_cnn").eval()
    assert not any(_needs_input_expansion(small, u, torch.randn(2, 1, 28, 28)) for u in describe_units(small))


@pytest.mark.parametrize(
    "error", [RuntimeError("boom"), torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")]
)
@pytest.mark.parametrize("unit_name", ["conv1", "layer1.0.conv1"])  # expanded at the unit / at the input
def test_other_errors_in_the_expanded_forward_propagate_untouched(error, unit_name):
    torch.manual_seed(0)
    model = build_model("resnet20_cifar").eval()
    calls = []

    def fail_on_expanded(_module, args):
        if args[0].shape[0] > 8:  # only the expanded forwards (scoring batch 8)
            calls.append(args[0].shape[0])
            raise error

    handle = model.fc.register_forward_pre_hook(fail_on_expanded)
    gen = torch.Generator().manual_seed(0)
    ctx = ScoringContext(batches=[(torch.randn(8, 3, 32, 32, generator=gen), torch.randint(0, 10, (8,), generator=gen))])
    try:
        with pytest.raises(type(error), match=str(error)):
            get_criterion("car")(model, unit_name, ctx)
    finally:
        handle.remove()
    assert len(calls) == 1  # not retried another way
