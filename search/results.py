"""After the search: one row per trial, the Pareto front, test accuracy of the front only,
the pruned models of the front in MLflow, ``trials.parquet``, ``pareto.png`` and the table."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from search.pareto import (
    format_front,
    front_rows,
    hypervolume,
    mark_pareto,
    plot_front,
    write_trials,
)

__all__ = ["trial_rows", "finish_search"]


def _status(result) -> str:
    if result.error is not None:
        return "FAILED"
    return "COMPLETED" if (result.metrics or {}).get("trial_done") else "STOPPED_EARLY"


def _ratios(config: dict, n_units: int) -> list[float]:
    from trainables.schedules import make_ratios

    if config.get("schedule") == "per_layer" or "ratio_0" in config:
        return [float(config[f"ratio_{i}"]) for i in range(n_units)]
    if config.get("schedule") == "differential":
        return make_ratios("differential", n_units, ratio_low=config["ratio_low"], ratio_high=config["ratio_high"])
    return [float(config.get("ratio", math.nan))] * n_units


def trial_rows(results, session, tracker_run_ids: dict[str, str]) -> list[dict]:
    """Plain rows (the trials.parquet schema) from a Tune ResultGrid."""
    rows = []
    for result in results:
        m = result.metrics or {}
        config = dict(result.config or {})
        trial_id = m.get("trial_id") or Path(result.path).name
        flops = m.get("flops")
        rows.append({
            "trial_id": trial_id, "status": _status(result), "criterion": config.get("criterion"),
            "schedule": config.get("schedule"), "method": session.ctx.prune.get("method"),
            "ratios": _ratios(config, session.n_units), "p": config.get("p"), "q": config.get("q"),
            "lr": config.get("lr"), "val_acc": m.get("val_acc"), "test_acc": None,
            "flops": int(flops) if flops is not None else None, "params": m.get("params"),
            "latency_ms": m.get("latency_ms"),
            "flops_ratio": flops / session.base_flops if flops is not None else None,
            "mlflow_run_id": tracker_run_ids.get(trial_id), "wall_s": m.get("time_total_s"),
            "config_json": json.dumps(config, default=str),
            "_checkpoint": result.checkpoint,
        })
    return rows


def _evaluate_front(rows: list[dict], session, log) -> None:
    """Test accuracy and an MLflow model for the Pareto-optimal trials only."""
    import torch

    from data import iterate_batches
    from trainables.metrics import evaluate
    from trainables.ray_trainable import load_trial_model

    front = [r for r in rows if r["pareto"]]
    if not front:
        return
    splits = session.splits  # loaded once by the driver in start_search
    for row in front:
        ckpt = row["_checkpoint"]
        if ckpt is None:
            continue
        with ckpt.as_directory() as d:
            model, record = load_trial_model(session.ctx, d)
            record_file = Path(d) / "record.json"
            if record_file.exists():
                session.tracker.log_artifact(row["trial_id"], record_file)
        test = evaluate(model, iterate_batches(splits.test, 1000, shuffle=False), classes=splits.eval_classes)
        row["test_acc"] = test["top1"]
        example = torch.zeros(2, *splits.input_shape)
        session.tracker.log_pruned_model(row["trial_id"], model, example, {**record, "final_test_acc": test["top1"]})
        log(f"front trial {row['trial_id']}: test acc {100 * test['top1']:.2f}%, model logged to MLflow")


def finish_search(cfg, out: Path, session, results, log=print) -> dict[str, Any]:
    tracker = session.tracker
    run_ids = {}
    for result in results:
        trial_id = (result.metrics or {}).get("trial_id")
        if trial_id:
            run_ids[trial_id] = tracker.find_run(trial_id)
    tracker.finalize_dangling()
    rows = mark_pareto(trial_rows(results, session, run_ids))
    _evaluate_front(rows, session, log)
    for row in rows:
        if row["mlflow_run_id"]:
            tracker.set_pareto(row["trial_id"], row["pareto"])
    ref = (cfg.search.reference_point.val_acc, cfg.search.reference_point.flops_ratio)
    front = front_rows(rows)
    hv = hypervolume([(r["val_acc"], r["flops_ratio"]) for r in front], ref)
    plain = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    write_trials(plain, out / "trials.parquet")
    plot_front(plain, out / "pareto.png", base_flops=session.base_flops, base_acc=session.base_val_acc,
               title=f"{cfg.model.name} on {cfg.data.name}: {len(plain)} trials, HV={hv:.4f}")
    table = format_front(plain)
    (out / "pareto.txt").write_text(table + "\n")
    counts = {s: sum(r["status"] == s for r in plain) for s in ("COMPLETED", "STOPPED_EARLY", "FAILED")}
    tracker.finish_search({"hypervolume": hv, "n_completed": counts["COMPLETED"], "n_trials": len(plain)},
                          [out / "trials.parquet", out / "pareto.png", out / "pareto.txt", out / "config.yaml"])
    log("")
    log(table)
    log(f"trials: {counts['COMPLETED']} completed, {counts['STOPPED_EARLY']} stopped early by ASHA, {counts['FAILED']} failed")
    log(f"hypervolume: {hv:.4f} (reference: val_acc={ref[0]}, FLOPs ratio={ref[1]})")
    from search._session import mlflow_ui_command

    log(f"MLflow UI:     {mlflow_ui_command(tracker.tracking_uri)}")
    log(f"output folder: {out}")
    return {"rows": plain, "hypervolume": hv, "counts": counts}
