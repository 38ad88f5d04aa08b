"""Ratio schedules: how much of each unit to prune.

A schedule maps the units' filter counts (network order, input to output) to one pruning
ratio per unit, each in [0, 1). Kept counts are ``round(n x (1 - ratio))`` (half up), at least
one filter, optionally rounded to a multiple of ``round_to`` (8 suits SIMD and tensor cores).

Schedules, by registry name:

- ``uniform``: ``ratio`` for every unit.
- ``differential``: Mittal et al. (2019)'s differential pruning: a unit loses a larger share the
  more filters it has, from ``ratio_low`` (the units with the fewest filters) to ``ratio_high``
  (the most), linear in log2 of the filter count.
- ``differential_depth``: a linear ramp by position, ``ratio_low`` at the first unit to
  ``ratio_high`` at the last (this project's earlier ``differential``).
- ``differential_inverted``, ``differential_depth_inverted``: the same two rules with
  ``ratio_low >= ratio_high`` (prune less where there are more filters, or near the output).
  The plain names refuse such an inverted ramp: it is almost always a swapped pair.
- ``per_layer``: ``ratios``, one per unit.
- ``global``: one threshold over all units' criterion scores, each unit's scores divided by
  their mean |score| (torch-pruning's global pruning): ``ratio`` of all filters go, the
  lowest normalised scores first, but every unit keeps at least ``min_keep`` of its filters.
  It needs the scores (``make_ratios(..., scores=...)``; ``trainables.protocol.planning.plan_ratios``
  scores the unpruned model), so it is the one schedule that depends on the criterion.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING

from data import Registry

if TYPE_CHECKING:  # annotations only: the schedules themselves need no torch import
    from torch import Tensor

__all__ = [
    "GLOBAL", "SCHEDULES", "check_min_keep", "check_n_filters", "check_ramp", "check_ratio", "check_ratio_count",
    "global_drop", "global_floors", "global_kept", "kept_count", "list_schedules", "make_ratios", "unit_normalised",
]

GLOBAL = "global"  # the schedule that reads the criterion's scores

ScheduleFn = Callable[..., list[float]]
SCHEDULES: Registry[ScheduleFn] = Registry("ratio schedule")

# Differential schedules: name -> (what the ramp follows, whether it is inverted).
_RAMPS = {
    "differential": ("filters", False),
    "differential_inverted": ("filters", True),
    "differential_depth": ("depth", False),
    "differential_depth_inverted": ("depth", True),
}
_FOLLOWS = {"filters": "layers with more filters", "depth": "units nearer the output"}


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


def check_n_filters(n_filters: Sequence[int]) -> list[int]:
    """The units' filter counts as a list, if it is a non-empty sequence of integers >= 1."""
    ok = isinstance(n_filters, Sequence) and not isinstance(n_filters, str) and len(n_filters) > 0 and all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in n_filters)
    if not ok:
        raise ValueError(f"n_filters must be a non-empty list of filter counts >= 1 (one per unit, input to output), "
                         f"but got {n_filters!r}")
    return list(n_filters)


def check_ramp(schedule: str, ratio_low: float, ratio_high: float) -> None:
    """A differential ramp must rise (or, for an ``*_inverted`` schedule, fall) from
    ``ratio_low`` to ``ratio_high``; other schedules ignore the two keys."""
    if schedule not in _RAMPS:
        return
    follows, inverted = _RAMPS[schedule]
    if not inverted and ratio_high < ratio_low:
        raise ValueError(f"prune.ratio_high must be >= prune.ratio_low={ratio_low} (prune.schedule={schedule} prunes "
                         f"{_FOLLOWS[follows]} more; for the inverted ramp name prune.schedule={schedule}_inverted), "
                         f"but got {ratio_high}")
    if inverted and ratio_high > ratio_low:
        plain = schedule.removesuffix("_inverted")
        raise ValueError(f"prune.ratio_high must be <= prune.ratio_low={ratio_low} (prune.schedule={schedule} prunes "
                         f"{_FOLLOWS[follows]} less; for a rising ramp use prune.schedule={plain}), "
                         f"but got {ratio_high}")


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


def _uniform(n_filters: list[int], *, ratio: float, **_: object) -> list[float]:
    return [check_ratio("prune.ratio", ratio)] * len(n_filters)


def _ramp(positions: list[float], lo: float, hi: float, flat: float) -> list[float]:
    """``lo`` at the smallest position, ``hi`` at the largest, linear in between; ``flat`` for all
    units when every position is the same."""
    first, last = min(positions), max(positions)
    if first == last:
        return [flat] * len(positions)
    # The last unit gets ``hi`` itself: lo + (hi - lo) can miss it by a rounding error.
    return [hi if x == last else lo + (hi - lo) * (x - first) / (last - first) for x in positions]


def _differential(n_filters: list[int], *, schedule: str, ratio_low: float, ratio_high: float,
                  **_: object) -> list[float]:
    lo, hi = check_ratio("prune.ratio_low", ratio_low), check_ratio("prune.ratio_high", ratio_high)
    check_ramp(schedule, lo, hi)
    if _RAMPS[schedule][0] == "depth":
        # One unit is both the first and the last: it gets the output end of the ramp, as before.
        return _ramp(list(range(len(n_filters))), lo, hi, flat=hi)
    # log2: widths double stage by stage (VGG-16: 64, 128, 256, 512), so each doubling steps the
    # ratio up by the same share; linear in the count would leave the 64- and 128-filter stages
    # near ratio_low and put most of the rise before the 512 stage. Equal counts get equal ratios.
    # When every unit has the same count the rule has no direction: the midpoint favours neither end.
    return _ramp([math.log2(n) for n in n_filters], lo, hi, flat=(lo + hi) / 2)


def _per_layer(n_filters: list[int], *, ratios: Sequence[float], **_: object) -> list[float]:
    ratios = list(ratios or [])
    check_ratio_count(ratios, len(n_filters))
    return [check_ratio(f"prune.ratios[{i}]", r) for i, r in enumerate(ratios)]


SCHEDULES.register("uniform", _uniform)
for _name in _RAMPS:
    SCHEDULES.register(_name, partial(_differential, schedule=_name))
SCHEDULES.register("per_layer", _per_layer)


def check_min_keep(key: str, value: float) -> float:
    """``value`` as a float if it is a kept share in (0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
        raise ValueError(f"{key} must be in (0, 1), but got {value!r}")
    return float(value)


def unit_normalised(scores: Tensor) -> Tensor:
    """Scores divided by their mean |score|, so that units with different scales compete fairly
    (a unit of 512 filters with L1 norms near 3 against one of 64 near 0.3)."""
    s = scores.double()
    return s / s.abs().mean().clamp_min(1e-12)


def global_drop(scores: dict[str, Tensor], current: dict[str, int], floor: dict[str, int],
                n_drop: int) -> dict[str, set[int]]:
    """The ``n_drop`` lowest-scoring filters over all units (current indices per unit), never
    taking a unit below ``floor`` filters; ties go by unit name, then index."""
    entries = [(float(v), name, i) for name, s in scores.items() for i, v in enumerate(s)]
    dropped: dict[str, set[int]] = {name: set() for name in scores}
    for _score, name, i in sorted(entries):  # lowest normalised scores go first
        if n_drop <= 0:
            break
        if current[name] - len(dropped[name]) > floor[name]:
            dropped[name].add(i)
            n_drop -= 1
    return dropped


def global_floors(n_filters: Sequence[int], min_keep: float) -> list[int]:
    """The fewest filters ``global`` leaves each unit: ``ceil(min_keep x n)``, at least one.

    ceil, not round: "at least min_keep of its filters" must hold for every unit; the epsilon
    keeps 0.1 x 30 (3.0000000000000004 in floats) at 3.
    """
    return [min(n, max(1, math.ceil(min_keep * n - 1e-9))) for n in n_filters]


def global_kept(scores: Sequence[Tensor], ratio: float, min_keep: float) -> list[int]:
    """Kept filters per unit when ``ratio`` of all filters go by one ranking of the unit-normalised
    ``scores`` (one tensor per unit, higher = keep), each unit keeping >= ``min_keep`` of its own.

    The total kept is ``round(sum(n) x (1 - ratio))`` (half up, as ``kept_count``); a ratio the
    floors cannot give is refused rather than silently pruned less.
    """
    ratio, min_keep = check_ratio("prune.ratio", ratio), check_min_keep("prune.global_min_keep", min_keep)
    counts = [int(s.numel()) for s in scores]
    check_n_filters(counts)
    total = sum(counts)
    keep_total = math.floor(total * (1.0 - ratio) + 0.5)
    floors = global_floors(counts, min_keep)
    if sum(floors) > keep_total:
        most = 1.0 - sum(floors) / total
        raise ValueError(f"prune.ratio must be <= {most:.4f} with prune.global_min_keep={min_keep} "
                         f"(every unit keeps at least that share), but got {ratio}")
    names = [f"{i:06d}" for i in range(len(scores))]  # ties then fall to the unit nearer the input
    dropped = global_drop({k: unit_normalised(s.flatten()) for k, s in zip(names, scores, strict=True)},
                          dict(zip(names, counts, strict=True)), dict(zip(names, floors, strict=True)),
                          total - keep_total)
    return [n - len(dropped[k]) for k, n in zip(names, counts, strict=True)]


def _global(n_filters: list[int], *, ratio: float, scores: Sequence[Tensor] | None, min_keep: float,
            **_: object) -> list[float]:
    if scores is None:
        raise ValueError("prune.schedule=global needs the criterion's scores of every unit (trainables.protocol.planning."
                         "plan_ratios scores the unpruned model), but got none")
    got = [int(s.numel()) for s in scores]
    if got != n_filters:
        raise ValueError(f"scores must have one tensor per unit with n_filters entries ({n_filters}), but got {got}")
    kept = global_kept(scores, ratio, min_keep)
    return [(n - k) / n for n, k in zip(n_filters, kept, strict=True)]


SCHEDULES.register(GLOBAL, _global)


def list_schedules() -> list[str]:
    return SCHEDULES.names()


def make_ratios(
    schedule: str,
    n_filters: Sequence[int],
    *,
    ratio: float = 0.5,
    ratio_low: float = 0.25,
    ratio_high: float = 0.75,
    ratios: Sequence[float] | None = None,
    scores: Sequence[Tensor] | None = None,
    min_keep: float = 0.1,
) -> list[float]:
    """One pruning ratio per unit, in network order (input to output).

    ``n_filters`` holds each unit's filter count (``Unit.n_filters``), input to output; only
    ``differential`` reads the counts, the other schedules only their number. ``scores`` (one
    tensor of ``n_filters[i]`` criterion scores per unit) and ``min_keep`` are ``global``'s:
    its ratios give back the ranking's kept counts exactly through ``kept_count`` (round_to=1).
    """
    fn = SCHEDULES.get(schedule)
    return fn(check_n_filters(n_filters), ratio=ratio, ratio_low=ratio_low, ratio_high=ratio_high, ratios=ratios,
              scores=scores, min_keep=min_keep)
