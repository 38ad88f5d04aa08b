"""Which units share a set of calibration factors: global, per stage or per unit.

He et al. cluster the criteria and calibrate the blend per layer; ``search.blend.layerwise``
chooses how finely:

- ``global``: one clustering on the Spearman matrices averaged over all units, one factor
  per representative for every unit (``len(candidates)`` searched factors);
- ``stage``: the units, in network order, cut into ``search.blend.stages`` groups of
  consecutive units as equal in size as possible (the first groups take the remainder);
  one clustering and one set of factors per group (about ``stages x n_clusters`` factors);
- ``unit``: one group per unit, the paper's setting (``units x n_clusters`` factors, which an
  evolutionary search with a few dozen trials cannot cover on a deep network: use ``stage``).

A layerwise layout is plain data, ``{"layerwise": mode, "groups": [{"units": [...],
"candidates": [...]}, ...]}``: saved in ``launch_state.json`` (so ``resume=`` reuses it), read by
``search.space`` (one factor ``weight_g<i>_<candidate>`` per group and candidate) and put into
the blended criterion's options (``groups``, filled with the factors per trial). A global
search keeps its plain list of candidates.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from trainables.criteria.blended import LAYERWISE, factor_key

__all__ = ["LAYERWISE", "check_layerwise", "criterion_groups", "factor_keys", "make_layout", "unit_groups"]


def check_layerwise(blend: Mapping, n_units: int | None = None) -> None:
    """One-line errors for ``search.blend.layerwise`` / ``search.blend.stages``."""
    mode = blend.get("layerwise", "global")
    if mode not in LAYERWISE:
        raise ValueError(f"search.blend.layerwise must be one of {', '.join(LAYERWISE)}, but got {mode!r}")
    if mode != "stage":
        return
    stages = blend.get("stages")
    high = n_units if n_units is not None else None
    if not isinstance(stages, int) or isinstance(stages, bool) or stages < 1 or (high is not None and stages > high):
        bound = f"in [1, {high}] (the model's prunable units)" if high is not None else ">= 1"
        raise ValueError(f"search.blend.stages must be an integer {bound}, but got {stages!r}")


def unit_groups(units: Sequence[str], mode: str, stages: int | None = None) -> list[list[str]]:
    """The units (network order) of each group of factors."""
    units = list(units)
    if mode == "global":
        return [units]
    if mode == "unit":
        return [[u] for u in units]
    check_layerwise({"layerwise": mode, "stages": stages}, len(units))
    size, extra = divmod(len(units), stages)
    groups, start = [], 0
    for i in range(stages):
        end = start + size + (1 if i < extra else 0)
        groups.append(units[start:end])
        start = end
    return groups


def make_layout(mode: str, groups: Sequence[Sequence[str]], candidates: Sequence[Sequence[str]]) -> dict:
    """The layout of a layerwise search: each group's units and the candidates it blends."""
    return {"layerwise": mode, "groups": [{"units": list(u), "candidates": list(c)}
                                          for u, c in zip(groups, candidates, strict=True)]}


def factor_keys(candidates: Sequence[str] | Mapping) -> list[str]:
    """The trial config keys of the searched factors: ``weight_<c>``, or ``weight_g<i>_<c>``."""
    if isinstance(candidates, Mapping):
        return [factor_key(c, i) for i, g in enumerate(candidates["groups"]) for c in g["candidates"]]
    return [factor_key(c) for c in candidates]


def criterion_groups(layout: Mapping) -> dict:
    """The blended criterion's options for a layout, factors still to come (``with_factors``)."""
    return {"layerwise": layout["layerwise"], "groups": [{"units": list(g["units"])} for g in layout["groups"]],
            "weights": None}
