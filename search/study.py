"""``python -m search.study [key=value ...]``: the plasticity study, a Ray Tune grid.

Reads ``conf/study.yaml`` (everything of ``conf/config.yaml`` plus ``study.*``), trains or
loads the base model once, and runs one protocol per grid cell through the search's own
trainable (``trainables.ray_trainable.trial_fn``: fast path or TorchTrainer, checkpoints,
MLflow parent + child runs). The grid is criteria x ratios (or FLOPs targets) x seeds x data
fractions x methods, plus the unpruned control (and the scratch baseline) per seed and
fraction; every cell at each fine-tuning budget (``study.budgets``) and on each base model
(``study.base_seeds``); with ``study.continue_budgets`` the budgets of a cell are one trial
that records the shorter ones on its way. Writes ``runs.parquet`` (one row per run), ``report.md`` and the figures into the
output folder, whose path is the last line printed.

    python -m search.study                                    # the embedded default (2 CPUs, < 15 min)
    python -m search.study study.fractions=[0.01,0.05,0.2,1.0]   # data efficiency
    python -m search.study study.ratios=null study.flops_targets=[0.3,0.6]
    python -m search.study 'study.budgets=[0.25,1,4]' 'study.criteria=[random,l1]' study.ratios=[0.6]   # when does random catch up?
    python -m search.study 'study.base_seeds=[0,1]'             # two independently trained base models
    python -m search.study 'study.budgets=[0.25,1,4]' study.budget_scales=q finetune.anneal_final=false study.continue_budgets=true   # q only: one run per cell
    python -m search.study resume=outputs/study/20261130-101500   # finish an interrupted study

Unlike a search, a study reads the test split: at the end of every run (the statistics are on
test accuracy by default, ``study.metric``), since nothing is selected on it.
"""

from __future__ import annotations

import itertools
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

__all__ = ["CellValue", "base_seeds", "continued_record", "grid_cells", "load_study_config", "main", "run_row", "study_trial_fn",
           "trial_cells"]

_PRUNING_METHODS = ("layer_by_layer", "one_shot", "iterative", "greedy_car")  # the methods a criterion arm can use
_OWN_SCORE = {"greedy_car": "car"}  # methods that choose filters themselves: one arm (named after the method) per level
_BASELINES = ("control", "scratch")  # arms without a criterion (prune.method of the same name)
_SWITCH = ("auto", True, False)
_BUDGET_SCALES = ("pq", "q")  # study.budget_scales: what a budget multiplies
_MAX_BUDGET = 1000.0  # a budget multiplier beyond this is a typo (1000 x the default q is 250 epochs)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _list(study, key: str) -> list:
    from omegaconf import OmegaConf

    from trainables.protocol.config import require

    value = study.get(key)
    value = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    require(isinstance(value, list) and len(value) > 0, f"study.{key}", "a non-empty list", value)
    # numbers by value (budgets 1 and 1.0 repeat), anything else by its text
    distinct = {v if _is_number(v) else str(v) for v in value}
    require(len(distinct) == len(value), f"study.{key}", "a list without repeats", value)
    return value


def check_study(cfg) -> None:
    """One-line errors for every ``study.*`` key and the run settings the grid relies on."""

    from search.launch import check_trial_resources
    from search.study_report import METRICS
    from trainables.cli.compose import config_task
    from trainables.criteria import list_criteria
    from trainables.protocol.config import METHODS, require, require_int
    from trainables.protocol.schedules import check_ratio

    study = cfg.study
    criteria = _list(study, "criteria")
    unknown = [c for c in criteria if c not in list_criteria()]
    if unknown:
        raise ValueError(f"study.criteria: unknown criterion '{unknown[0]}'; valid: {', '.join(list_criteria())}")
    task = config_task(cfg)
    if task.criteria is not None:
        misfit = [c for c in criteria if c not in task.criteria]
        if misfit:
            raise ValueError(f"study.criteria: {', '.join(misfit)} do not apply to {task.name} (they need class "
                             f"logits); valid for {task.name}: {', '.join(task.criteria)}")
    ratios, targets = study.get("ratios"), study.get("flops_targets")
    require(targets is None or task.name == "classification", "study.flops_targets",
            f"null for {task.name} (use study.ratios)", targets)
    require((ratios is None) != (targets is None), "study.ratios / study.flops_targets", "exactly one of them set",
            f"ratios={ratios}, flops_targets={targets}")
    if ratios is not None:
        for i, r in enumerate(_list(study, "ratios")):
            check_ratio(f"study.ratios[{i}]", r)
        require(cfg.prune.schedule == "uniform", "prune.schedule",
                "uniform with study.ratios (use study.flops_targets to scale another schedule)", cfg.prune.schedule)
        require(cfg.prune.target_flops_reduction is None, "prune.target_flops_reduction",
                "null with study.ratios (a FLOPs target would rescale every ratio; use study.flops_targets)",
                cfg.prune.target_flops_reduction)
    else:
        for i, t in enumerate(_list(study, "flops_targets")):
            require(_is_number(t) and 0 < t < 1, f"study.flops_targets[{i}]", "in (0, 1)", t)
    for i, s in enumerate(_list(study, "seeds")):
        require_int(f"study.seeds[{i}]", s, 0)
    for i, f in enumerate(_list(study, "fractions")):
        require(_is_number(f) and 0 < f <= 1, f"study.fractions[{i}]", "in (0, 1]", f)
    for i, b in enumerate(_list(study, "budgets")):
        require(_is_number(b) and 0 < b <= _MAX_BUDGET, f"study.budgets[{i}]",
                f"a multiplier of prune.p and prune.q in (0, {_MAX_BUDGET:g}]", b)
    _check_continuation(cfg)
    if study.get("base_seeds") is not None:
        for i, s in enumerate(_list(study, "base_seeds")):
            require_int(f"study.base_seeds[{i}]", s, 0)
        require(cfg.model.get("weights") is None, "study.base_seeds",
                "null with model.weights (a given checkpoint is one base model; seeds would not train others)",
                list(study.base_seeds))
    for m in _list(study, "methods"):
        require(m in _PRUNING_METHODS, "study.methods", f"a list of {', '.join(_PRUNING_METHODS)}", m)
        require(m != "greedy_car" or task.name == "classification", "study.methods",
                f"a list without greedy_car for {task.name} (greedy CAR ranks filters by classification accuracy)", m)
    for name in _BASELINES:
        value = study.get(name)
        require(value in _SWITCH, f"study.{name}", "auto, true or false", value)
        require(value is not True or name in METHODS, f"study.{name}",
                f"auto or false: prune.method={name} does not exist in this version", value)
    for key, low in (("max_concurrent_trials", 1), ("max_failures", 0)):
        require_int(f"study.{key}", study.get(key), low)
    require(_is_number(study.margin) and 0 < study.margin < 100, "study.margin",
            "in (0, 100) points of the score (1.0 = one point)", study.margin)
    require(_is_number(study.confidence) and 0.5 <= study.confidence < 1, "study.confidence", "in [0.5, 1)",
            study.confidence)
    require(study.metric in METRICS, "study.metric", f"one of {', '.join(METRICS)}", study.metric)
    check_trial_resources(cfg)


def _check_continuation(cfg) -> None:
    """``study.budget_scales`` and ``study.continue_budgets``: the shortcut only where it is exact."""
    from trainables.protocol.config import require

    study = cfg.study
    scales = study.get("budget_scales", "pq")
    require(scales in _BUDGET_SCALES, "study.budget_scales", "pq (prune.p and prune.q) or q (prune.q only)", scales)
    cont = study.get("continue_budgets", False)
    require(cont in (True, False), "study.continue_budgets", "true or false", cont)
    if not cont:
        return
    why = "with study.continue_budgets=true"
    require(scales == "q", "study.budget_scales", f"q {why} (budgets that scale p part at the first unit's "
            "recovery, so no run passes through another)", scales)
    require(cfg.finetune.anneal_final is False, "finetune.anneal_final", f"false {why} (the cosine anneal "
            "depends on q, so a longer final fine-tuning does not pass through a shorter one)", cfg.finetune.anneal_final)
    require(_is_number(cfg.prune.q) and cfg.prune.q > 0, "prune.q", f"> 0 {why}", cfg.prune.q)
    require(len(study.budgets) >= 2, "study.continue_budgets", "false with one budget (nothing to continue)",
            list(study.budgets))
    require("one_shot" not in _list(study, "methods"), "study.methods", f"a list without one_shot {why} (its "
            "pruning step's recovery is the final fine-tuning itself)", list(study.methods))


def trial_cells(cfg, cells: list[dict]) -> dict[int, list[int]]:
    """The Tune trials of a study: the cell each runs -> the cells it records on its way.

    Every cell is its own trial, except with ``study.continue_budgets``: then the cells that
    differ only in their budget are one trial, run at the longest and recording the shorter
    ones (``run_protocol``'s ``q_points``), listed shortest first.
    """
    if not cfg.study.get("continue_budgets", False):
        return {i: [] for i in range(len(cells))}
    groups: dict[str, list[int]] = {}
    for i, cell in enumerate(cells):
        groups.setdefault(json.dumps({k: v for k, v in cell.items() if k not in ("budget", "q", "cell")}, sort_keys=True,
                                     default=str), []).append(i)
    trials = {}
    for members in groups.values():
        members = sorted(members, key=lambda i: cells[i]["q"])
        trials[members[-1]] = members[:-1]
    return dict(sorted(trials.items()))


def _baseline_on(study, name: str) -> bool:
    from trainables.protocol.config import METHODS

    return study.get(name) is True or (study.get(name) == "auto" and name in METHODS)


def base_seeds(cfg) -> list[int]:
    """The seeds of the study's base models: ``study.base_seeds``, or the run config's ``seed``."""
    given = cfg.study.get("base_seeds")
    return [int(s) for s in given] if given is not None else [int(cfg.seed)]


def grid_cells(cfg) -> list[dict]:
    """Every run of the study as a flat trial config, in a fixed order (the ``cell`` index).

    Keys: ``arm`` (a criterion, ``control`` or ``scratch``), ``criterion`` (the one the protocol
    is given; control and scratch ignore it and get the config's), ``method``, the level
    (``ratio`` or ``target_flops_reduction``), ``seed``, ``fraction``, ``base_seed`` (the base
    model the run starts from), ``budget`` and the ``p`` / ``q`` epochs it means (``budget`` x
    ``prune.p`` / ``prune.q``; ``p`` stays ``prune.p`` with ``study.budget_scales=q``). Base-major, then seed-major, so a study stopped half-way has
    whole seeds of every arm rather than all seeds of a few.
    """
    study = cfg.study
    level = "ratio" if study.get("ratios") is not None else "target_flops_reduction"
    levels = list(study.ratios if level == "ratio" else study.flops_targets)
    scales_p = study.get("budget_scales", "pq") == "pq"
    cells = []
    for base_seed, seed, budget, fraction in itertools.product(base_seeds(cfg), study.seeds, study.budgets,
                                                               study.fractions):
        common = {"seed": int(seed), "fraction": float(fraction), "base_seed": base_seed, "budget": float(budget),
                  "p": float(budget if scales_p else 1.0) * float(cfg.prune.p), "q": float(budget) * float(cfg.prune.q)}
        if _baseline_on(study, "control"):  # nothing is pruned: level 0 (no FLOPs target)
            cells.append({"arm": "control", "criterion": cfg.criterion.name, "method": "control",
                          level: 0.0 if level == "ratio" else None, **common})
        for value in levels:
            for method in study.methods:
                if method in _OWN_SCORE:  # not crossed with the criteria: it ignores them
                    cells.append({"arm": method, "criterion": _OWN_SCORE[method], "method": method,
                                  level: float(value), **common})
                    continue
                for criterion in study.criteria:
                    cells.append({"arm": criterion, "criterion": criterion, "method": method, level: float(value),
                                  **common})
            if _baseline_on(study, "scratch"):
                cells.append({"arm": "scratch", "criterion": cfg.criterion.name, "method": "scratch",
                              level: float(value), **common})
    return cells


def _check_cells(cfg, cells: list[dict]) -> None:
    """Every cell's prune settings are valid (e.g. class_specific has target classes)."""
    from trainables.cli.compose import configs_of
    from trainables.protocol.config import PruneConfig

    prune = asdict(configs_of(cfg)[0])
    seen = set()
    for cell in cells:
        key = (cell["criterion"], cell["method"], cell.get("ratio"), cell.get("target_flops_reduction"), cell["p"],
               cell["q"])
        if key not in seen:
            seen.add(key)
            PruneConfig(**{**prune, **{k: v for k, v in cell.items() if k in prune}})


def load_study_config(argv: list[str]):
    """Compose ``conf/study.yaml`` with overrides and check it all, before any work; a resumed
    study reuses its saved config (only ``num_cpus`` and ``ray_address`` may change)."""
    from search.launch import _resumed_config
    from trainables.cli.compose import check_config, compose

    resume = next((a.split("=", 1)[1] for a in argv if a.startswith("resume=")), None)
    if resume:
        return _resumed_config(resume, [a for a in argv if not a.startswith("resume=")])
    cfg = compose("study", argv)
    check_config(cfg)
    check_study(cfg)
    if cfg.study.get("base_seeds") is not None:
        from omegaconf import open_dict

        with open_dict(cfg):  # the session trains (or loads) the first base model as the run config's own
            cfg.seed = int(cfg.study.base_seeds[0])
    _check_cells(cfg, grid_cells(cfg))
    return cfg


class CellValue:
    """``tune.sample_from`` of one key: the value of that key in the trial's grid cell.

    Tune's grid is a product; the study's is not (the control has no ratio or criterion to
    cross), so Tune grids over the cell index and each key follows from it, which keeps the
    trial config flat, exactly as a search's (MLflow params and tags, ``trial_configs``).
    A class, not a closure: Tune pickles it into the experiment for ``resume=``.
    """

    def __init__(self, cells: list[dict], key: str):
        self.cells, self.key = cells, key

    def __call__(self, config: dict) -> Any:
        return self.cells[config["cell"]][self.key]


def study_trial_fn(config: dict, ctx, bases: dict[int, dict]) -> None:
    """The Tune trainable of a study: the search's ``trial_fn`` started from the cell's base
    model (``bases``: state_dict per base seed; the context carries the first one)."""
    from dataclasses import replace

    from trainables.ray_trainable import trial_fn

    trial_fn(config, replace(ctx, base_state=bases[int(config["base_seed"])]))


def _base_models(cfg, session, log=print) -> tuple[dict[int, dict], dict[int, float]]:
    """State dict and val score of every base model: the session's (``seed``), and one more per
    other ``study.base_seeds`` entry, trained with the same recipe (or loaded: the cache key
    holds the seed)."""
    from omegaconf import open_dict

    from trainables.cli.base_model import prepare

    states = {int(cfg.seed): session.ctx.base_state}
    vals = {int(cfg.seed): session.base_val_acc}
    for seed in base_seeds(cfg):
        if seed in states:
            continue
        other = cfg.copy()
        with open_dict(other):
            other.seed = seed
        model, _, _, meta = prepare(other, log=log)
        states[seed] = {k: v.clone() for k, v in model.state_dict().items()}
        vals[seed] = float(meta.get("val_acc", float("nan")))
    return states, vals


def _tuner(cfg, session, cells: list[dict], bases: dict[int, dict], trials: dict[int, list[int]]):
    from ray import tune
    from ray.tune import FailureConfig, RunConfig

    from search.tune_callback import ProgressCallback
    from trainables.ray_trainable import uses_fast_path

    # As search.launch._trainable, with the base models beside the context (Ray's object store).
    resources = {"cpu": 1} if uses_fast_path(session.ctx) else {"cpu": 0.01}
    trainable = tune.with_resources(tune.with_parameters(study_trial_fn, ctx=session.ctx, bases=bases), resources)
    space = {"cell": tune.grid_search(list(trials))}
    space.update({key: tune.sample_from(CellValue(cells, key)) for key in cells[0]})
    if any(trials.values()):  # study.continue_budgets: each trial also records its shorter budgets
        points = [{"q_points": [cells[k]["q"] for k in trials.get(i, [])]} for i in range(len(cells))]
        space["q_points"] = tune.sample_from(CellValue(points, "q_points"))
    if session.restore_path:
        # Tune saves sample_from functions as placeholders: cells not started before the kill
        # would get ('__fn_ph', hash) as values unless the same space is handed back here.
        return tune.Tuner.restore(session.restore_path, trainable=trainable, param_space=space,
                                  resume_unfinished=True, resume_errored=True)
    return tune.Tuner(
        trainable, param_space=space,
        tune_config=tune.TuneConfig(max_concurrent_trials=cfg.study.max_concurrent_trials, reuse_actors=True),
        run_config=RunConfig(name="tune", storage_path=str(session.storage),
                             callbacks=[session.callback, ProgressCallback(len(trials))],
                             failure_config=FailureConfig(max_failures=cfg.study.max_failures), verbose=0),
    )


def _plasticity(record: dict, delta: float) -> dict:
    """The record's run-level recovery metrics, or (a record from before the protocol measured
    them) the same quantities computed from its curve by ``trainables.protocol.recovery``."""
    if "mean_damage" in record:
        steps = record.get("steps") or []
        return {"mean_damage": record.get("mean_damage"), "steps_to_recover": record.get("steps_to_recover"),
                "recovery_auc": record.get("recovery_auc"), "recovery_delta": record.get("recovery_delta"),
                "n_steps": len(steps), "steps_json": json.dumps(steps), "metrics_source": "record"}
    from trainables.protocol.recovery import run_recovery, stage_recovery

    curve = record["curve"]
    damage_at = [i for i, p in enumerate(curve) if p["phase"] == "damage"]
    steps = []
    for k, i in enumerate(damage_at):
        points = curve[i:damage_at[k + 1] if k + 1 < len(damage_at) else len(curve)]
        pre = curve[i - 1]["val_acc"]  # the last evaluation before this pruning step
        steps.append({"step": k + 1, "pre_prune_val_acc": pre, "damage_val_acc": points[0]["val_acc"],
                      "recovered_val_acc": points[-1]["val_acc"], **stage_recovery(points, pre, delta)})
    run = run_recovery(curve, record["base_val_acc"], delta)
    drops = [s["pre_prune_val_acc"] - s["damage_val_acc"] for s in steps]
    return {"mean_damage": sum(drops) / len(drops) if drops else None, **run, "recovery_delta": delta,
            "n_steps": len(steps), "steps_json": json.dumps(steps), "metrics_source": "curve"}


def run_row(run_id: str, status: str, cell: dict, record: dict | None, mlflow_run_id: str | None,
            delta: float) -> dict:
    """One ``runs.parquet`` row (``search.study_report.RUN_COLUMNS``) from a cell and its final record."""
    baseline = cell["arm"] in _BASELINES
    row = {"run_id": run_id, "status": status, "cell": cell["cell"], "arm": cell["arm"],
           "criterion": None if baseline else cell["criterion"], "method": cell["method"],
           "prune_ratio": cell.get("ratio"), "target_flops_reduction": cell.get("target_flops_reduction"),
           "seed": cell["seed"], "fraction": cell["fraction"], "base_seed": cell.get("base_seed"),
           "budget": cell.get("budget", 1.0), "mlflow_run_id": mlflow_run_id, "config_json": json.dumps(cell)}
    if record is None:
        return row
    prune, finetune = record["config"].get("prune", {}), record["config"].get("finetune", {})
    curve = record["curve"]
    row.update(
        schedule=prune.get("schedule"), p=prune.get("p"), q=prune.get("q"), lr=finetune.get("lr"),
        ratios=[float(r) for r in record["ratios"]], base_val_acc=record["base_val_acc"],
        final_val_acc=record["final_val_acc"], final_test_acc=record.get("final_test_acc"),
        flops_before=record["flops_before"], flops_after=record["flops_after"],
        flops_kept=record["flops_after"] / record["flops_before"], params_before=record["params_before"],
        optimizer_steps=int(curve[-1]["step"]) if curve else 0,
        params_after=record["params_after"], wall_s=record["wall_s"],
        curve_step=[int(p["step"]) for p in curve], curve_val_acc=[float(p["val_acc"]) for p in curve],
        curve_phase=[str(p["phase"]) for p in curve], **_plasticity(record, delta),
    )
    return row


def _rows(results, session, cells: list[dict], delta: float, log, trials: dict[int, list[int]] | None = None) -> list[dict]:
    """One row per cell: a Tune trial's own cell and the record of its last checkpoint (logged
    to its MLflow run as ``record.json``), and with ``study.continue_budgets`` one more per
    shorter budget it recorded on its way (run id ``<trial>@b<budget>``, the same MLflow run)."""
    from search.results import trial_ids

    trials = trials or {}
    rows = []
    for trial_id, result in zip(trial_ids(results), results, strict=True):
        cell = {**cells[int(result.config["cell"])], "cell": int(result.config["cell"])}
        record, run_id = None, session.tracker.find_run(trial_id)
        if result.checkpoint is not None:
            with result.checkpoint.as_directory() as d:
                path = Path(d) / "record.json"
                if path.exists():
                    record = json.loads(path.read_text())
                    if run_id:
                        session.tracker.log_artifact(trial_id, path)
        status = "FAILED" if result.error is not None else "COMPLETED" if record is not None else "INCOMPLETE"
        rows.append(run_row(trial_id, status, cell, record, run_id, delta))
        for k in trials.get(cell["cell"], []):
            shorter = {**cells[k], "cell": k}
            continued = continued_record(record, shorter["q"])
            sub_status = "INCOMPLETE" if status == "COMPLETED" and continued is None else status
            rows.append(run_row(f"{trial_id}@b{shorter['budget']:g}", sub_status, shorter, continued, run_id, delta))
    missing = sorted(set(range(len(cells))) - {r["cell"] for r in rows})
    if missing:
        log(f"warning: {len(missing)} grid cell(s) have no trial: {missing}")
    return sorted(rows, key=lambda r: r["cell"])


def continued_record(record: dict | None, q: float) -> dict | None:
    """The record a run with ``q_points`` kept for its shorter final fine-tuning of ``q``
    epochs (``record["continued"]``), if any."""
    for sub in (record or {}).get("continued") or []:
        if math.isclose(sub["config"]["prune"]["q"], q, rel_tol=1e-9):
            return sub
    return None


def _meta(cfg, session, cells: list[dict]) -> dict:
    from trainables.cli.compose import config_task, configs_of

    prune, finetune, _, _ = configs_of(cfg)
    return {"model": cfg.model.name, "data": cfg.data.name + (f" ({cfg.subset})" if cfg.get("subset") else ""),
            "level": "ratio" if cfg.study.get("ratios") is not None else "target_flops_reduction",
            # stored as a fraction like every score in runs.parquet; the config and the report say points
            "metric": cfg.study.metric, "margin": cfg.study.margin / 100, "confidence": cfg.study.confidence,
            "recovery_delta": finetune.recovery_delta, "p": prune.p, "q": prune.q, "lr": finetune.lr,
            "schedule": prune.schedule, "base_val_acc": session.base_val_acc, "base_flops": session.base_flops,
            "n_cells": len(cells), "base_seed": cfg.seed, "score": config_task(cfg).score_name,
            "base_seeds": base_seeds(cfg), "base_val_accs": {str(k): v for k, v in getattr(session, "base_val_accs", {}).items()},
            "budgets": [float(b) for b in cfg.study.budgets], "budget_scales": cfg.study.get("budget_scales", "pq"),
            "continue_budgets": bool(cfg.study.get("continue_budgets", False))}


def finish_study(cfg, out: Path, session, results, cells: list[dict], log=print) -> dict:
    """Rows, ``runs.parquet``, the report and figures, and the parent MLflow run's summary."""
    from search.results import trial_ids
    from search.study_report import write_report, write_runs

    tracker = session.tracker
    orphans = tracker.drop_orphans(trial_ids(results))
    if orphans:
        log(f"deleted {len(orphans)} MLflow run(s) of trials the resumed study never knew: {', '.join(orphans)}")
    tracker.finalize_dangling()
    from trainables.cli.compose import configs_of

    rows = _rows(results, session, cells, configs_of(cfg)[1].recovery_delta, log, trial_cells(cfg, cells))
    write_runs(rows, out / "runs.parquet", _meta(cfg, session, cells))
    report = write_report(out / "runs.parquet")
    counts = {s: sum(r["status"] == s for r in rows) for s in ("COMPLETED", "FAILED", "INCOMPLETE")}
    paired = report["paired"]
    tracker.finish_search(
        {"n_runs": len(rows), "n_completed": counts["COMPLETED"],
         # BH-adjusted, as the report's verdicts
         "n_better_than_random": sum(r["q"] < 1 - cfg.study.confidence and r["diff"] > 0 for r in paired),
         "n_equivalent_to_random": sum(r["equivalent"] for r in paired)},
        [out / "runs.parquet", out / "config.yaml", *report["files"]],
    )
    log(f"runs: {counts['COMPLETED']} completed, {counts['FAILED']} failed, {counts['INCOMPLETE']} incomplete")
    log(f"report: {out / 'report.md'}")
    return {"rows": rows, **report}


def main(argv: list[str] | None = None) -> int:
    from search._session import start_search
    from search.launch import _output_folder
    from trainables.cli import cli_config
    from trainables.cli.compose import configs_of

    cfg, code = cli_config(__doc__, argv, load_study_config, config_name="study")
    if cfg is None:
        return code
    t0 = time.perf_counter()
    out = _output_folder(cfg)
    session = start_search(cfg, out)
    session.ctx.evaluate_test = True  # a study reads test at the end of each run; a search never does
    session.ctx.pretrain = asdict(configs_of(cfg)[3])  # the scratch baseline trains with the base model's recipe
    import ray

    try:
        cells = grid_cells(cfg)
        bases, session.base_val_accs = _base_models(cfg, session)
        trials = trial_cells(cfg, cells)
        shared = f" in {len(trials)} trials (study.continue_budgets)" if len(trials) < len(cells) else ""
        print(f"study grid: {len(cells)} runs{shared}")
        results = _tuner(cfg, session, cells, bases, trials).fit()
        finish_study(cfg, out, session, results, cells)
    finally:
        if session.owns_ray:
            ray.shutdown()
    print(f"wall time: {time.perf_counter() - t0:.0f}s")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
