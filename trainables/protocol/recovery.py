"""Speed of recovery as numbers: steps to get back within delta, and the normalised area
under the recovery curve. Pure functions of (step, val acc) points; no torch.

A recovery curve starts at the *damage* point (the evaluation right after pruning, at step
s0) and follows the evaluations of the fine-tuning after it. With ``pre`` the accuracy before
pruning, ``damage`` the accuracy after it and ``delta`` the tolerance (accuracy units):

- ``steps_to_recover`` = min over points with acc >= pre - delta of (step - s0); 0 when the
  damage itself is within delta; None when no point gets there ("never").
- ``recovery_auc`` = (1 / (s_last - s0)) x trapezoid integral over steps of
  r(acc) = clip((acc - damage) / (pre - damage), 0, 1): the time-weighted mean share of the
  lost accuracy won back (0: stayed at the damage, 1: back at ``pre`` at once). r = 1 for
  every point when pre <= damage (nothing was lost); with a single point (no fine-tuning
  steps) the AUC is that point's r.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.integrate import trapezoid

__all__ = ["recovery_auc", "run_recovery", "stage_recovery", "steps_to_recover"]

# Curve phases that start a recovery: a pruning step's damage, or scratch's fresh init.
_START_PHASES = ("damage", "init")


def steps_to_recover(steps: Sequence[int], accs: Sequence[float], target: float) -> int | None:
    """Steps after ``steps[0]`` until the first point with acc >= ``target``; None: never."""
    for s, a in zip(steps, accs, strict=True):
        if a >= target:
            return int(s - steps[0])
    return None


def recovery_auc(steps: Sequence[int], accs: Sequence[float], pre: float, damage: float) -> float:
    """Normalised area under the recovery curve, in [0, 1] (see the module docstring)."""
    if len(steps) == 0:
        raise ValueError("recovery_auc needs at least one point, but got none")
    if pre <= damage:
        return 1.0
    r = np.clip((np.asarray(accs, dtype=float) - damage) / (pre - damage), 0.0, 1.0)
    span = steps[-1] - steps[0]
    if span <= 0:
        return float(r[-1])
    return float(trapezoid(r, np.asarray(steps, dtype=float)) / span)


def stage_recovery(points: Sequence[dict], pre: float, delta: float) -> dict:
    """Recovery of one stage: ``points`` are curve points, the damage point first.

    Returns ``steps_to_recover`` (target pre - delta) and ``recovery_auc`` (damage = the
    first point's accuracy).
    """
    steps = [p["step"] for p in points]
    accs = [p["val_acc"] for p in points]
    return {"steps_to_recover": steps_to_recover(steps, accs, pre - delta),
            "recovery_auc": recovery_auc(steps, accs, pre, accs[0])}


def run_recovery(curve: Sequence[dict], base: float, delta: float) -> dict:
    """Run-level recovery against ``base`` (the base model's val accuracy).

    ``steps_to_recover`` counts from the last damage (or scratch ``init``) point through the
    end of the curve. ``recovery_auc`` covers the curve from the first such point to the
    end, with damage = the lowest accuracy on that stretch (the run's deepest drop), so 0 is
    "stayed at its worst" and 1 "never below base". Without such a point (``control``) both
    start at the base point: steps_to_recover 0, AUC 1 unless the fine-tuning dips below base.
    """
    starts = [i for i, p in enumerate(curve) if p["phase"] in _START_PHASES]
    if not starts:
        starts = [next((i for i, p in enumerate(curve) if p["phase"] == "base"), 0)]
    last = curve[starts[-1]:]
    whole = curve[starts[0]:]
    accs = [p["val_acc"] for p in whole]
    return {
        "steps_to_recover": steps_to_recover([p["step"] for p in last], [p["val_acc"] for p in last], base - delta),
        "recovery_auc": recovery_auc([p["step"] for p in whole], accs, base, min(accs)),
    }
