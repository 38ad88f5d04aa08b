"""Sensitivity is a mean over images of per-image gradient norms, whatever the batching."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainables import ScoringContext, build_model, describe_units, get_criterion

N_IMAGES = 48


def _double_model(arch: str) -> nn.Module:
    # Double precision: a float32 forward batched differently can flip a ReLU or max-pool
    # decision at a near-tie, and the gradient norm jumps with it.
    torch.manual_seed(0)
    model = build_model(arch).double().eval()
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen, dtype=torch.float64) + 0.1)
    return model


def _images(shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N_IMAGES, *shape, generator=gen, dtype=torch.float64)
    return x, torch.randint(0, 10, (N_IMAGES,), generator=gen)


def _split(x, y, size):
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(y), size)]


def _per_image_reference(model, unit, x, y):
    """The definition, written as a plain loop: mean over images of |dL_i/dW_f|_1."""
    weights = [model.get_submodule(c).weight for c in unit.convs]
    total = torch.zeros(unit.n_filters, dtype=torch.float64)
    for i in range(len(y)):
        grads = torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), weights)
        total += sum(g.abs().flatten(1).sum(dim=1) for g in grads)
    return total / len(y)


@pytest.mark.parametrize("arch, which", [("small_cnn", 0), ("small_cnn", -1), ("resnet20_cifar", -1)])
def test_sensitivity_does_not_depend_on_the_batch_size(arch, which):
    model = _double_model(arch)
    unit = describe_units(model)[which]  # resnet20's last unit is residual-coupled (several convs)
    x, y = _images(model.input_shape)
    crit = get_criterion("sensitivity")
    scores = {size: crit(model, unit, ScoringContext(batches=_split(x, y, size))) for size in (48, 16, 1)}
    for size in (16, 1):
        torch.testing.assert_close(scores[size], scores[48], rtol=1e-5, atol=0)
        assert torch.equal(scores[size].argsort(), scores[48].argsort())
    torch.testing.assert_close(scores[48].double(), _per_image_reference(model, unit, x, y), rtol=1e-5, atol=0)


def test_class_specific_does_not_depend_on_the_batch_size():
    model = _double_model("small_cnn")
    unit = describe_units(model)[1]
    x, y = _images(model.input_shape, seed=2)
    crit = get_criterion("class_specific")
    by_size = [crit(model, unit, ScoringContext(batches=_split(x, y, s), target_classes=[0, 3, 7])) for s in (48, 16, 1)]
    for scores in by_size[1:]:
        torch.testing.assert_close(scores, by_size[0], rtol=1e-5, atol=0)
    chosen = torch.isin(y, torch.tensor([0, 3, 7]))
    torch.testing.assert_close(by_size[0].double(), _per_image_reference(model, unit, x[chosen], y[chosen]), rtol=1e-5, atol=0)
