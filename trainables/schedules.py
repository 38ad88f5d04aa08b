"""Ratio schedules: how much of each unit to prune.

A schedule maps the list of units (network order, input to output) to one pruning ratio
per unit, each in [0, 1). Kept counts are ``round(n x (1 - ratio))`` (half up), at least one
filter, optionally rounded to a multiple of ``round_to`` (8 suits SIMD and tensor cores).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from data import Registry

__all__ = ["SCHEDULES", "check_ratio", "check_ratio_count", "kept_count", "list_schedules", "make_ratios"]

ScheduleFn = Callable[..., list[float]]
SCHEDULES: Registry[ScheduleFn] = Registry("ratio schedule")


def check_ratio(key: str, value: float) -> float:
    """``value`` as a float if it is a pruning ratio in [0, 1); the one place this rule lives."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{key} must be in [0, 1), but got {value!r}")
    return float(value)


def check_ratio_count(ratios: Sequence[float] | None, n_units: int, model: str = "this model") -> None:
    """A per-layer schedule needs exactly one ratio per prunable unit."""
    got = 0 if ratios is None else len(ratios)
    if got != n_units:
        raise ValueError(f"prune.ratios must have one ratio per prunable unit ({n_units} for {model}), but got {got}")


def kept_count(n: int, ratio: float, round_to: int = 1) -> int:
    """Filters kept when pruning ``ratio`` of ``n``: half-up rounding, then to a multiple of ``round_to``.

    Never fewer than one filter (or ``round_to`` filters when ``n`` allows), never more than ``n``.
    """
    check_ratio("ratio", ratio)
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"prune.round_to must be an integer >= 1, but got {round_to!r}")
    k = max(1, math.floor(n * (1.0 - ratio) + 0.5))
    if round_to > 1 and n >= round_to:
        k = max(round_to, math.floor(k / round_to + 0.5) * round_to)
    return min(k, n)


def _uniform(n_units: int, *, ratio: float, **_: object) -> list[float]:
    return [check_ratio("prune.ratio", ratio)] * n_units


def _differential(n_units: int, *, ratio_low: float, ratio_high: float, **_: object) -> list[float]:
    """Mittal et al.'s differential rule: prune less near the input, more near the output.

    The ratio rises linearly with depth from ``ratio_low`` (first unit) to ``ratio_high`` (last).
    """
    lo, hi = check_ratio("prune.ratio_low", ratio_low), check_ratio("prune.ratio_high", ratio_high)
    if n_units == 1:
        return [hi]
    return [lo + (hi - lo) * i / (n_units - 1) for i in range(n_units)]


def _per_layer(n_units: int, *, ratios: Sequence[float], **_: object) -> list[float]:
    ratios = list(ratios or [])
    check_ratio_count(ratios, n_units)
    return [check_ratio(f"prune.ratios[{i}]", r) for i, r in enumerate(ratios)]


SCHEDULES.register("uniform", _uniform)
SCHEDULES.register("differential", _differential)
SCHEDULES.register("per_layer", _per_layer)


def list_schedules() -> list[str]:
    return SCHEDULES.names()


def make_ratios(
    schedule: str,
    n_units: int,
    *,
    ratio: float = 0.5,
    ratio_low: float = 0.25,
    ratio_high: float = 0.75,
    ratios: Sequence[float] | None = None,
) -> list[float]:
    """One pruning ratio per unit, in network order (input to output)."""
    return SCHEDULES.get(schedule)(n_units, ratio=ratio, ratio_low=ratio_low, ratio_high=ratio_high, ratios=ratios)
