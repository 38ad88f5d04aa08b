"""A blend of criteria: He et al. 2021, "Blending Pruning Criteria for Convolutional Neural Networks".

Each candidate criterion scores the unit's filters; the scores are normalised per unit
(``rank``: ranks scaled to [0, 1], so only the ordering counts; ``zscore``: standardised raw
scores, so margins count too) and summed with one calibration factor per candidate:

    score_j = sum_c  w_c * normalise(s_c)_j

Options (``ScoringContext.options``, from ``criterion.weights`` / ``criterion.normalize``):
``weights`` maps candidate names to factors (>= 0, not all zero); ``normalize`` is
``rank`` (default) or ``zscore``. ``check_blend_options`` validates them before any work.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from trainables.criteria._base import CRITERIA, ScoringContext, register_criterion
from trainables.surgery import Unit

__all__ = ["NORMALIZERS", "check_blend_options", "example_options", "normalize_scores", "rank_normalize"]

NORMALIZERS = ("rank", "zscore")


def rank_normalize(scores: Tensor) -> Tensor:
    """Average ranks scaled to [0, 1] (lowest score 0, highest 1; ties share their mean rank).

    Written out here because torch has no tie-averaging rank; scipy's ``rankdata`` would
    pull numpy round trips into every scoring call for a few lines of arithmetic.
    """
    s = scores.double().flatten()
    n = s.numel()
    if n == 1:
        return torch.ones(1, dtype=torch.float64)
    order = torch.argsort(s, stable=True)
    ranks = torch.empty(n, dtype=torch.float64)
    ranks[order] = torch.arange(n, dtype=torch.float64)
    # Ties: every member of a group of equal scores gets the group's mean rank.
    uniq, inverse = torch.unique(s, return_inverse=True)
    if uniq.numel() < n:
        sums = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inverse, ranks)
        counts = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inverse, torch.ones(n, dtype=torch.float64))
        ranks = (sums / counts)[inverse]
    return ranks / (n - 1)


def normalize_scores(scores: Tensor, how: str) -> Tensor:
    if how == "rank":
        return rank_normalize(scores)
    s = scores.double()
    std = s.std(unbiased=False)
    return (s - s.mean()) / std if std > 0 else torch.zeros_like(s)


def check_blend_options(options: Mapping) -> None:
    """One-line errors for the blended criterion's options (unknown candidate, bad weights)."""
    weights = options.get("weights")
    if not isinstance(weights, Mapping) or not weights:
        raise ValueError(
            f"criterion.weights={weights!r} must map candidate criteria to factors, e.g. criterion.weights={{l1:1.0,apoz:0.5}}"
        )
    valid = [n for n in CRITERIA.names() if n != "blended"]
    for name, factor in weights.items():
        if name not in valid:
            raise ValueError(f"criterion.weights: unknown candidate '{name}'; valid: {', '.join(valid)}")
        if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not math.isfinite(factor) or factor < 0:
            raise ValueError(f"criterion.weights.{name}={factor!r} must be a finite number >= 0")
    if not any(float(f) > 0 for f in weights.values()):
        raise ValueError(f"criterion.weights={dict(weights)} are all zero; at least one factor must be > 0")
    how = options.get("normalize", "rank")
    if how not in NORMALIZERS:
        raise ValueError(f"criterion.normalize='{how}' is not one of: {', '.join(NORMALIZERS)}")


def example_options() -> dict:
    """A small valid set of options: one data-free and one data-driven candidate, z-scored.

    The blend has no natural default (its weights are what a search tunes), so it never
    invents one; this is what the shared criterion contract test scores it with.
    """
    return {"weights": {"l1": 1.0, "mean_activation": 0.5}, "normalize": "zscore"}


@register_criterion("blended", needs_data=False)  # its data-driven candidates check for batches themselves
def blended(model: nn.Module, unit: Unit, ctx: ScoringContext) -> Tensor:
    """Weighted sum of per-unit normalised candidate scores (He et al. 2021, blended criteria)."""
    check_blend_options(ctx.options)
    how = ctx.options.get("normalize", "rank")
    total = torch.zeros(unit.n_filters, dtype=torch.float64)
    for name, factor in ctx.options["weights"].items():
        if float(factor) == 0:
            continue  # a zero factor costs nothing: the candidate is not even scored
        total += float(factor) * normalize_scores(CRITERIA.get(name)(model, unit, ctx), how)
    return total
