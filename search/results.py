"""After the search: one row per trial, the Pareto front, test accuracy of the front only,
the pruned models of the front in MLflow, ``trials.parquet``, ``pareto.png`` and the table."""

from __future__ import annotations

import json
from collections.abc import Callable, Hashable
from functools import lru_cache
from pathlib import Path
from typing import Any

from search.pareto import (
    FINETUNED_COLUMNS,
    SCORE_LABELS,
    check_objective,
    format_front,
    format_report,
    front_rows,
    hypervolume,
    mark_pareto,
    plot_front,
    write_trials,
)

__all__ = ["trial_ids", "trial_rows", "finish_search"]


def _status(result) -> str:
    if result.error is not None:
        return "FAILED"
    return "COMPLETED" if (result.metrics or {}).get("trial_done") else "STOPPED_EARLY"


def _ratios(result, session, config: dict) -> list[float]:
    """The ratios the trial applied: from its final record (which includes any FLOPs-target
    scaling), else (a trial stopped before the end) as its config's schedule gives them."""
    from trainables.protocol.schedules import make_ratios
    from trainables.ray_trainable import read_trial_record, trial_configs

    record = read_trial_record(result.checkpoint)
    if record is not None:
        return [float(r) for r in record["ratios"]]
    prune, _, _ = trial_configs(session.ctx, config)
    if prune.schedule == "global":  # its ratios come from the criterion's scores: only its record knows them
        return []
    ctx = session.ctx
    return make_ratios(prune.schedule, _unit_filters(ctx.model_name, ctx.num_classes, json.dumps(ctx.model_kwargs),
                                                     prune.units),
                       ratio=prune.ratio, ratio_low=prune.ratio_low, ratio_high=prune.ratio_high,
                       ratios=prune.ratios)


@lru_cache(maxsize=4)
def _unit_filters(model_name: str, num_classes: int, model_kwargs: str, part: str = "all") -> tuple[int, ...]:
    """The base model's filter count per pruned unit (``prune.units``), input to output (the
    differential schedule reads them); from the architecture alone, built once per search."""
    from trainables.core.models import build_model
    from trainables.core.surgery import describe_units, select_units

    model = build_model(model_name, num_classes=num_classes, **json.loads(model_kwargs))
    return tuple(u.n_filters for u in select_units(model, describe_units(model), part))


def trial_ids(results) -> list[str]:
    """The Tune trial id of every result of a ResultGrid, in order.

    A Result carries its trial id only in its metrics, which a trial that failed before its
    first report does not have. Both a Result and its Trial know the trial's folder, so the
    public ``ExperimentAnalysis`` of the same experiment pairs each result with its trial id.
    """
    from ray.tune import ExperimentAnalysis

    by_path = {t.path: t.trial_id for t in ExperimentAnalysis(results.experiment_path).trials}
    missing = [r.path for r in results if r.path not in by_path]
    if missing:
        raise RuntimeError(f"no trial of {results.experiment_path} has the folder {missing[0]}; cannot pair them")
    return [by_path[r.path] for r in results]


def _share_removed(ratios: list[float], ctx, units: str) -> float | None:
    """The share of all pruned units' filters removed: the per-unit ratios weighted by the base
    model's filter counts (None when the ratios are unknown, e.g. a global schedule stopped early)."""
    filters = _unit_filters(ctx.model_name, ctx.num_classes, json.dumps(ctx.model_kwargs), units)
    if not ratios or len(ratios) != len(filters):
        return None
    return sum(r * n for r, n in zip(ratios, filters, strict=True)) / sum(filters)


def trial_rows(results, session, tracker_run_ids: dict[str, str], commands=None) -> list[dict]:
    """Plain rows (the trials.parquet schema) from a Tune ResultGrid; ``commands``
    (a :class:`search.command.RunCommand`) fills each row's rebuilding command."""
    from search.command import searched_keys
    from trainables.ray_trainable import trial_configs

    rows = []
    for trial_id, result in zip(trial_ids(results), results, strict=True):
        m = result.metrics or {}
        config = dict(result.config or {})
        config = dict(config.get("front_config", config))  # a front fine-tuning trial re-runs a searched config
        prune, finetune, measure = trial_configs(session.ctx, config)
        ratios = _ratios(result, session, config)
        flops = m.get("flops")
        rows.append({
            "trial_id": trial_id, "status": _status(result), "criterion": prune.criterion,
            "schedule": prune.schedule, "method": prune.method,
            "prune_ratio": _share_removed(ratios, session.ctx, prune.units), "prune_ratios": ratios,
            "p": prune.p, "q": prune.q, "lr": finetune.lr, "val_acc": m.get("val_acc"), "test_acc": None,
            "flops": int(flops) if flops is not None else None, "params": m.get("params"),
            # the serial re-timing fills latency_ms (see _retime); latency_ms_trial is the trial's own
            "latency_ms": None, "latency_ms_trial": m.get("latency_ms"), "latency_device": None,
            "flops_kept": flops / session.base_flops if flops is not None else None,
            "params_kept": m["params"] / session.base_params if m.get("params") and session.base_params else None,
            "mlflow_run_id": tracker_run_ids.get(trial_id), "wall_s": m.get("time_total_s"),
            "node_id": m.get("node_id"), "node_ip": m.get("node_ip"),  # where its last result came from
            "config_json": json.dumps(searched_keys(config), default=str),
            "command": None if commands is None else commands.command(prune, finetune, measure,
                                                                      int(config.get("seed", session.ctx.seed)), config),
            "_config": config,  # as Tune sampled it: what a full-fidelity re-run is given
            "_checkpoint": result.checkpoint,
        })
    return rows


def _retime(cfg, rows: list[dict], session, log, cost: str = "flops") -> tuple[dict[str, float], list[str]]:
    """Latency of the completed trials' models chosen by ``search.retime.scope``, re-timed one
    at a time on the node each trial ran on (search.retime): fills ``latency_ms``,
    ``latency_kept`` and ``latency_device``; returns the summary metrics and the devices."""
    from search._session import retime_settings
    from search.retime import retime_on_nodes, select_for_retiming

    done = [r for r in rows if r["status"] == "COMPLETED" and r["_checkpoint"] is not None]
    if not cfg.measure.latency or not done:
        return {}, []
    settings = retime_settings(cfg)
    chosen = set(select_for_retiming(done, cost, scope=settings["scope"], layers=settings["layers"],
                                     all_up_to=settings["all_up_to"]))
    groups = _node_groups([r for r in done if r["trial_id"] in chosen])
    rounds = settings["rounds"]
    log(f"re-timing {len(chosen)} models serially where their trials ran ({len(groups)} node(s), {rounds} "
        f"interleaved rounds against the base on each) ...")
    skipped = [r["trial_id"] for r in done if r["trial_id"] not in chosen]
    if skipped:
        log(f"  re-timed (the first {settings['layers']} non-dominated layers, search.retime.scope="
            f"{settings['scope']}): {', '.join(sorted(chosen))}")
        log(f"  {len(skipped)} other completed trial(s) keep only latency_ms_trial (latency_ms empty): "
            f"{_few(skipped)}")
    timings = retime_on_nodes(groups, session.ctx, log=log, input_shape=session.splits.input_shape,
                              batch_size=cfg.measure.batch_size, threads=cfg.measure.threads or cfg.trial_threads,
                              rounds=rounds, repeats=cfg.measure.repeats, warmup=cfg.measure.warmup,
                              seed=cfg.search.seed)
    by_id = {r["trial_id"]: r for r in done}
    out: dict[str, float] = {}
    for node, timing in timings.items():
        timed = timing.timed
        for trial_id in timed.latency_ms:
            row = by_id[trial_id]
            row.update(latency_ms=timed.latency_ms[trial_id], latency_kept=timed.latency_kept[trial_id],
                       latency_device=timing.device)
        rho = timed.halves_spearman
        log(f"latency on {timing.device} (node {timing.node_id[:12]}): base {timed.base_ms:.2f} ms per batch of "
            f"{cfg.measure.batch_size}; {len(timed.latency_ms)} models in {timing.seconds:.1f} s; rank agreement "
            f"of two half-timings: {'n/a (< 3 models)' if rho is None else f'Spearman rho {rho:.3f}'}")
        suffix = "" if len(timings) == 1 else f"/{node[:12]}"  # one node: the names a single-node search has
        out[f"base_latency_ms{suffix}"] = timed.base_ms
        if rho is not None:
            out[f"latency_halves_spearman{suffix}"] = rho
    if len(timings) > 1:  # the plot's base: the node that timed the most models
        out["base_latency_ms"] = max(timings.values(), key=lambda t: len(t.timed.latency_ms)).timed.base_ms
    devices = sorted({t.device for t in timings.values()})
    if len(devices) > 1:
        log(f"warning: models were timed on {len(devices)} kinds of device; latency_ms of different devices do "
            "not compare, latency_kept (each to the base on the same device) does")
    return out, devices


def _node_groups(rows: list[dict]) -> dict[str, list[tuple]]:
    """``node id -> [(trial id, checkpoint)]``: where each trial ran (a row without a node id,
    e.g. a result from before node ids were recorded, is timed on the driver's node)."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    groups: dict[str, list[tuple]] = {}
    for row in rows:
        groups.setdefault(row.get("node_id") or here, []).append((row["trial_id"], row["_checkpoint"]))
    return groups


def _few(ids: list[str], shown: int = 10) -> str:
    return ", ".join(ids[:shown]) + (f", ... ({len(ids) - shown} more)" if len(ids) > shown else "")


def _trial_model(row: dict, ctx) -> tuple:
    """``(model, record)`` of a trial's final checkpoint, rebuilt once (pruning a large model
    unit by unit takes seconds) and kept in the row for the re-timing and the front."""
    if "_loaded" not in row:
        from trainables.ray_trainable import load_trial_model

        with row["_checkpoint"].as_directory() as d:
            row["_loaded"] = load_trial_model(ctx, d)
    return row["_loaded"]


def _log_latency(rows: list[dict], tracker) -> None:
    """The serial re-timings on each child run as ``latency_ms`` and ``latency_kept`` (and the
    tag ``latency_device``), beside the trial's own timing (``latency_ms_trial``): the same
    names as in trials.parquet."""
    for row in rows:
        if row["mlflow_run_id"] and row.get("latency_kept") is not None:
            tracker.client.log_metric(row["mlflow_run_id"], "latency_ms", row["latency_ms"])
            tracker.client.log_metric(row["mlflow_run_id"], "latency_kept", row["latency_kept"])
            tracker.client.set_tag(row["mlflow_run_id"], "latency_device", row["latency_device"])


def _log_commands(rows: list[dict], tracker) -> None:
    """Each child run's tag ``command``: the ``python -m trainables.run`` line that rebuilds it."""
    for row in rows:
        if row["mlflow_run_id"] and row.get("command"):
            tracker.set_command(row["trial_id"], row["command"])


def _evaluate_front(rows: list[dict], session, log) -> None:
    """Test accuracy and an MLflow model for the Pareto-optimal trials only."""
    import torch

    from data import iterate_batches
    from trainables.protocol.tasks import task_of

    front = [r for r in rows if r["pareto"]]
    if not front:
        return
    splits = session.splits  # loaded once by the driver in start_search
    for row in front:
        ckpt = row["_checkpoint"]
        if ckpt is None:
            continue
        model, record = _trial_model(row, session.ctx)
        with ckpt.as_directory() as d:
            record_file = Path(d) / "record.json"
            if record_file.exists():
                session.tracker.log_artifact(row["trial_id"], record_file)
        task = task_of(model)  # top-1, mAP@0.5 or mIoU (trainables.protocol.tasks)
        batches = iterate_batches(splits.test, task.eval_batch_size, shuffle=False, num_workers=splits.num_workers)
        test = task.evaluate(model, batches, classes=splits.eval_classes)
        row["test_acc"] = test["score"]
        example = torch.zeros(2, *splits.input_shape)
        ctx = session.ctx  # what rebuilds the architecture the prune log applies to (rebuild_pruned)
        built = {"name": ctx.model_name, "kwargs": ctx.model_kwargs, "num_classes": ctx.num_classes}
        session.tracker.log_pruned_model(row["trial_id"], model, example,
                                         {**record, "final_test_acc": test["score"], "architecture": built})
        log(f"front trial {row['trial_id']}: test {SCORE_LABELS.get(task.score_name, task.score_name)} "
            f"{100 * test['score']:.2f}%, model logged to MLflow")


def _run_ids(results, tracker) -> dict[str, str | None]:
    """Trial id -> its MLflow child run id (None for a trial that never started)."""
    return {t: tracker.find_run(t) for t in trial_ids(results)}


def pick_for_finetuning(rows: list[dict], n: int, signature: Callable[[dict], Hashable] | None = None,
                        log: Callable[[str], None] | None = None) -> list[dict]:
    """The ``n`` completed trials with the best proxy accuracy, Pareto-optimal ones first (with
    a fixed FLOPs target the front is often a single trial), one per candidate: a trial that
    keeps the same filters in every unit as a better one (``search.blend.dedupe``; by default
    read from its record) is skipped for the next distinct trial, so no candidate is
    fine-tuned twice."""
    from search.blend.dedupe import distinct, trial_signature

    done = [r for r in rows if r["status"] == "COMPLETED" and r["val_acc"] is not None]
    done.sort(key=lambda r: (not r["pareto"], -r["val_acc"], r["flops"] or 0))
    return distinct(done, n, signature or trial_signature, log=log)


def _finetune_best(cfg, out: Path, session, rows: list[dict], finetune, log, commands=None,
                   score: str = "accuracy") -> tuple[list[dict], list[Path], dict]:
    """Fine-tune the best proxy trials at full fidelity, test them, write ``finetuned.parquet``."""
    from dataclasses import replace

    picked = pick_for_finetuning(rows, int(cfg.search.finetune_front), log=log)
    if not picked:
        return [], [], {}
    log(f"fine-tuning the {len(picked)} best proxy trials at full fidelity: {', '.join(r['trial_id'] for r in picked)}")
    configs = [r["_config"] for r in picked]
    results = finetune(configs)
    full = replace(session, ctx=replace(session.ctx, prune=session.full_prune))
    ft_rows = trial_rows(results, full, _run_ids(results, session.tracker), commands)
    by_config = {json.dumps(r["_config"], sort_keys=True, default=str): r for r in picked}
    for row in ft_rows:
        source = by_config.get(json.dumps(row["_config"], sort_keys=True, default=str), {})
        row["proxy_trial_id"], row["proxy_val_acc"] = source.get("trial_id"), source.get("val_acc")
        row["pareto"] = row["status"] == "COMPLETED"  # evaluated on test and logged as models, like a front
    _evaluate_front(ft_rows, full, log)
    if cfg.search.get("export"):  # a proxy search deploys what it fine-tuned, not its proxy front
        _export(cfg, out, full, [r for r in ft_rows if r["pareto"]], log)
    for row in ft_rows:
        if row["mlflow_run_id"]:
            session.tracker.set_pareto(row["trial_id"], False)
            session.tracker.client.set_tag(row["mlflow_run_id"], "fidelity", "full")
    _log_commands(ft_rows, session.tracker)
    plain = [{k: v for k, v in r.items() if not k.startswith("_")} for r in ft_rows]
    write_trials(plain, out / "finetuned.parquet", FINETUNED_COLUMNS)
    table = format_front(plain, score=score)
    (out / "finetuned.txt").write_text(table + "\n")
    metrics = {}
    pairs = [(r["proxy_val_acc"], r["val_acc"]) for r in plain if r["val_acc"] is not None and r["proxy_val_acc"] is not None]
    if len(pairs) >= 3:
        from scipy.stats import spearmanr

        rho = spearmanr(*zip(*pairs, strict=True)).statistic
        metrics["proxy_vs_finetuned_spearman"] = float(rho)
    best = max((r for r in plain if r["val_acc"] is not None), key=lambda r: r["val_acc"], default=None)
    if best is not None:
        metrics.update(finetuned_best_val_acc=best["val_acc"], finetuned_best_test_acc=best["test_acc"] or float("nan"))
    log("")
    log(f"fine-tuned at full fidelity (val/test {score} after fine-tuning; proxy val_acc in finetuned.parquet):")
    log(table)
    return plain, [out / "finetuned.parquet", out / "finetuned.txt"], metrics


def _score_label(cfg) -> str:
    """What the task's headline score is called (accuracy, mAP@0.5, mIoU)."""
    from trainables.cli.compose import config_task

    name = config_task(cfg).score_name
    return SCORE_LABELS.get(name, name)


def _run_command(cfg, log):
    """The search's :class:`search.command.RunCommand`, or None (said in one line) when its
    config cannot be written as a ``trainables.run`` command line."""
    from search.command import RunCommand

    try:
        return RunCommand(cfg)
    except ValueError as err:
        log(f"warning: no rebuilding command for the trials ({err})")
        return None


def _export(cfg, out: Path, session, rows: list[dict], log) -> None:
    """``search.export=[onnx, pt2]``: each row's pruned model under ``<out>/export/<trial id>/``,
    logged to its MLflow run."""
    from search.export_front import export_front

    models = [(r["trial_id"], _trial_model(r, session.ctx)[0]) for r in rows if r["_checkpoint"] is not None]
    export_front(models, out / "export", list(cfg.search.export), session.splits.input_shape, log, session.tracker)


def finish_search(cfg, out: Path, session, results, log=print, finetune=None) -> dict[str, Any]:
    tracker = session.tracker
    orphans = tracker.drop_orphans(trial_ids(results))
    if orphans:
        log(f"deleted {len(orphans)} MLflow run(s) of trials the resumed search never knew "
            f"(killed before Tune saved them; restorable): {', '.join(orphans)}")
    run_ids = _run_ids(results, tracker)
    tracker.finalize_dangling()
    from search._session import objective_of

    objective = objective_of(cfg)
    cost, cost_kept, _ = check_objective(objective)
    score = _score_label(cfg)
    commands = _run_command(cfg, log)
    rows = trial_rows(results, session, run_ids, commands)
    latency_summary, devices = _retime(cfg, rows, session, log, cost)
    _log_latency(rows, tracker)
    if devices:
        tracker.client.set_tag(session.parent_run_id, "latency_device", "; ".join(devices))
    _log_commands(rows, tracker)
    rows = mark_pareto(rows, cost)
    _evaluate_front(rows, session, log)
    if cfg.search.get("export") and finetune is None:  # the front's pruned models for deployment
        _export(cfg, out, session, [r for r in rows if r["pareto"]], log)
    for row in rows:
        if row["mlflow_run_id"]:
            tracker.set_pareto(row["trial_id"], row["pareto"])
    ref_cfg = cfg.search.reference_point
    # cost_kept; a search saved before the rename named it cost_ratio (or flops_ratio)
    ref = (ref_cfg.val_acc, ref_cfg.get("cost_kept", ref_cfg.get("cost_ratio", ref_cfg.get("flops_ratio", 1.0))))
    front = front_rows(rows, cost)
    hv = hypervolume([(r["val_acc"], r[cost_kept]) for r in front], ref)
    plain = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    write_trials(plain, out / "trials.parquet")
    base_cost = {"flops": session.base_flops, "params": session.base_params,
                 "latency": latency_summary.get("base_latency_ms")}[objective]
    plot_front(plain, out / "pareto.png", base_acc=session.base_val_acc, objective=objective, base_cost=base_cost,
               score=score, title=f"{cfg.model.name} on {cfg.data.name}: {len(plain)} trials, "
               f"hypervolume {hv:.4f} (val {score} vs {cost_kept})")
    report = format_report(plain, hv, objective, ref, score)
    (out / "pareto.txt").write_text(report + "\n")
    counts = {s: sum(r["status"] == s for r in plain) for s in ("COMPLETED", "STOPPED_EARLY", "FAILED")}
    log("")
    log(report)
    ft_rows, ft_files, ft_metrics = (_finetune_best(cfg, out, session, rows, finetune, log, commands, score)
                                     if finetune else ([], [], {}))
    tracker.client.set_tag(session.parent_run_id, "objectives", f"val_acc,{objective}")
    tracker.finish_search({"hypervolume": hv, "n_completed": counts["COMPLETED"], "n_trials": len(plain),
                           **latency_summary, **ft_metrics},
                          [out / "trials.parquet", out / "pareto.png", out / "pareto.txt", out / "config.yaml",
                           *ft_files, *session.artifacts])
    log(f"trials: {counts['COMPLETED']} completed, {counts['STOPPED_EARLY']} stopped early by ASHA, {counts['FAILED']} failed")
    log(f"hypervolume: {hv:.4f} (val {score} vs {cost_kept}; reference point: val_acc={ref[0]}, {cost_kept}={ref[1]})")
    from search._session import mlflow_ui_command

    if "proxy_vs_finetuned_spearman" in ft_metrics:
        log(f"proxy vs fine-tuned accuracy, Spearman rho over {len(ft_rows)} trials: {ft_metrics['proxy_vs_finetuned_spearman']:.3f}")
    log(f"MLflow UI:     {mlflow_ui_command(tracker.tracking_uri)}")
    log(f"then open:     {tracker.ui_url()}")
    log(f"output folder: {out}")
    return {"rows": plain, "hypervolume": hv, "counts": counts, "finetuned": ft_rows}
