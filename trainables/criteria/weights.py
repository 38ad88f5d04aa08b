"""Data-free criteria: they look only at the weights (or at nothing, for ``random``)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from trainables.core.surgery import Unit
from trainables.criteria._base import ScoringContext, filter_weights, register_criterion


@register_criterion("random", needs_data=False)
def random_scores(model: nn.Module, unit: Unit, ctx: ScoringContext) -> Tensor:
    """Uniform random scores, seeded by (ctx.seed, unit); the baseline of Mittal et al. 2019."""
    return torch.rand(unit.n_filters, generator=ctx.unit_generator(unit.name))


@register_criterion("l1", needs_data=False)
def l1_norm(model: nn.Module, unit: Unit, ctx: ScoringContext) -> Tensor:
    """Sum of absolute filter weights (Li et al. 2017, "Pruning Filters for Efficient ConvNets")."""
    return filter_weights(model, unit).abs().sum(dim=1)


@register_criterion("l2", needs_data=False)
def l2_norm(model: nn.Module, unit: Unit, ctx: ScoringContext) -> Tensor:
    """Euclidean norm of the filter weights (He et al. 2018, soft filter pruning)."""
    return filter_weights(model, unit).norm(dim=1)


@register_criterion("fpgm", needs_data=False)
def fpgm(model: nn.Module, unit: Unit, ctx: ScoringContext) -> Tensor:
    """Summed distance to the layer's other filters, a proxy for distance from their geometric median (He et al. 2019, FPGM).

    Filters near the geometric median are replaceable by the others, so they score low.
    """
    w = filter_weights(model, unit).double()  # double: the sums of distances are compared closely
    return torch.cdist(w, w).sum(dim=1)


@register_criterion("bn_gamma", needs_data=False)
def bn_gamma(model: nn.Module, unit: Unit, ctx: ScoringContext) -> Tensor:
    """|BatchNorm scale| of the filter's channel (Liu et al. 2017, network slimming)."""
    if not unit.bns:
        raise ValueError(
            f"criterion 'bn_gamma': unit '{unit.name}' has no BatchNorm after its conv; choose another criterion"
        )
    return torch.stack([model.get_submodule(b).weight.detach().abs() for b in unit.bns]).mean(dim=0)
