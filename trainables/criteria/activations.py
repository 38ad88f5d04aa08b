"""Activation-based criteria: one hooked pass over the scoring batches per unit.

The activation of a filter is its channel after the unit's BatchNorm (or conv, without BN),
passed through ReLU. A residual-coupled unit has one such point per conv; its score is
the mean of the per-point scores.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from trainables.core.surgery import Unit
from trainables.criteria._base import ScoringContext, channel_stats, register_criterion


def _mean_act(a: Tensor) -> Tensor:
    return torch.relu(a).mean(dim=(2, 3))  # (B, C)


def _zero_share(a: Tensor) -> Tensor:
    return (a <= 0).float().mean(dim=(2, 3))  # (B, C): share of zeros after ReLU


def _rank(a: Tensor) -> Tensor:
    return torch.linalg.matrix_rank(torch.relu(a).double()).float()  # (B, C)


def histogram_entropy(values: Tensor, bins: int) -> Tensor:
    """Entropy (nats) of each column's values binned into ``bins`` equal bins over its range.

    ``values`` is (N, C); returns (C,). A constant column has entropy 0.
    """
    lo, hi = values.min(dim=0).values, values.max(dim=0).values
    width = (hi - lo).clamp_min(1e-12)
    idx = ((values - lo) / width * bins).long().clamp(0, bins - 1)  # (N, C)
    counts = torch.zeros(bins, values.shape[1]).scatter_add_(0, idx, torch.ones_like(values))
    p = counts / values.shape[0]
    return -(p * torch.log(p.clamp_min(1e-30))).sum(dim=0)


@register_criterion("mean_activation", needs_data=True)
def mean_activation(model: nn.Module, unit: Unit, ctx: ScoringContext) -> Tensor:
    """Mean post-ReLU activation of the filter over the data (Molchanov et al. 2017; used by Mittal et al. 2019)."""
    return channel_stats(model, unit, ctx, _mean_act).mean(dim=(0, 1))


@register_criterion("apoz", needs_data=True)
def apoz(model: nn.Module, unit: Unit, ctx: ScoringContext) -> Tensor:
    """1 - APoZ, the average percentage of zeros after ReLU (Hu et al. 2016, "Network Trimming")."""
    return 1.0 - channel_stats(model, unit, ctx, _zero_share).mean(dim=(0, 1))


def _entropy(model: nn.Module, unit: Unit, ctx: ScoringContext) -> tuple[Tensor, Tensor]:
    means = channel_stats(model, unit, ctx, _mean_act)  # (P, N, C)
    ent = torch.stack([histogram_entropy(m, ctx.entropy_bins) for m in means])  # (P, C)
    return ent, means.mean(dim=1)


@register_criterion("entropy", needs_data=True)
def entropy(model: nn.Module, unit: Unit, ctx: ScoringContext) -> Tensor:
    """Entropy of the filter's binned per-image mean activation (Luo and Wu 2017, entropy-based pruning)."""
    ent, _ = _entropy(model, unit, ctx)
    return ent.mean(dim=0)


@register_criterion("scaled_entropy", needs_data=True)
def scaled_entropy(model: nn.Module, unit: Unit, ctx: ScoringContext) -> Tensor:
    """Entropy times mean activation, so high-entropy but weak filters rank low (Mittal et al. 2019)."""
    ent, mean = _entropy(model, unit, ctx)
    return (ent * mean).mean(dim=0)


@register_criterion("hrank", needs_data=True)
def hrank(model: nn.Module, unit: Unit, ctx: ScoringContext) -> Tensor:
    """Average matrix rank of the filter's post-ReLU feature maps (Lin et al. 2020, HRank)."""
    return channel_stats(model, unit, ctx, _rank).mean(dim=(0, 1))
