"""The answer of a plasticity study: ``runs.parquet``, its statistics, its figures, ``report.md``.

Everything here reads ``runs.parquet`` (one row per run, :data:`RUN_COLUMNS`) and nothing else:
results are written once by ``search.study`` and read many times (``python -m
search.study_report <folder>`` re-renders the report of a finished study). No Ray, Optuna or
MLflow here.

The paper's question (Mittal et al. 2019, "Studying the plasticity in deep convolutional neural
networks using random pruning"): after fine-tuning, is any criterion really better than random?
Answered per arm and pruning level with

* the mean and a t confidence interval over seeds (:func:`summarize`);
* a paired comparison of every criterion against ``random`` (paired by seed: the same seed
  gives both runs the same fine-tuning batches): mean difference, its CI and the p-value of
  ``scipy.stats.ttest_rel`` (:func:`paired_vs_random`);
* an equivalence reading, because "not significantly different" is not "equivalent": two
  one-sided paired t tests (TOST) against a stated margin, and the one-sided non-inferiority
  test of random (is random worse than the criterion by less than the margin?).

Conventions: scores are stored as fractions in [0, 1] (tables and figures show percent,
differences in points; ``study.margin`` is typed in points and stored as a fraction, 0.01 =
one point); ``prune_ratio`` = share of filters removed per unit; ``flops_kept`` = share of
the unpruned model's FLOPs kept (FLOPs = 2 x MACs); ``fraction`` = share of the training set
used for fine-tuning; ``budget`` = multiplier of the fine-tuning epochs p and q (q only with ``study.budget_scales=q``).

With several budgets (``study.budgets``) the report adds, per level, the difference to random
as a function of the budget, the TOST verdict per budget and the smallest budget at which a
criterion is shown equivalent (:func:`catch_up`), and ``difference_vs_budget.png``. With
several base models (``study.base_seeds``) pairs are formed within a base and pooled over bases
(:func:`nested_mean_ci`, :func:`paired_vs_random`).
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from search.pareto import table_from_rows, write_table_atomic

__all__ = [
    "ARM_CONTROL",
    "ARM_SCRATCH",
    "FIGURES",
    "METRICS",
    "RUN_COLUMNS",
    "catch_up",
    "mean_ci",
    "nested_mean_ci",
    "paired_vs_random",
    "plot_difference_vs_budget",
    "read_runs",
    "seeds_for_power",
    "study_meta",
    "summarize",
    "tost_paired",
    "write_report",
    "write_runs",
]

Row = dict[str, Any]

ARM_CONTROL = "control"  # the unpruned base fine-tuned with the same budget (prune.method=control)
ARM_SCRATCH = "scratch"  # the pruned architecture re-initialised and trained (prune.method=scratch)
REFERENCE = "random"  # the arm every criterion is compared with
_BASELINE_ARMS = (ARM_CONTROL, ARM_SCRATCH)  # arms without a criterion: never compared with random

METRICS = ("final_test_acc", "final_val_acc")
"""Columns the statistics may be computed on (``study.metric``)."""

FIGURES = ("recovery_curves.png", "accuracy_vs_ratio.png", "damage_vs_recovery.png", "data_efficiency.png",
           "difference_vs_budget.png")

RUN_COLUMNS: pa.Schema = pa.schema([
    pa.field("run_id", pa.string(), nullable=False),  # the Tune trial id
    pa.field("status", pa.string(), nullable=False),  # COMPLETED | FAILED | INCOMPLETE (no final record)
    pa.field("cell", pa.int64(), nullable=False),  # index of the grid cell (search.study.grid_cells order)
    pa.field("arm", pa.string(), nullable=False),  # a criterion name, or control / scratch
    pa.field("criterion", pa.string()),  # the criterion that ranked the filters; null for control / scratch
    pa.field("method", pa.string()),  # prune.method: layer_by_layer | one_shot | iterative | control | scratch
    pa.field("schedule", pa.string()),  # ratio schedule
    pa.field("prune_ratio", pa.float64()),  # share of filters removed per unit (0: control); null in a FLOPs-target study
    pa.field("target_flops_reduction", pa.float64()),  # the cell's FLOPs target; null in a ratio study
    pa.field("seed", pa.int64(), nullable=False),  # seeds scoring batches, fine-tuning order and `random`
    pa.field("fraction", pa.float64(), nullable=False),  # share of the training set used for fine-tuning
    pa.field("base_seed", pa.int64()),  # the base model's seed (study.base_seeds): runs are paired within a base
    pa.field("budget", pa.float64(), nullable=False),  # fine-tuning budget multiplier: p and q are budget x the config's
    pa.field("optimizer_steps", pa.int64()),  # SGD steps the run took in all (its budget in steps)
    pa.field("p", pa.float64()),  # fine-tuning epochs after each unit / step
    pa.field("q", pa.float64()),  # final fine-tuning epochs
    pa.field("lr", pa.float64()),
    pa.field("ratios", pa.list_(pa.float64())),  # applied ratio per unit, input to output
    pa.field("base_val_acc", pa.float64()),  # the unpruned base model, all of val
    pa.field("final_val_acc", pa.float64()),  # after the protocol, all of val
    pa.field("final_test_acc", pa.float64()),  # after the protocol, the test split (read once, at the end)
    pa.field("flops_before", pa.int64()),
    pa.field("flops_after", pa.int64()),
    pa.field("flops_kept", pa.float64()),  # share of FLOPs kept: flops_after / flops_before
    pa.field("params_before", pa.int64()),
    pa.field("params_after", pa.int64()),
    pa.field("n_steps", pa.int64()),  # pruning steps (units for layer_by_layer, 1 for one_shot)
    pa.field("mean_damage", pa.float64()),  # mean over pruning steps of (pre-prune - right-after-prune) val acc
    pa.field("steps_to_recover", pa.int64()),  # steps after the last pruning until >= base - recovery_delta; null = never
    pa.field("recovery_auc", pa.float64()),  # share of the lost accuracy won back, time-weighted, in [0, 1] (trainables.protocol.recovery)
    pa.field("recovery_delta", pa.float64()),  # the tolerance of steps_to_recover (fraction; 0.01 = 1 point)
    pa.field("metrics_source", pa.string()),  # record (the protocol measured them) | curve (derived here)
    pa.field("steps_json", pa.string()),  # per pruning step: step, units, pre/damage/recovered acc, recovery
    pa.field("curve_step", pa.list_(pa.int64())),  # the recovery curve: optimiser step of each evaluation ...
    pa.field("curve_val_acc", pa.list_(pa.float64())),  # ... its val acc (eval subset) ...
    pa.field("curve_phase", pa.list_(pa.string())),  # ... and its phase (base | damage | recovery | final_finetune)
    pa.field("mlflow_run_id", pa.string()),
    pa.field("wall_s", pa.float64()),  # seconds of the protocol
    pa.field("config_json", pa.string()),  # the cell as Tune ran it
])
"""Schema of ``runs.parquet``; the study's settings are in the schema metadata (:func:`study_meta`)."""

_META_KEY = b"study"


# ---- runs.parquet ------------------------------------------------------------------------------


def write_runs(rows: list[Row], path: str | os.PathLike[str], meta: dict[str, Any]) -> None:
    """Write ``rows`` with schema :data:`RUN_COLUMNS` and ``meta`` (JSON) in the schema metadata.

    A key outside the schema or a missing required value is an error (the file never silently
    loses data); the write is atomic (temporary file, then ``os.replace``).
    """
    known = set(RUN_COLUMNS.names)
    required = [f.name for f in RUN_COLUMNS if not f.nullable]
    for i, row in enumerate(rows):
        unknown, missing = sorted(set(row) - known), [k for k in required if row.get(k) is None]
        if unknown or missing:
            raise ValueError(f"run row {i} (run_id={row.get('run_id')!r}) has unknown keys {unknown} and missing "
                             f"required keys {missing}; add a field to RUN_COLUMNS or drop the key")
    schema = RUN_COLUMNS.with_metadata({_META_KEY: json.dumps(meta, default=str).encode()})
    write_table_atomic(table_from_rows(rows, schema, what="runs"), path)


def read_runs(path: str | os.PathLike[str]) -> list[Row]:
    """Rows of a ``runs.parquet`` (nulls as None)."""
    return pq.read_table(path).to_pylist()


def study_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The study settings stored with ``runs.parquet`` (model, data, margin, confidence, ...)."""
    raw = (pq.read_schema(path).metadata or {}).get(_META_KEY)
    return json.loads(raw) if raw else {}


# ---- statistics ----------------------------------------------------------------------------------


def _finite(values: Sequence[Any]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float | None, float | None]:
    """``(mean, low, high)``: the mean and its two-sided t confidence interval (None for n < 2)."""
    import numpy as np
    from scipy import stats

    x = np.asarray(_finite(values), dtype=float)
    if len(x) == 0:
        return math.nan, None, None
    mean = float(x.mean())
    if len(x) < 2:
        return mean, None, None
    sem = float(stats.sem(x))
    if sem == 0.0:
        return mean, mean, mean
    low, high = stats.t.interval(confidence, len(x) - 1, loc=mean, scale=sem)
    return mean, float(low), float(high)


def tost_paired(a: Sequence[float], b: Sequence[float], margin: float, alpha: float = 0.05) -> dict[str, Any]:
    """Equivalence of paired samples within ``margin`` by two one-sided t tests (Schuirmann's TOST).

    H0: |mean(a - b)| >= margin; ``equivalent`` when both one-sided tests reject at ``alpha``
    (``p`` is the larger of their p-values), i.e. when the (1 - 2 alpha) CI of the mean
    difference lies inside (-margin, margin).
    """
    from scipy import stats

    d = [x - y for x, y in zip(a, b, strict=True)]
    if len(d) < 2:
        return {"p": math.nan, "equivalent": False}
    lower = stats.ttest_1samp(d, -margin, alternative="greater").pvalue
    upper = stats.ttest_1samp(d, margin, alternative="less").pvalue
    p = float(max(lower, upper))
    return {"p": p, "equivalent": bool(p < alpha)}


def _level(row: Row) -> float | None:
    """The row's pruning level: its prune ratio, or its FLOPs target in a FLOPs-target study
    (``ratio``: the column's name in runs.parquet files written before ``prune_ratio``)."""
    if row.get("target_flops_reduction") is not None:
        return row["target_flops_reduction"]
    return row.get("prune_ratio", row.get("ratio"))


def _budget(row: Row) -> float:
    return 1.0 if row.get("budget") is None else float(row["budget"])  # files from before study.budgets: 1x


def _key(row: Row) -> tuple:
    return (row["arm"], row.get("method"), row["fraction"], _level(row), _budget(row))


def _done(rows: list[Row], metric: str) -> list[Row]:
    return [r for r in rows if r["status"] == "COMPLETED" and r.get(metric) is not None and math.isfinite(r[metric])]


def _arm_order(arm: str) -> tuple:
    # random first (the reference), then the criteria by name, then the baselines.
    return (arm != REFERENCE, arm in _BASELINE_ARMS, arm)


def _sort_key(key: tuple) -> tuple:
    arm, method, fraction, level, budget = key
    return (-1.0 if level is None else level, -fraction, str(method), _arm_order(arm), budget)


def _by_base(rows: list[Row], metric: str) -> dict[Any, list[float]]:
    out: dict[Any, list[float]] = defaultdict(list)
    for r in rows:
        out[r.get("base_seed")].append(r[metric])
    return out


def nested_mean_ci(by_base: dict[Any, Sequence[float]], confidence: float = 0.95) -> tuple[float, float | None, float | None]:
    """Mean and t CI of values grouped by base model (seeds within bases).

    One base: the plain t interval over its values (:func:`mean_ci`). Several: the mean of the
    per-base means with the t interval over those means (B - 1 degrees of freedom). In a
    balanced nested design (every base has the same seeds) the spread of the base means holds
    both the base-to-base and the seed-to-seed variance, so this interval accounts for both
    levels; it is the random-base-effect answer ("another base model would give"), and with
    few bases it is wide because the base-to-base variance is estimated from few bases.
    """
    groups = [list(v) for v in by_base.values() if _finite(v)]
    if len(groups) <= 1:
        return mean_ci(groups[0] if groups else [], confidence)
    return mean_ci([sum(_finite(g)) / len(_finite(g)) for g in groups], confidence)


def seeds_for_power(diff: float, sd: float, alpha: float = 0.05, power: float = 0.8, limit: int = 10_000) -> int | None:
    """Smallest n (>= 2) of paired runs whose two-sided paired t test at ``alpha`` detects a true
    mean difference ``diff`` with probability >= ``power`` when the differences have SD ``sd``
    (noncentral t; the observed difference and SD taken as the truth). None: not within
    ``limit`` (a zero difference never is); 2 when the differences do not vary."""
    from scipy import stats

    if not (math.isfinite(diff) and math.isfinite(sd)) or diff == 0:
        return None
    if sd == 0:
        return 2
    effect = abs(diff) / sd
    for n in range(2, limit + 1):
        df, nc = n - 1, effect * math.sqrt(n)
        crit = stats.t.ppf(1 - alpha / 2, df)
        if stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc) >= power:
            return n
    return None


def summarize(rows: list[Row], metric: str = "final_test_acc", confidence: float = 0.95) -> list[Row]:
    """Per (arm, method, fraction, level, budget): n, mean and CI of ``metric`` over seeds (over
    base models' means with several bases: :func:`nested_mean_ci`), and the means of the
    plasticity metrics (damage, steps to recover, recovery AUC; the control's AUC is None:
    nothing was lost, so no share of a loss was won back)."""
    groups: dict[tuple, list[Row]] = defaultdict(list)
    for r in _done(rows, metric):
        groups[_key(r)].append(r)
    out = []
    for key in sorted(groups, key=_sort_key):
        g = groups[key]
        bases = _by_base(g, metric)
        mean, low, high = nested_mean_ci(bases, confidence)
        never = sum(r.get("steps_to_recover") is None for r in g)
        out.append({
            "arm": key[0], "method": key[1], "fraction": key[2], "level": key[3], "budget": key[4], "n": len(g),
            "n_bases": len(bases), "mean": mean, "ci_low": low, "ci_high": high,
            "mean_damage": _mean([r.get("mean_damage") for r in g]),
            "steps_to_recover": _mean([r.get("steps_to_recover") for r in g]), "never_recovered": never,
            "recovery_auc": None if key[0] == ARM_CONTROL else _mean([r.get("recovery_auc") for r in g]),
            "flops_kept": _mean([r.get("flops_kept", r.get("flops_ratio")) for r in g]),
            "optimizer_steps": _mean([r.get("optimizer_steps") for r in g]),
        })
    return out


def _mean(values: Sequence[Any]) -> float | None:
    x = _finite(values)
    return sum(x) / len(x) if x else None


def paired_vs_random(rows: list[Row], metric: str = "final_test_acc", confidence: float = 0.95,
                     margin: float = 0.01) -> list[Row]:
    """Every criterion against ``random`` at the same method, fraction, level and budget, paired
    by base model and seed (the same seed gives both runs the same fine-tuning batches).

    One base model: ``diff`` = mean(criterion - random) with its t CI and the two-sided ``p`` of
    ``scipy.stats.ttest_rel``. Several: the paired differences are averaged within each base
    and the test, CI, TOST and non-inferiority run on those per-base means (B - 1 degrees of
    freedom: the random-base answer of :func:`nested_mean_ci`); ``per_base`` lists them.
    ``q`` is the Benjamini-Hochberg adjusted p over all comparisons
    (``scipy.stats.false_discovery_control``). ``tost_p`` / ``equivalent``: TOST within
    ``margin`` (a fraction: 0.01 = 1 point) at alpha = 1 - confidence. ``noninferior_p`` /
    ``random_noninferior``: the one-sided test of H0 "random is worse than the criterion by
    ``margin`` or more". ``sd_within``: SD of the seed-level differences around their base's
    mean; ``sd_between``: the base-to-base SD of the true differences (method of moments, 0 when
    the base means vary no more than seed noise explains; None with one base). ``power_n`` /
    ``power_unit``: how many seeds (one base) or bases (several, with this many seeds each) the
    observed difference needs for 80% power at alpha (:func:`seeds_for_power`). With several
    bases, ``within_*`` answer for these base models only (base as a fixed effect: the pooled
    within-base SD, N - B degrees of freedom): ``within_ci_low`` / ``within_ci_high``,
    ``within_p``, ``within_equivalent`` (TOST at the same margin).
    """
    from scipy import stats

    alpha = 1.0 - confidence
    by_key: dict[tuple, dict[tuple, float]] = defaultdict(dict)
    for r in _done(rows, metric):
        by_key[_key(r)][(r.get("base_seed"), r["seed"])] = r[metric]
    out = []
    for key in sorted(by_key, key=_sort_key):
        arm, method, fraction, level, budget = key
        ref = by_key.get((REFERENCE, method, fraction, level, budget))
        if arm == REFERENCE or arm in _BASELINE_ARMS or ref is None:
            continue
        pairs = sorted(set(by_key[key]) & set(ref), key=str)
        a, b = [by_key[key][k] for k in pairs], [ref[k] for k in pairs]
        per_base: dict[Any, list[float]] = defaultdict(list)
        for k, x, y in zip(pairs, a, b, strict=True):
            per_base[k[0]].append(x - y)
        row = {"arm": arm, "method": method, "fraction": fraction, "level": level, "budget": budget,
               "n_pairs": len(pairs), "n_bases": len(per_base), "criterion_mean": _mean(a), "random_mean": _mean(b),
               "diff": _mean([x - y for x, y in zip(a, b, strict=True)]), "per_base": [_mean(v) for v in per_base.values()],
               "ci_low": None, "ci_high": None, "p": math.nan, "tost_p": math.nan, "equivalent": False,
               "noninferior_p": math.nan, "random_noninferior": False, "margin": margin, "sd_within": None,
               "sd_between": None, "power_n": None, "power_unit": "seeds" if len(per_base) <= 1 else "bases",
               "within_ci_low": None, "within_ci_high": None, "within_p": math.nan, "within_equivalent": False}
        if len(per_base) > 1:
            row.update(_compare(row["per_base"], [0.0] * len(per_base), confidence, margin))
            row["diff"] = _mean(row["per_base"])  # equal weight per base, as the test has it
        elif len(pairs) >= 2:
            row.update(_compare(a, b, confidence, margin))
        _spread(row, per_base, alpha)
        if len(per_base) > 1:
            row.update(_within_bases(row, per_base, confidence, margin))
        out.append(row)
    finite = [i for i, r in enumerate(out) if math.isfinite(r["p"])]
    adjusted = stats.false_discovery_control([out[i]["p"] for i in finite]) if finite else []
    for r in out:
        r["q"] = math.nan
    for i, q in zip(finite, adjusted, strict=True):
        out[i]["q"] = float(q)
    return out


def _compare(a: Sequence[float], b: Sequence[float], confidence: float, margin: float) -> Row:
    """Paired t test (``ttest_rel``), its CI, TOST within ``margin`` and random's non-inferiority."""
    import numpy as np
    from scipy import stats

    alpha = 1.0 - confidence
    test = stats.ttest_rel(a, b)
    d = np.subtract(a, b)
    out: Row = {"p": float(test.pvalue)}
    if np.ptp(d) == 0:  # no spread: the CI is the point itself (scipy's would be NaN)
        out["ci_low"] = out["ci_high"] = float(d[0])
    else:
        ci = test.confidence_interval(confidence_level=confidence)
        out["ci_low"], out["ci_high"] = float(ci.low), float(ci.high)
    tost = tost_paired(a, b, margin, alpha)
    out["tost_p"], out["equivalent"] = tost["p"], tost["equivalent"]
    noninf = float(stats.ttest_1samp(d, margin, alternative="less").pvalue)
    out["noninferior_p"], out["random_noninferior"] = noninf, bool(noninf < alpha)
    return out


def _within_bases(row: Row, per_base: dict[Any, list[float]], confidence: float, margin: float) -> Row:
    """The comparison for these base models only: the mean of the per-base means with the
    standard error from the pooled within-base SD (N - B degrees of freedom); empty when the
    differences do not vary within a base or no base has two pairs."""
    from scipy import stats

    sizes = [len(v) for v in per_base.values()]
    df, sd = sum(sizes) - len(sizes), row["sd_within"]
    if df < 1 or not sd:
        return {}
    diff = _mean(row["per_base"])
    se = sd * math.sqrt(sum(1 / n for n in sizes)) / len(sizes)  # Var(mean of B means) = sd^2 sum(1/n_b) / B^2
    half = float(stats.t.ppf(0.5 + confidence / 2, df)) * se
    alpha = 1.0 - confidence
    tost = max(float(stats.t.sf((diff + margin) / se, df)), float(stats.t.cdf((diff - margin) / se, df)))
    return {"within_ci_low": diff - half, "within_ci_high": diff + half,
            "within_p": float(2 * stats.t.sf(abs(diff) / se, df)), "within_equivalent": bool(tost < alpha)}


def _spread(row: Row, per_base: dict[Any, list[float]], alpha: float) -> None:
    """``sd_within``, ``sd_between`` and ``power_n`` of a comparison (see :func:`paired_vs_random`);
    each left None where the runs cannot estimate it (one pair per base has no within-base SD)."""
    import numpy as np

    groups = [np.asarray(v, dtype=float) for v in per_base.values()]
    n_total, n_bases = sum(len(g) for g in groups), len(groups)
    within = None
    if n_total - n_bases >= 1:
        within = math.sqrt(sum(float(((g - g.mean()) ** 2).sum()) for g in groups) / (n_total - n_bases))
        row["sd_within"] = within
    if n_bases == 1:
        if within is not None:
            row["power_n"], row["power_tested"] = seeds_for_power(row["diff"], within, alpha), True
        return
    means = np.array([g.mean() for g in groups])
    row["power_n"] = seeds_for_power(row["diff"], float(means.std(ddof=1)), alpha)  # in bases of as many seeds
    row["power_tested"] = True
    if within is not None:
        per = n_total / n_bases  # seeds per base (balanced design)
        row["sd_between"] = math.sqrt(max(0.0, float(means.var(ddof=1)) - within ** 2 / per))


# ---- figures --------------------------------------------------------------------------------------


def _figure(n_panels: int, width: float = 5.0, height: float = 3.6):
    # The object-oriented API with an Agg canvas: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * n_panels, height), dpi=130)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n_panels, squeeze=False)[0]
    return fig, list(axes)


def _colours(arms: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(arms) <= 10 else "tab20"]
    return {a: cmap(i % cmap.N) for i, a in enumerate(sorted(arms, key=_arm_order))}


def _level_name(meta: dict, level: float | None) -> str:
    if level is None:
        return "unpruned"
    return f"FLOPs -{100 * level:.0f}%" if meta.get("level") == "target_flops_reduction" else f"ratio {level:g}"


def _label(arm: str, method: str | None, methods: set) -> str:
    return arm if len(methods) <= 1 or arm in _BASELINE_ARMS else f"{arm} ({method})"


def _main_fraction(rows: list[Row]) -> float:
    return max(r["fraction"] for r in rows)


def plot_recovery_curves(rows: list[Row], path: Path, meta: dict) -> None:
    """Val accuracy along fine-tuning, one panel per level, one line per arm: the mean over
    seeds and a band from the lowest to the highest seed (at the largest data fraction)."""
    import numpy as np

    done = [r for r in rows if r["status"] == "COMPLETED" and r.get("curve_step")]
    fraction = _main_fraction(done) if done else 1.0
    done = [r for r in done if r["fraction"] == fraction]
    levels = sorted({_level(r) for r in done if r["arm"] != ARM_CONTROL}, key=lambda v: -1 if v is None else v) or [None]
    methods = {r.get("method") for r in done if r["arm"] not in _BASELINE_ARMS}
    colour = _colours({r["arm"] for r in done})
    fig, axes = _figure(len(levels))
    for ax, level in zip(axes, levels, strict=True):
        groups: dict[tuple, list[Row]] = defaultdict(list)
        for r in done:
            if _level(r) == level or r["arm"] == ARM_CONTROL:  # the control is drawn in every panel
                groups[(r["arm"], r.get("method"))].append(r)
        for (arm, method), g in sorted(groups.items(), key=lambda kv: _arm_order(kv[0][0])):
            # Seeds of one cell evaluate at the same steps; align by position, over the shortest curve.
            n = min(len(r["curve_step"]) for r in g)
            steps = np.mean([r["curve_step"][:n] for r in g], axis=0)
            acc = 100 * np.array([r["curve_val_acc"][:n] for r in g])
            style = {"ls": "--"} if arm == ARM_CONTROL else {}
            ax.plot(steps, acc.mean(axis=0), color=colour[arm], lw=1.4, label=_label(arm, method, methods), **style)
            if len(g) > 1:
                ax.fill_between(steps, acc.min(axis=0), acc.max(axis=0), color=colour[arm], alpha=0.18, lw=0)
        ax.set_title(_level_name(meta, level))
        ax.set_xlabel("fine-tuning step (optimiser steps)")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel(f"val {_score_name(meta)} (%, eval subset)")
    _legend(fig, axes)
    fig.suptitle(f"Recovery curves: mean over seeds, band = min..max (data fraction {fraction:g})", fontsize=10)
    fig.savefig(path, bbox_inches="tight")


def _legend(fig, axes) -> None:
    handles, labels = {}, []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in handles:
                handles[lab] = h
                labels.append(lab)
    if handles:
        axes[-1].legend([handles[lab] for lab in labels], labels, loc="center left", bbox_to_anchor=(1.01, 0.5),
                        fontsize=8, frameon=False)


def _possible(low: float, high: float) -> tuple[float, float]:
    """A CI's ends as drawn: every study score (accuracy, mAP, mIoU) is a share in [0, 1], and
    a t-CI over 2-3 seeds can reach far past both ends (the tables keep the raw interval)."""
    return max(low, 0.0), min(high, 1.0)


def _error_bars(pts: list[Row]) -> list[list[float]]:
    """``errorbar``'s yerr in percentage points: below and above each mean, to its CI's ends as
    drawn (``_possible``); 0 where a row has no CI (one seed)."""
    ends = [_possible(s["ci_low"], s["ci_high"]) if s["ci_low"] is not None else (s["mean"], s["mean"]) for s in pts]
    return [[100 * (s["mean"] - lo) for s, (lo, _) in zip(pts, ends, strict=True)],
            [100 * (hi - s["mean"]) for s, (_, hi) in zip(pts, ends, strict=True)]]


def plot_accuracy_vs_level(summary: list[Row], path: Path, meta: dict) -> None:
    """The metric (mean, t CI over seeds) against the pruning level, one line per arm; the
    control as a horizontal band (at the largest data fraction)."""
    fraction = max((s["fraction"] for s in summary), default=1.0)
    rows = [s for s in summary if s["fraction"] == fraction]
    methods = {s["method"] for s in rows if s["arm"] not in _BASELINE_ARMS}
    colour = _colours({s["arm"] for s in rows})
    fig, (ax,) = _figure(1, width=7.0, height=4.5)
    lines: dict[tuple, list[Row]] = defaultdict(list)
    for s in rows:
        lines[(s["arm"], s["method"])].append(s)
    offsets = _offsets(sorted(lines, key=lambda k: _arm_order(k[0])), rows)
    for (arm, method), pts in sorted(lines.items(), key=lambda kv: _arm_order(kv[0][0])):
        pts = sorted(pts, key=lambda s: -1 if s["level"] is None else s["level"])
        if arm == ARM_CONTROL:
            for s in pts:
                ax.axhline(100 * s["mean"], color=colour[arm], ls="--", lw=1.2, label=_label(arm, method, methods))
                if s["ci_low"] is not None:
                    ax.axhspan(*(100 * v for v in _possible(s["ci_low"], s["ci_high"])), color=colour[arm],
                               alpha=0.12, lw=0)
            continue
        xs = [s["level"] + offsets[(arm, method)] for s in pts]
        ys = [100 * s["mean"] for s in pts]
        ax.errorbar(xs, ys, yerr=_error_bars(pts), color=colour[arm], marker="o", ms=4, lw=1.3, capsize=3,
                    label=_label(arm, method, methods))
    ax.set_xticks(sorted({s["level"] for s in rows if s["level"] is not None and s["arm"] != ARM_CONTROL}))
    ax.set_xlabel("FLOPs reduction target" if meta.get("level") == "target_flops_reduction" else "pruning ratio (share of filters removed)")
    ax.set_ylabel(f"{_metric_name(meta)} (%)")
    ax.grid(True, alpha=0.3)
    ax.set_title(f"Final {_score_name(meta)}: mean and {100 * meta.get('confidence', 0.95):g}% t-CI over seeds "
                 f"(data fraction {fraction:g}; points offset sideways to stay apart)", fontsize=9)
    _legend(fig, [ax])
    fig.savefig(path, bbox_inches="tight")


def _offsets(keys: list[tuple], rows: list[Row]) -> dict[tuple, float]:
    """Small sideways offsets so that error bars at the same level do not hide each other."""
    levels = sorted({s["level"] for s in rows if s["level"] is not None and s["arm"] != ARM_CONTROL})
    gap = min((b - a for a, b in zip(levels, levels[1:], strict=False)), default=0.1) or 0.1
    pruned = [k for k in keys if k[0] != ARM_CONTROL]
    width = 0.12 * gap
    return {k: (i - (len(pruned) - 1) / 2) * width / max(1, len(pruned) - 1) if len(pruned) > 1 else 0.0
            for i, k in enumerate(pruned)}


def plot_damage_vs_recovery(rows: list[Row], path: Path, meta: dict) -> None:
    """Per run: accuracy lost right after pruning (mean over steps) against accuracy still lost
    after fine-tuning (base - final, both on all of val). Points below the diagonal recovered."""
    done = [r for r in rows if r["status"] == "COMPLETED" and r.get("mean_damage") is not None
            and r.get("final_val_acc") is not None and r.get("base_val_acc") is not None and r["arm"] != ARM_CONTROL]
    colour = _colours({r["arm"] for r in done})
    levels = sorted({_level(r) for r in done}, key=lambda v: -1 if v is None else v)
    markers = dict(zip(levels, "osD^v<>px", strict=False))
    fig, (ax,) = _figure(1, width=7.0, height=4.8)
    for r in sorted(done, key=lambda r: _arm_order(r["arm"])):
        ax.scatter(100 * r["mean_damage"], 100 * (r["base_val_acc"] - r["final_val_acc"]), color=colour[r["arm"]],
                   marker=markers.get(_level(r), "o"), s=30, alpha=0.85, edgecolors="none")
    if done:
        top = max(100 * max(r["mean_damage"] for r in done), 1.0)
        ax.plot([0, top], [0, top], color="grey", lw=0.8, ls=":")
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], ls="", marker="o", color=colour[a], label=a) for a in sorted(colour, key=_arm_order)]
    handles += [Line2D([], [], ls="", marker=markers[v], color="grey", label=_level_name(meta, v)) for v in levels]
    handles.append(Line2D([], [], color="grey", lw=0.8, ls=":", label="no recovery (y = x)"))
    ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xlabel(f"damage: val {_score_name(meta)} lost right after pruning (points, mean over steps)")
    ax.set_ylabel(f"val {_score_name(meta)} still lost after fine-tuning (points)")
    ax.grid(True, alpha=0.3)
    ax.set_title("Damage vs recovery, one point per run", fontsize=10)
    fig.savefig(path, bbox_inches="tight")


def plot_data_efficiency(summary: list[Row], path: Path, meta: dict) -> None:
    """The metric (mean, t CI over seeds) against the fine-tuning data fraction (log axis), one
    panel per level, one line per arm; same number of optimiser steps at every fraction."""
    levels = sorted({s["level"] for s in summary if s["arm"] != ARM_CONTROL}, key=lambda v: -1 if v is None else v) or [None]
    methods = {s["method"] for s in summary if s["arm"] not in _BASELINE_ARMS}
    colour = _colours({s["arm"] for s in summary})
    fig, axes = _figure(len(levels))
    for ax, level in zip(axes, levels, strict=True):
        lines: dict[tuple, list[Row]] = defaultdict(list)
        for s in summary:
            if s["level"] == level or s["arm"] == ARM_CONTROL:
                lines[(s["arm"], s["method"])].append(s)
        for (arm, method), pts in sorted(lines.items(), key=lambda kv: _arm_order(kv[0][0])):
            pts = sorted(pts, key=lambda s: s["fraction"])
            ax.errorbar([s["fraction"] for s in pts], [100 * s["mean"] for s in pts], yerr=_error_bars(pts), color=colour[arm],
                        marker="o", ms=4, lw=1.3, capsize=3, ls="--" if arm == ARM_CONTROL else "-",
                        label=_label(arm, method, methods))
        ax.set_xscale("log")
        ax.set_title(_level_name(meta, level))
        ax.set_xlabel("share of training data used for fine-tuning")
        ax.grid(True, alpha=0.3, which="both")
    axes[0].set_ylabel(f"{_metric_name(meta)} (%)")
    _legend(fig, axes)
    fig.suptitle(f"Data efficiency: mean and {100 * meta.get('confidence', 0.95):g}% t-CI over seeds, "
                 "equal optimiser steps at every fraction", fontsize=10)
    fig.savefig(path, bbox_inches="tight")


# ---- report.md -------------------------------------------------------------------------------------


def _score_name(meta: dict) -> str:
    """The task's headline score (trainables.protocol.tasks): accuracy, mAP@0.5 or mIoU."""
    return {"top1": "accuracy", "map50": "mAP@0.5", "miou": "mIoU"}.get(meta.get("score", "top1"), "accuracy")


def _metric_name(meta: dict) -> str:
    score = _score_name(meta)
    return {"final_test_acc": f"test {score}", "final_val_acc": f"val {score}"}.get(meta.get("metric", ""), score)


def _pct(v: Any, digits: int = 2) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{100 * v:.{digits}f}"


def _num(v: Any, fmt: str = ".3g") -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def _table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body])


def _shape(summary: list[Row], fractions: list[float]) -> dict[str, bool]:
    """Which optional columns the tables need: more than one method, data fraction or budget."""
    return {"methods": len({s["method"] for s in summary if s["arm"] not in _BASELINE_ARMS}) > 1,
            "fractions": len(fractions) > 1, "budgets": len({s["budget"] for s in summary}) > 1}


def _where(s: Row, meta: dict, shape: dict[str, bool]) -> list[str]:
    cells = ["unpruned" if s["arm"] == ARM_CONTROL else _level_name(meta, s["level"])]
    if shape["methods"]:
        cells.append(str(s["method"]))
    if shape["fractions"]:
        cells.append(f"{s['fraction']:g}")
    if shape["budgets"]:
        cells.append(f"{s['budget']:g}x")
    return cells


def _where_header(shape: dict[str, bool]) -> list[str]:
    return ["level", *(["method"] if shape["methods"] else []), *(["data fraction"] if shape["fractions"] else []),
            *(["budget"] if shape["budgets"] else [])]


def _summary_table(summary: list[Row], meta: dict, shape: dict[str, bool]) -> str:
    conf = f"{100 * meta.get('confidence', 0.95):g}% CI (%)"
    header = [*_where_header(shape), "arm", "runs", f"{_metric_name(meta)} (%)", conf, "damage (pts)",
              "steps to recover", "never", "recovery AUC (0-1)", "FLOPs kept (share)"]
    body = [[*_where(s, meta, shape), s["arm"], str(s["n"]), _pct(s["mean"]),
             f"{_pct(s['ci_low'])} .. {_pct(s['ci_high'])}" if s["ci_low"] is not None else "-",
             _pct(s["mean_damage"], 1), _num(s["steps_to_recover"], ".0f"), f"{s['never_recovered']}/{s['n']}",
             _num(s["recovery_auc"]), _num(s["flops_kept"])] for s in summary]
    return _table(header, body)


def _power(r: Row) -> str:
    if r["power_n"] is None:  # not estimable (one pair), or beyond the search limit (a tiny or zero difference)
        return "> 10000" if r.get("power_tested") else "-"
    return f"{r['power_n']} {r['power_unit']}"


def _paired_table(paired: list[Row], meta: dict, shape: dict[str, bool]) -> str:
    conf = f"{100 * meta.get('confidence', 0.95):g}% CI (pts)"
    margin = meta.get("margin", 0.01)
    within = any(r.get("n_bases", 1) > 1 for r in paired)
    header = [*_where_header(shape), "criterion", "pairs", "criterion - random (pts)", conf, "q (BH-adjusted)",
              "p (unadjusted)", f"TOST p (±{_pct(margin, 1)} pts)", "equivalent", "80% power needs", "reading",
              *(["these bases only: CI (pts); p; equivalent"] if within else [])]
    body = [[*_where(r, meta, shape), r["arm"], _pairs(r), _signed(r["diff"]), _ci(r), _num(r["q"]), _num(r["p"]),
             _num(r["tost_p"]), "yes" if r["equivalent"] else "no", _power(r), _reading(r, meta),
             *([_within(r)] if within else [])] for r in paired]
    return _table(header, body)


def _ci(r: Row, prefix: str = "") -> str:
    low, high = r.get(f"{prefix}ci_low"), r.get(f"{prefix}ci_high")
    return "-" if low is None else f"{_signed(low)} .. {_signed(high)}"


def _within(r: Row) -> str:
    if r.get("within_ci_low") is None:
        return "-"
    return f"{_ci(r, 'within_')}; {_num(r['within_p'])}; {'yes' if r['within_equivalent'] else 'no'}"


def _pairs(r: Row) -> str:
    if r.get("n_bases", 1) <= 1:
        return str(r["n_pairs"])
    return f"{r['n_pairs']} ({r['n_bases']} bases)"


def _signed(v: Any) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{100 * v:+.2f}"


def _significant(r: Row, alpha: float, adjusted: bool = True) -> bool:
    v = r["q"] if adjusted else r["p"]
    return math.isfinite(v) and v < alpha


def _reading(r: Row, meta: dict) -> str:
    """One phrase: the BH-adjusted verdict first (the one to quote), then equivalence, never one
    read as the other; a difference significant only before adjustment is labelled so."""
    alpha = 1.0 - meta.get("confidence", 0.95)
    margin = _pct(meta.get("margin", 0.01), 1)
    if r["n_pairs"] < 2 or (r.get("n_bases", 1) > 1 and r["n_bases"] < 2):
        return "too few pairs to test"
    side = "better" if (r["diff"] or 0) > 0 else "worse"
    if _significant(r, alpha):
        verdict = f"{side} than random (BH q < {alpha:g})"
    elif _significant(r, alpha, adjusted=False):
        verdict = f"no difference after BH (unadjusted p < {alpha:g}: {side})"
    else:
        verdict = "no significant difference"
    if r["equivalent"]:
        return f"{verdict}; equivalent to random within ±{margin} pts"
    if r["random_noninferior"]:
        return f"{verdict}; random not worse by {margin} pts or more (equivalence not shown)"
    return f"{verdict}; equivalence within ±{margin} pts not shown"


def _name(r: Row, meta: dict, shape: dict[str, bool]) -> str:
    where = [_level_name(meta, r["level"])] + ([str(r["method"])] if shape["methods"] else [])
    extra = ([f"fraction {r['fraction']:g}"] if shape["fractions"] else []) + (
        [f"budget {r['budget']:g}x"] if shape["budgets"] else [])
    return f"{r['arm']} at {', '.join(where)}" + (f" ({', '.join(extra)})" if extra else "")


def _conclusion(paired: list[Row], meta: dict, shape: dict[str, bool]) -> list[str]:
    if not paired:
        return ["No criterion could be paired with `random` (is `random` in study.criteria, with at least 2 seeds?)."]
    alpha = 1.0 - meta.get("confidence", 0.95)
    margin = _pct(meta.get("margin", 0.01), 1)
    better = [r for r in paired if _significant(r, alpha) and r["diff"] > 0]
    worse = [r for r in paired if _significant(r, alpha) and r["diff"] < 0]
    unadjusted = [r for r in paired if _significant(r, alpha, adjusted=False) and r not in better + worse]
    equivalent = [r for r in paired if r["equivalent"]]

    def names(rs: list[Row]) -> str:
        return ", ".join(_name(r, meta, shape) for r in rs) or "none"

    pairs = sorted({_pairs(r) for r in paired})
    lines = [f"- {len(paired)} comparisons with `random`, {' / '.join(pairs)} seed pairs each "
             f"(alpha = {alpha:g}, margin ±{margin} points). Verdicts on difference are Benjamini-Hochberg adjusted "
             f"over all {len(paired)} comparisons (q < {alpha:g}): quote these."]
    lines.append(f"- **Better than random** (BH-adjusted): {names(better)}.")
    lines.append(f"- **Worse than random** (BH-adjusted): {names(worse)}.")
    lines.append(f"- **Shown equivalent to random** within ±{margin} points (TOST): {names(equivalent)}.")
    if unadjusted:
        lines.append(f"- Significant only before adjustment (unadjusted p < {alpha:g}, q >= {alpha:g}; not a finding "
                     f"on its own): {names(unadjusted)}.")
    undecided = [r for r in paired if r not in better + worse + equivalent]
    if undecided:
        needs = "; ".join(f"{_name(r, meta, shape)}: {_power(r)}" for r in undecided)
        lines.append(f"- Neither shown different (after BH) nor equivalent: more runs needed to tell. Runs the observed "
                     f"difference would need for 80% power at alpha {alpha:g} (paired t test): {needs}.")
    return lines


# ---- the budget axis: when does random catch up? ------------------------------------------------


def catch_up(paired: list[Row], verdict: str = "equivalent") -> list[Row]:
    """Per criterion (and method, fraction, level): the smallest budget at which it is shown
    equivalent to random (TOST; ``verdict="within_equivalent"``: for these base models only), or
    None; ``holds`` says whether every larger budget tried is equivalent too, and ``not_at``
    lists the larger budgets where it is not."""
    groups: dict[tuple, list[Row]] = defaultdict(list)
    for r in paired:
        groups[(r["arm"], r["method"], r["fraction"], r["level"])].append(r)
    out = []
    for (arm, method, fraction, level), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["budget"])
        first = next((r["budget"] for r in rs if r.get(verdict)), None)
        not_at = [] if first is None else [r["budget"] for r in rs if r["budget"] > first and not r.get(verdict)]
        out.append({"arm": arm, "method": method, "fraction": fraction, "level": level, "budget": first,
                    "holds": first is not None and not not_at, "not_at": not_at,
                    "budgets": [r["budget"] for r in rs]})
    return sorted(out, key=lambda c: (c["level"] or 0, -c["fraction"], str(c["method"]), _arm_order(c["arm"])))


def _budget_section(paired: list[Row], summary: list[Row], meta: dict, shape: dict[str, bool]) -> list[str]:
    margin = _pct(meta.get("margin", 0.01), 1)
    steps = {(s["level"], s["method"], s["fraction"], s["budget"]): s.get("optimizer_steps")
             for s in summary if s["arm"] == REFERENCE}
    conf = f"{100 * meta.get('confidence', 0.95):g}% CI (pts)"
    where = [k for k in ("methods", "fractions") if shape[k]]
    within = any(r.get("n_bases", 1) > 1 for r in paired)
    header = ["level", *(["method"] if "methods" in where else []), *(["data fraction"] if "fractions" in where else []),
              "criterion", "budget", "optimiser steps", "criterion - random (pts)", conf, "q (BH-adjusted)",
              f"TOST p (±{margin} pts)", "equivalent", "reading", *(["these bases only: CI (pts); p; equivalent"]
                                                                    if within else [])]
    ordered = sorted(paired, key=lambda r: (r["level"] or 0, -r["fraction"], str(r["method"]), _arm_order(r["arm"]),
                                            r["budget"]))
    body = [[_level_name(meta, r["level"]), *([str(r["method"])] if "methods" in where else []),
             *([f"{r['fraction']:g}"] if "fractions" in where else []), r["arm"], f"{r['budget']:g}x",
             _num(steps.get((r["level"], r["method"], r["fraction"], r["budget"])), ".0f"), _signed(r["diff"]),
             f"{_signed(r['ci_low'])} .. {_signed(r['ci_high'])}" if r["ci_low"] is not None else "-",
             _num(r["q"]), _num(r["tost_p"]), "yes" if r["equivalent"] else "no", _reading(r, meta),
             *([_within(r)] if within else [])] for r in ordered]
    tried = sorted({r["budget"] for r in paired})
    span = f"{tried[0]:g}x-{tried[-1]:g}x"
    first = []

    def text(c: Row) -> str:
        if c["budget"] is None:
            return f"not within the budgets tried ({span})"
        return f"{c['budget']:g}x" + ("" if c["holds"] else f" (but not at {', '.join(f'{b:g}x' for b in c['not_at'])})")

    fixed = {(c["arm"], c["method"], c["fraction"], c["level"]): c for c in catch_up(paired, "within_equivalent")}
    for c in catch_up(paired):
        first.append([_level_name(meta, c["level"]), *([str(c["method"])] if "methods" in where else []),
                      *([f"{c['fraction']:g}"] if "fractions" in where else []), c["arm"], text(c),
                      *([text(fixed[(c["arm"], c["method"], c["fraction"], c["level"])])] if within else [])])
    return [
        "", "## When does random catch up?", "",
        f"Each criterion against `random` at every fine-tuning budget (a budget multiplies {_budget_scales(meta)}; "
        f"optimiser steps are those of the `random` runs), paired as above. Equivalence = TOST within ±{margin} points "
        "(`study.margin`); q is adjusted over all comparisons of the study.", "",
        _table(header, body), "",
        f"Smallest budget at which each criterion is shown equivalent to random within ±{margin} points:", "",
        _table(["level", *(["method"] if "methods" in where else []),
                *(["data fraction"] if "fractions" in where else []), "criterion", "smallest equivalent budget",
                *(["... for these base models only"] if within else [])], first),
        "", "![difference vs budget](difference_vs_budget.png)", "",
        "Criterion minus random (points) against the fine-tuning budget (log axis), mean and "
        f"{100 * meta.get('confidence', 0.95):g}% CI band; dashed lines at ±{margin} points (the equivalence margin). "
        "A criterion has caught up when its whole band lies between the dashed lines (TOST uses the narrower "
        f"{100 * (1 - 2 * (1 - meta.get('confidence', 0.95))):g}% interval). With several base models the light band "
        "is the interval over base models (what another base model would give) and the dark band the interval for "
        "these base models only (within-base spread).", "",
    ]


def plot_difference_vs_budget(paired: list[Row], summary: list[Row], path: Path, meta: dict) -> None:
    """Criterion - random (points) against the budget (log axis), one panel per level, one line
    per criterion with its CI band; the equivalence margin drawn at +-margin (largest data fraction)."""
    fraction = max((r["fraction"] for r in paired), default=1.0)
    rows = [r for r in paired if r["fraction"] == fraction]
    levels = sorted({r["level"] for r in rows}, key=lambda v: -1 if v is None else v) or [None]
    methods = {r["method"] for r in rows}
    colour = _colours({r["arm"] for r in rows} | {REFERENCE})
    steps = {(s["level"], s["budget"]): s.get("optimizer_steps") for s in summary
             if s["arm"] == REFERENCE and s["fraction"] == fraction}
    margin = 100 * meta.get("margin", 0.01)
    fig, axes = _figure(len(levels), width=5.5, height=4.0)
    for ax, level in zip(axes, levels, strict=True):
        lines: dict[tuple, list[Row]] = defaultdict(list)
        for r in rows:
            if r["level"] == level:
                lines[(r["arm"], r["method"])].append(r)
        for (arm, method), pts in sorted(lines.items(), key=lambda kv: _arm_order(kv[0][0])):
            pts = sorted(pts, key=lambda r: r["budget"])
            xs = [r["budget"] for r in pts]
            ax.plot(xs, [100 * r["diff"] for r in pts], color=colour[arm], marker="o", ms=4, lw=1.4,
                    label=_label(arm, method, methods))
            band = [r for r in pts if r["ci_low"] is not None]
            if band:
                ax.fill_between([r["budget"] for r in band], [100 * r["ci_low"] for r in band],
                                [100 * r["ci_high"] for r in band], color=colour[arm], alpha=0.15, lw=0)
            inner = [r for r in pts if r.get("within_ci_low") is not None]
            if inner:  # several bases: the interval for these base models only (within-base spread)
                ax.fill_between([r["budget"] for r in inner], [100 * r["within_ci_low"] for r in inner],
                                [100 * r["within_ci_high"] for r in inner], color=colour[arm], alpha=0.35, lw=0)
        ax.axhline(0, color="black", lw=0.7)
        for sign in (1, -1):
            ax.axhline(sign * margin, color="grey", lw=1.0, ls="--",
                       label=f"equivalence margin ±{margin:g} pts" if sign == 1 else None)
        budgets = sorted({r["budget"] for r in rows if r["level"] == level})
        ax.set_xscale("log")
        ax.set_xticks(budgets)
        ax.set_xticklabels([f"{b:g}x" + (f"\n{steps[(level, b)]:.0f} steps" if steps.get((level, b)) else "")
                            for b in budgets], fontsize=8)
        ax.minorticks_off()
        ax.set_title(_level_name(meta, level))
        ax.set_xlabel(f"fine-tuning budget (x {' and '.join(_scaled_keys(meta))}; log scale)")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel(f"criterion - random, {_metric_name(meta)} (points)")
    _legend(fig, axes)
    several = any(r.get("within_ci_low") is not None for r in rows)
    bands = ("\nlight band: over base models (another base model); dark band: these base models only"
             if several else "")
    fig.suptitle(f"When does random catch up? Mean paired difference and {100 * meta.get('confidence', 0.95):g}% CI"
                 f" (data fraction {fraction:g}){bands}", fontsize=9, y=1.06 if several else 0.98)  # clear of the panel titles
    fig.savefig(path, bbox_inches="tight")


def _scaled_keys(meta: dict) -> tuple[str, ...]:
    """The settings a budget multiplies (``study.budget_scales``)."""
    return ("prune.q",) if meta.get("budget_scales") == "q" else ("prune.p", "prune.q")


def _budget_scales(meta: dict) -> str:
    """What a budget multiplies, and how the budgets were run, for the report's text."""
    keys = _scaled_keys(meta)
    scaled = " and ".join(f"`{k}`" for k in keys) + (" only" if len(keys) == 1 else "")
    return scaled + (", each cell's budgets one continued run" if meta.get("continue_budgets") else "")


def write_report(runs_path: str | os.PathLike[str], out: str | os.PathLike[str] | None = None,
                 meta_overrides: dict | None = None) -> dict[str, Any]:
    """Read ``runs.parquet``, write the figures and ``report.md`` next to it (or into ``out``);
    return ``{"summary", "paired", "files"}``. With several budgets the per-level figures show
    the largest one and ``difference_vs_budget.png`` shows them all."""
    runs_path = Path(runs_path)
    out = Path(out) if out is not None else runs_path.parent
    out.mkdir(parents=True, exist_ok=True)
    rows, meta = read_runs(runs_path), {**study_meta(runs_path), **(meta_overrides or {})}
    metric = meta.get("metric", "final_test_acc")
    if metric not in METRICS:
        raise ValueError(f"study.metric must be one of {', '.join(METRICS)}, but got {metric!r}")
    confidence, margin = float(meta.get("confidence", 0.95)), float(meta.get("margin", 0.01))
    summary = summarize(rows, metric, confidence)
    paired = paired_vs_random(rows, metric, confidence, margin)
    budgets = sorted({_budget(r) for r in rows}) or [1.0]
    shown = budgets[-1]  # the per-level figures: the most fine-tuned runs
    rows_b, summary_b = [r for r in rows if _budget(r) == shown], [s for s in summary if s["budget"] == shown]
    files = [out / "recovery_curves.png", out / "accuracy_vs_ratio.png", out / "damage_vs_recovery.png"]
    plot_recovery_curves(rows_b, files[0], meta)
    plot_accuracy_vs_level(summary_b, files[1], meta)
    plot_damage_vs_recovery(rows_b, files[2], meta)
    fractions = sorted({r["fraction"] for r in rows})
    if len(fractions) > 1:
        files.append(out / "data_efficiency.png")
        plot_data_efficiency(summary_b, files[-1], meta)
    if len(budgets) > 1:
        files.append(out / "difference_vs_budget.png")
        plot_difference_vs_budget(paired, summary, files[-1], meta)
    report = out / "report.md"
    report.write_text(_markdown(rows, summary, paired, meta, fractions))
    return {"summary": summary, "paired": paired, "files": [*files, report]}


def _markdown(rows: list[Row], summary: list[Row], paired: list[Row], meta: dict, fractions: list[float]) -> str:
    shape = _shape(summary, fractions)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("COMPLETED", "FAILED", "INCOMPLETE")}
    conf = f"{100 * meta.get('confidence', 0.95):g}%"
    margin = _pct(meta.get("margin", 0.01), 1)
    derived = sum(r.get("metrics_source") == "curve" for r in rows)
    budgets = sorted({_budget(r) for r in rows})
    bases: dict[Any, list[float]] = defaultdict(list)
    for r in rows:
        if r.get("base_val_acc") is not None:
            bases[r.get("base_seed")].append(r["base_val_acc"])
    base_text = ", ".join(f"{_pct(_mean(v))}%" + (f" (seed {k})" if k is not None and len(bases) > 1 else "")
                          for k, v in sorted(bases.items(), key=lambda kv: str(kv[0])))
    over = "over the base models' means (each the mean over its seeds)" if any(
        s.get("n_bases", 1) > 1 for s in summary) else "over seeds"
    lines = [
        f"# Plasticity study: {meta.get('model', '?')} on {meta.get('data', '?')}",
        "",
        f"{len(rows)} runs ({counts['COMPLETED']} completed, {counts['FAILED']} failed, {counts['INCOMPLETE']} incomplete): "
        f"arms {', '.join(sorted({r['arm'] for r in rows}, key=_arm_order))}; "
        f"{'FLOPs targets' if meta.get('level') == 'target_flops_reduction' else 'prune ratios (share of filters removed)'} "
        f"{', '.join(f'{v:g}' for v in sorted({_level(r) for r in rows if _level(r) is not None and r['arm'] != ARM_CONTROL}))}; "
        f"seeds {', '.join(str(s) for s in sorted({r['seed'] for r in rows}))}; "
        f"{len(bases)} base model(s); fine-tuning budgets {', '.join(f'{b:g}x' for b in budgets)}; "
        f"data fractions {', '.join(f'{f:g}' for f in fractions)}; methods {', '.join(sorted({str(r.get('method')) for r in rows if r['arm'] not in _BASELINE_ARMS}))}.",
        f"Protocol at budget 1x: p={meta.get('p')}, q={meta.get('q')} epochs, lr={meta.get('lr')}, schedule "
        f"{meta.get('schedule')}. Base model val {_score_name(meta)} {base_text}. Statistics on "
        f"**{_metric_name(meta)}** (`{meta.get('metric', 'final_test_acc')}`), t intervals at {conf}, equivalence "
        f"margin ±{margin} points (`study.margin`). Scores are shown in percent, differences in points.",
    ]
    if derived:
        lines.append(f"Damage and recovery of {derived} run(s) were derived from the recovery curve (their record has no "
                     f"plasticity fields); recovery delta {_pct(meta.get('recovery_delta', 0.01), 1)} points.")
    lines += [
        "", "## Reading", "", *_conclusion(paired, meta, shape),
        "", "## Per arm and level", "",
        f"Mean and its {conf} t confidence interval {over} (scipy.stats.t); damage = val {_score_name(meta)} lost "
        "right after pruning (points, mean over pruning steps), steps to recover = optimiser steps after the last pruning "
        "step until val score is back within the recovery delta of the base model's (mean over the runs that got there; "
        "'never' counts the others), recovery AUC = time-weighted share of the lost score won back from the first pruning "
        "step to the end (0 = stayed at its worst, 1 = never below base; `trainables.protocol.recovery`); the unpruned control "
        "lost nothing, so it has no recovery AUC (-). FLOPs kept = pruned / unpruned FLOPs.", "",
        _summary_table(summary, meta, shape) if summary else "(no completed run)",
        "", "## Every criterion against random, paired by seed", "",
        "criterion - random, in points: mean paired difference (pairs share base model and seed), its t confidence "
        "interval; q = Benjamini-Hochberg adjusted p over all rows (the verdict to quote), p = the unadjusted two-sided "
        "p of the paired t test (`scipy.stats.ttest_rel`; with several base models, a one-sample t test on the per-base "
        "mean differences, B - 1 degrees of freedom, so the interval covers base-to-base variation too). "
        f"'Not significantly different' is not 'equivalent': equivalence is TOST (two one-sided paired t tests) within "
        f"±{margin} points, 'random non-inferior' tests H0 'random is worse by {margin} points or more'. '80% power "
        "needs': runs (seeds, or bases with several) a paired t test at this alpha would need to detect the observed "
        "difference 4 times in 5, taking the observed difference and spread as true.", "",
        _paired_table(paired, meta, shape) if paired else "(no pair: `random` missing or fewer than 2 seeds)",
    ]
    if len(budgets) > 1 and paired:
        lines += _budget_section(paired, summary, meta, shape)
    at = f" at budget {budgets[-1]:g}x" if len(budgets) > 1 else ""
    lines += [
        "", "## Figures", "",
        "![recovery curves](recovery_curves.png)", "",
        f"Recovery curves{at}: val score (evaluation subset) along fine-tuning, one panel per level, mean over seeds with "
        "a band from the lowest to the highest seed; the dashed line is the unpruned control when the study has one.", "",
        "![final accuracy vs ratio](accuracy_vs_ratio.png)", "",
        f"Final {_metric_name(meta)}{at} against the pruning level, mean and {conf} t-CI.", "",
        "![damage vs recovery](damage_vs_recovery.png)", "",
        f"Damage vs recovery{at}: each run's score lost right after pruning against what is still lost after "
        "fine-tuning (points); runs far below the dotted diagonal recovered most of their damage.", "",
    ]
    if shape["fractions"]:
        lines += ["![data efficiency](data_efficiency.png)", "",
                  f"Data efficiency{at}: final score against the share of training data used for fine-tuning, at the "
                  "same number of optimiser steps.", ""]
    else:
        lines += ["(No data-efficiency figure: the study has one data fraction; set `study.fractions` to draw one.)", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m search.study_report <study folder> [margin=2] [metric=final_val_acc]``:
    re-render the report of a finished study from its runs.parquet (margin in points, as the
    report states it: 2 = two points); the last line is the report."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(main.__doc__)
        return 0 if argv else 2
    runs = Path(argv[0]) / "runs.parquet"
    if not runs.exists():
        print(f"error: the study folder must hold runs.parquet, but got {argv[0]}", file=sys.stderr)
        return 2
    overrides: dict[str, Any] = {}
    try:
        for arg in argv[1:]:
            key, _, value = arg.partition("=")
            if key == "margin":
                try:
                    points = float(value)
                except ValueError:
                    points = math.nan
                if not 0 < points < 100:  # also false for NaN
                    raise ValueError(f"margin must be in (0, 100) points of the score (1 = one point), but got {value!r}")
                overrides["margin"] = points / 100  # runs.parquet keeps scores (and the margin) as fractions
            elif key == "metric":
                overrides["metric"] = value
            else:
                raise ValueError(f"unknown option {key!r}; valid: margin, metric")
        result = write_report(runs, meta_overrides=overrides)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(result["files"][-1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
