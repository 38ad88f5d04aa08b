"""A blend of criteria: He et al. 2021, "Blending Pruning Criteria for Convolutional Neural Networks".

Each candidate criterion scores the unit's filters; the scores are normalised per unit
(``rank``: ranks scaled to [0, 1], so only the ordering counts; ``zscore``: standardised raw
scores, so margins count too) and summed with one calibration factor per candidate:

    score_j = sum_c  w_c * normalise(s_c)_j

Options (``ScoringContext.options``, from ``criterion.weights`` / ``criterion.normalize``):
``weights`` maps candidate names to factors (>= 0, not all zero); ``normalize`` is
``rank`` (default) or ``zscore``. ``check_blend_options`` validates them before any work.

Layerwise blends (He et al. cluster and calibrate per layer): ``layerwise`` is ``global``
(default: ``weights`` apply to every unit), ``stage`` or ``unit``; the last two replace
``weights`` by ``groups``, a list of ``{"units": [unit names], "weights": {candidate: factor}}``
(a stage: consecutive units; a unit: one each), and each unit is scored with the candidates
and factors of the one group that lists it. A search names a group's factors
``weight_g<group>_<candidate>`` (``factor_key``) and ``with_factors`` puts them into ``groups``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from trainables.core.surgery import Unit
from trainables.criteria._base import CRITERIA, ScoringContext, register_criterion

__all__ = ["LAYERWISE", "NORMALIZERS", "check_blend_options", "example_options", "factor_key", "normalize_scores",
           "rank_normalize", "unit_weights", "with_factors"]

NORMALIZERS = ("rank", "zscore")
LAYERWISE = ("global", "stage", "unit")
_GROUP_FACTOR = re.compile(r"^g(\d+)_(.+)$")  # "g<group>_<candidate>", after the "weight_" prefix


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


def _check_weights(weights, key: str) -> None:
    if not isinstance(weights, Mapping) or not weights:
        raise ValueError(f"{key}={weights!r} must map candidate criteria to factors, e.g. {key}={{l1:1.0,apoz:0.5}}")
    valid = [n for n in CRITERIA.names() if n != "blended"]
    for name, factor in weights.items():
        if name not in valid:
            raise ValueError(f"{key}: unknown candidate '{name}'; valid: {', '.join(valid)}")
        if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not math.isfinite(factor) or factor < 0:
            raise ValueError(f"{key}.{name}={factor!r} must be a finite number >= 0")
    if not any(float(f) > 0 for f in weights.values()):
        raise ValueError(f"{key}={dict(weights)} are all zero; at least one factor must be > 0")


def _check_groups(groups) -> None:
    if not isinstance(groups, list) or not groups:
        raise ValueError(f"criterion.groups must be a non-empty list of {{units: [...], weights: {{...}}}}, but got {groups!r}")
    seen: set[str] = set()
    for i, group in enumerate(groups):
        units = group.get("units") if isinstance(group, Mapping) else None
        if not isinstance(units, list) or not units or not all(isinstance(u, str) for u in units):
            raise ValueError(f"criterion.groups[{i}].units must be a non-empty list of unit names, but got {units!r}")
        twice = sorted(seen.intersection(units))
        if twice:
            raise ValueError(f"criterion.groups[{i}].units must not repeat a unit of an earlier group, but got {twice[0]!r}")
        seen.update(units)
        _check_weights(group.get("weights"), f"criterion.groups[{i}].weights")


def check_blend_options(options: Mapping) -> None:
    """One-line errors for the blended criterion's options (unknown candidate, bad weights)."""
    layerwise = options.get("layerwise", "global")
    if layerwise not in LAYERWISE:
        raise ValueError(f"criterion.layerwise must be one of {', '.join(LAYERWISE)}, but got {layerwise!r}")
    if layerwise == "global":
        if options.get("groups") is not None:
            raise ValueError("criterion.groups must be null with criterion.layerwise=global (use criterion.weights), "
                             f"but got {options['groups']!r}")
        _check_weights(options.get("weights"), "criterion.weights")
    else:
        if options.get("weights") is not None:
            raise ValueError(f"criterion.weights must be null with criterion.layerwise={layerwise} (factors go in "
                             f"criterion.groups), but got {options['weights']!r}")
        _check_groups(options.get("groups"))
    how = options.get("normalize", "rank")
    if how not in NORMALIZERS:
        raise ValueError(f"criterion.normalize='{how}' is not one of: {', '.join(NORMALIZERS)}")


def example_options() -> dict:
    """A small valid set of options: one data-free and one data-driven candidate, z-scored.

    The blend has no natural default (its weights are what a search tunes), so it never
    invents one; this is what the shared criterion contract test scores it with.
    """
    return {"weights": {"l1": 1.0, "mean_activation": 0.5}, "normalize": "zscore"}


def factor_key(candidate: str, group: int | None = None) -> str:
    """The search's name of a calibration factor: ``weight_<candidate>`` (global) or
    ``weight_g<group>_<candidate>`` (the factor of one group of a layerwise blend)."""
    return f"weight_{candidate}" if group is None else f"weight_g{group}_{candidate}"


def with_factors(options: Mapping, factors: Mapping[str, float]) -> dict:
    """``options`` with the searched ``factors`` (``factor_key`` names without ``weight_``) in place.

    Options that carry ``groups`` (a layerwise blend's units, possibly without factors yet)
    take ``g<i>_<candidate>`` factors into group ``i``; other options take them as ``weights``.
    A copy: the caller's options are left alone.
    """
    if options.get("groups") is None:
        return {**options, "weights": {k: float(v) for k, v in factors.items()}}
    groups = [{**g, "weights": {}} for g in options["groups"]]
    for key, value in factors.items():
        match = _GROUP_FACTOR.match(key)
        if match is None or int(match[1]) >= len(groups):
            raise ValueError(f"weight_{key} must be weight_g<group>_<candidate> with group < {len(groups)} "
                             f"(criterion.layerwise={options.get('layerwise')}), but got weight_{key}")
        groups[int(match[1])]["weights"][match[2]] = float(value)
    return {**options, "groups": groups}


def unit_weights(options: Mapping, unit: str) -> Mapping:
    """The candidates and factors that score ``unit``: ``weights``, or those of its group."""
    groups = options.get("groups")
    if groups is None:
        return options["weights"]
    for group in groups:
        if unit in group["units"]:
            return group["weights"]
    listed = [u for g in groups for u in g["units"]]
    raise ValueError(f"criterion.groups must list every pruned unit, but '{unit}' is in none (listed: {', '.join(listed)})")


@register_criterion("blended", needs_data=False)  # its data-driven candidates check for batches themselves
def blended(model: nn.Module, unit: Unit, ctx: ScoringContext) -> Tensor:
    """Weighted sum of per-unit normalised candidate scores (He et al. 2021, blended criteria)."""
    check_blend_options(ctx.options)
    how = ctx.options.get("normalize", "rank")
    total = torch.zeros(unit.n_filters, dtype=torch.float64)
    for name, factor in unit_weights(ctx.options, unit.name).items():
        if float(factor) == 0:
            continue  # a zero factor costs nothing: the candidate is not even scored
        total += float(factor) * normalize_scores(CRITERIA.get(name)(model, unit, ctx), how)
    return total
