"""How much to prune where: per-unit ratios from a schedule or a FLOPs target, and which filters stay."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from trainables.config import PruneConfig
from trainables.metrics import count_flops
from trainables.schedules import kept_count, make_ratios
from trainables.surgery import Unit, prune_layer

__all__ = ["plan_ratios", "select_keep"]

# A FLOPs target is met when the reduction is within this of it (absolute, in [0, 1]) ...
_TOLERANCE = 0.02
# ... and the bisection stops early once it is within this.
_CLOSE_ENOUGH = 0.005
_MAX_BISECTIONS = 30
_MAX_UNIT_RATIO = 0.95  # no unit may lose more than 95% of its filters to a FLOPs target


def select_keep(scores: Tensor, k: int) -> list[int]:
    """Indices of the ``k`` highest scores, ties broken towards the lower index, sorted."""
    order = torch.sort(-scores.double(), stable=True).indices
    return sorted(order[:k].tolist())


def _flops_with_ratios(model: nn.Module, units: list[Unit], ratios: Sequence[float], round_to: int) -> int:
    """FLOPs of ``model`` with ``ratios`` applied; structure only, so the first filters are kept."""
    probe = copy.deepcopy(model)
    for u, r in zip(units, ratios, strict=True):
        prune_layer(probe, u.name, list(range(kept_count(u.n_filters, r, round_to))))
    return count_flops(probe)


def plan_ratios(model: nn.Module, units: list[Unit], prune: PruneConfig) -> list[float]:
    """One ratio (share of filters removed) per unit, input to output, from the schedule, or
    scaled to meet a FLOPs target.

    With ``target_flops_reduction`` the schedule's shape is kept and scaled by a bisection
    until the pruned FLOPs are within 2 points of the target reduction.
    """
    ratios = make_ratios(
        prune.schedule, len(units), ratio=prune.ratio, ratio_low=prune.ratio_low,
        ratio_high=prune.ratio_high, ratios=prune.ratios,
    )
    if prune.target_flops_reduction is None:
        return ratios
    # A schedule of zeros has no shape to scale: spread the target evenly instead.
    shape = ratios if max(ratios) > 0 else [1.0] * len(units)
    base = count_flops(model)

    def reduction(scale: float) -> float:
        return 1.0 - _flops_with_ratios(model, units, [s * scale for s in shape], prune.round_to) / base

    scale = _bisect_scale(reduction, prune.target_flops_reduction, _MAX_UNIT_RATIO / max(shape), prune.round_to)
    return [s * scale for s in shape]


def _bisect_scale(reduction: Callable[[float], float], target: float, cap: float, round_to: int) -> float:
    """The scale in [0, ``cap``] whose FLOPs ``reduction`` is within 2 points of ``target``;
    ``reduction`` grows with the scale (more pruning, fewer FLOPs)."""
    if reduction(cap) < target - _TOLERANCE:
        raise ValueError(
            f"prune.target_flops_reduction={target} is out of reach: at most {reduction(cap):.3f} with this schedule"
        )
    lo, hi = 0.0, cap
    for _ in range(_MAX_BISECTIONS):
        mid = (lo + hi) / 2
        got = reduction(mid)
        if abs(got - target) <= _CLOSE_ENOUGH:
            break
        lo, hi = (mid, hi) if got < target else (lo, mid)
    # Kept counts are whole (and multiples of round_to): the reduction moves in jumps that may skip the target.
    if abs(reduction(mid) - target) > _TOLERANCE:
        raise ValueError(f"prune.target_flops_reduction={target} cannot be met within 2% with round_to={round_to}")
    return mid
