"""The search space: a pure define-by-run Optuna function, no computation inside.

``define_space(space, n_units)`` returns the function OptunaSearch calls with an
``optuna.Trial``: it suggests the criterion, the ratio schedule and its ratios (one for
uniform, low/high for differential, one per unit for per_layer), p, q and the learning
rate, with bounds from ``conf/search/*.yaml``. The values it suggests become the trial's
config, which ``trainables.ray_trainable.trial_configs`` turns into protocol settings.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["SearchSpace", "define_space", "check_space"]

_SCHEDULES = ("uniform", "differential", "per_layer")


def _bounds(space: Mapping, key: str) -> tuple[float, float, bool]:
    spec = space[key]
    return float(spec["low"]), float(spec["high"]), bool(spec.get("log", False))


def check_space(space: Mapping, criteria: list[str]) -> None:
    """One-line errors for a bad space, before any trial starts."""
    unknown = [c for c in space["criteria"] or [] if c not in criteria]
    if unknown:
        raise ValueError(f"search.criteria: unknown criterion '{unknown[0]}'; valid: {', '.join(criteria)}")
    bad = [s for s in space["schedules"] if s not in _SCHEDULES]
    if not space["schedules"] or bad:
        raise ValueError(f"search.schedules={list(space['schedules'])} must be a non-empty subset of {', '.join(_SCHEDULES)}")
    for key, lo_ok, hi_ok in (("ratio", 0.0, 1.0), ("p", 0.0, None), ("q", 0.0, None), ("lr", 0.0, None)):
        low, high, log = _bounds(space, key)
        if not (lo_ok <= low <= high) or (hi_ok is not None and high >= hi_ok) or (log and low <= 0):
            allowed = f"[{lo_ok}, {hi_ok})" if hi_ok is not None else f">= {lo_ok}"
            raise ValueError(f"search.{key}: low={low}, high={high} must satisfy low <= high, both {allowed}{', low > 0 for log' if log else ''}")


class SearchSpace:
    """The define-by-run function for ``OptunaSearch(space=...)``; a class so that Tune can
    pickle it into the searcher's checkpoint (a closure cannot be pickled)."""

    def __init__(self, space: Mapping, n_units: int, criteria: list[str]):
        self.space = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in dict(space).items()}
        self.n_units = n_units
        self.pool = list(self.space["criteria"] or criteria)
        self.schedules = list(self.space["schedules"])

    def __call__(self, trial) -> dict | None:
        trial.suggest_categorical("criterion", self.pool)
        schedule = trial.suggest_categorical("schedule", self.schedules)
        low, high, _ = _bounds(self.space, "ratio")
        if schedule == "uniform":
            trial.suggest_float("ratio", low, high)
        elif schedule == "differential":
            ratio_low = trial.suggest_float("ratio_low", low, high)
            trial.suggest_float("ratio_high", ratio_low, high)
        else:
            for i in range(self.n_units):
                trial.suggest_float(f"ratio_{i}", low, high)
        for key in ("p", "q", "lr"):
            lo, hi, log = _bounds(self.space, key)
            trial.suggest_float(key, lo, hi, log=log)
        return None


def define_space(space: Mapping, n_units: int, criteria: list[str]) -> SearchSpace:
    """The define-by-run function for ``OptunaSearch(space=...)``."""
    return SearchSpace(space, n_units, criteria)
