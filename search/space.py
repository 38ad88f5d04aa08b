"""The search space: a pure define-by-run Optuna function, no computation inside.

``define_space(space, n_units)`` returns the function OptunaSearch calls with an
``optuna.Trial``: it suggests the criterion, the ratio schedule and its ratios (one for
uniform and for global (the share of all filters), low/high for both differential ones, one per
unit for per_layer), p, q and the learning
rate, with bounds from ``conf/search/*.yaml``; a key set to null is not searched (the run
config's value holds). For the blended criterion it also suggests one calibration factor
``weight_<candidate>`` per candidate. The values it suggests become the trial's config,
which ``trainables.ray_trainable.trial_configs`` turns into protocol settings.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["SearchSpace", "define_space", "check_global_choice", "check_space"]

# The inverted differential schedules are not searched: the space samples ratio_low <= ratio_high.
# global ranks the criterion's scores over all units (trainables.protocol.schedules), one overall ratio.
_SCHEDULES = ("uniform", "differential", "differential_depth", "per_layer", "global")
_GLOBAL_METHODS = ("layer_by_layer", "one_shot")  # the methods that plan with the criterion's scores
# A method offered among the criteria: a trial that draws it runs prune.method=greedy_car (greedy CAR
# chooses the filters itself) and records criterion=car; never in the default pool (criteria=null).
GREEDY_CAR = "greedy_car"


def _bounds(space: Mapping, key: str) -> tuple[float, float, bool]:
    spec = space[key]
    return float(spec["low"]), float(spec["high"]), bool(spec.get("log", False))


def _searched(space: Mapping, key: str) -> bool:
    return space.get(key) is not None


def check_space(space: Mapping, criteria: list[str]) -> None:
    """One-line errors for a bad space, before any trial starts."""
    unknown = [c for c in space["criteria"] or [] if c not in criteria and c != GREEDY_CAR]
    if unknown:
        raise ValueError(f"search.criteria: unknown criterion '{unknown[0]}'; valid: {', '.join(criteria)}")
    bad = [s for s in space["schedules"] or [] if s not in _SCHEDULES]
    if not space["schedules"] or bad:
        raise ValueError(f"search.schedules must be a non-empty subset of {', '.join(_SCHEDULES)}, "
                         f"but got {list(space['schedules'] or [])}")
    if "global" in space["schedules"] and GREEDY_CAR in (space["criteria"] or []):
        raise ValueError("search.schedules must not include global when search.criteria includes greedy_car "
                         "(greedy CAR has no criterion scores to rank globally), but got both")
    if space.get("export") is not None:
        from search.export_front import check_export_formats

        check_export_formats(space["export"])
    if "blended" in (space["criteria"] or []) and not space.get("blend"):
        raise ValueError("search.criteria includes 'blended' but search.blend is missing; use search=blended")
    if not _searched(space, "ratio") and [s for s in space["schedules"] if s != "uniform"]:
        raise ValueError(f"search.ratio=null (not searched) needs search.schedules=[uniform], got {list(space['schedules'])}")
    if space.get("blend"):
        from search.blend.clustering import check_pool

        blend = space["blend"]
        check_pool(blend["pool"], criteria, n_clusters=blend.get("n_clusters"), distance_threshold=blend.get("distance_threshold"))
        from search.blend.layout import check_layerwise

        check_layerwise(blend)  # stages <= the model's units is checked once the units are known
        if blend.get("candidates") is not None:
            check_pool(blend["candidates"], criteria, n_clusters=1, key="search.blend.candidates")
        lo, hi, _ = _bounds(blend, "factor")
        if not 0 <= lo <= hi or hi <= 0:
            raise ValueError(f"search.blend.factor must have 0 <= low <= high and high > 0 (factors are weights), "
                             f"but got low={lo}, high={hi}")
        from trainables.criteria.blended import NORMALIZERS

        normalize = blend.get("normalize", "rank")
        if normalize not in NORMALIZERS:
            raise ValueError(f"search.blend.normalize must be one of {', '.join(NORMALIZERS)}, but got {normalize!r}")
    for key, lo_ok, hi_ok in (("ratio", 0.0, 1.0), ("p", 0.0, None), ("q", 0.0, None), ("lr", 0.0, None)):
        if not _searched(space, key):
            continue
        low, high, log = _bounds(space, key)
        if not (lo_ok <= low <= high) or (hi_ok is not None and high >= hi_ok) or (log and low <= 0):
            rule = f"{lo_ok:g} <= low <= high" + (f" < {hi_ok:g}" if hi_ok is not None else "")
            raise ValueError(f"search.{key} must have {rule}{' and low > 0 (log scale)' if log else ''}, "
                             f"but got low={low}, high={high}")


def check_global_choice(space: Mapping, prune: Mapping) -> None:
    """With ``global`` among the schedules, the trials' fixed prune settings (``prune``: the
    PruneConfig fields a trial starts from) must let it run: a method that plans with the
    criterion's scores, and a ratio range its per-unit floor allows."""
    if "global" not in (space.get("schedules") or []):
        return
    method = prune.get("method", "layer_by_layer")
    if method not in _GLOBAL_METHODS:
        raise ValueError(f"search.schedules must not include global with prune.method={method} (only "
                         f"{' and '.join(_GLOBAL_METHODS)} plan with the criterion's scores), but got "
                         f"{list(space['schedules'])}")
    min_keep = float(prune.get("global_min_keep", 0.1))
    if _searched(space, "ratio") and prune.get("target_flops_reduction") is None:
        high = _bounds(space, "ratio")[1]
        if high > 1 - min_keep:
            raise ValueError(f"search.ratio.high must be <= 1 - prune.global_min_keep = {1 - min_keep:g} with "
                             f"global in search.schedules, but got {high}")


class SearchSpace:
    """The define-by-run function for ``OptunaSearch(space=...)``; a class so that Tune can
    pickle it into the searcher's checkpoint (a closure cannot be pickled)."""

    def __init__(self, space: Mapping, n_units: int, criteria: list[str], candidates: list[str] | Mapping | None = None):
        self.space = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in dict(space).items()}
        self.n_units = n_units
        # The blended criterion's candidates, one factor each: a list, or a layerwise layout (search.blend.layout).
        self.candidates = dict(candidates) if isinstance(candidates, Mapping) else list(candidates or [])
        # criteria=null: every registered criterion (blended only when it has candidates)
        self.pool = list(self.space["criteria"] or [c for c in criteria if c != "blended" or self.candidates])
        self.schedules = list(self.space["schedules"])
        if "blended" in self.pool and not self.candidates:
            raise ValueError("search.criteria includes 'blended' but no candidates were given")

    def __call__(self, trial) -> dict | None:
        criterion = trial.suggest_categorical("criterion", self.pool)
        constants = {"criterion": "car", "method": GREEDY_CAR} if criterion == GREEDY_CAR else None
        if criterion == "blended":
            from search.blend.layout import factor_keys

            lo, hi, _ = _bounds(self.space["blend"], "factor")
            for key in factor_keys(self.candidates):
                trial.suggest_float(key, lo, hi)
        if _searched(self.space, "ratio"):
            schedule = trial.suggest_categorical("schedule", self.schedules)
            low, high, _ = _bounds(self.space, "ratio")
            if schedule in ("uniform", "global"):  # global: the share of all filters, one ranking
                trial.suggest_float("ratio", low, high)
            elif schedule in ("differential", "differential_depth"):
                ratio_low = trial.suggest_float("ratio_low", low, high)
                trial.suggest_float("ratio_high", ratio_low, high)
            else:
                for i in range(self.n_units):
                    trial.suggest_float(f"ratio_{i}", low, high)
        for key in ("p", "q", "lr"):
            if _searched(self.space, key):
                lo, hi, log = _bounds(self.space, key)
                trial.suggest_float(key, lo, hi, log=log)
        return constants  # Ray Tune's OptunaSearch lays these over the suggested values


def define_space(space: Mapping, n_units: int, criteria: list[str], candidates: list[str] | Mapping | None = None) -> SearchSpace:
    """The define-by-run function for ``OptunaSearch(space=...)``."""
    return SearchSpace(space, n_units, criteria, candidates)
