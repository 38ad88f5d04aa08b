"""When does random pruning catch up? The study's budget grid, run cell by cell in plain processes.

Issue 23's evidence: ``python -m search.study`` with ``study.budgets`` and ``study.base_seeds``
runs the same cells through Ray Tune. On the shared 2-core machine Ray's trial workers run at
nice 15 and starve behind every other job, so this script runs the very same cells
(``search.study.grid_cells``) with the very same protocol (``trainables.protocol.stages.run_protocol``,
the configs the study's trainable builds) in ordinary processes, one record per cell on disk so
that a stopped run resumes, and writes ``runs.parquet`` and the report with the study's own
``run_row`` / ``write_runs`` / ``write_report``. No MLflow, no checkpoints inside a run.

    # two workers (one per core), then the report of whatever finished
    python bench/budget_study.py --out outputs/budget-study --worker 0/2 -- 'study.budgets=[0.25,1,4]' ... &
    python bench/budget_study.py --out outputs/budget-study --worker 1/2 -- 'study.budgets=[0.25,1,4]' ... &
    wait; python bench/budget_study.py --out outputs/budget-study --report -- 'study.budgets=[0.25,1,4]' ...

Cells run seed-first (every budget and base of seed 0, then seed 1, ...), so a run stopped at
a deadline has whole seeds of every comparison rather than all seeds of a few.

A grid that only adds criteria, ratios, budgets or the control to a finished one need not run
the shared cells again: ``--reuse <earlier --out>`` copies every finished cell whose settings
(arm, criterion, ratio, seed, base, budget, p, q, ...) equal one of this grid's, under this
grid's cell number. On CPU a cell is deterministic (same seed, same record but its wall time),
so a reused cell is the run this grid would have made.

    python bench/budget_study.py --out outputs/wider --reuse outputs/budget-study -- 'study.budgets=[0.25,1,4,16]' ...

With ``study.continue_budgets=true`` (and ``study.budget_scales=q``, ``finetune.anneal_final=false``)
the budgets of a cell are one run to the longest, written as one file per budget.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _cells(cfg) -> list[dict]:
    from search.study import grid_cells

    cells = [{**c, "cell": i} for i, c in enumerate(grid_cells(cfg))]
    return sorted(cells, key=lambda c: (c["seed"], c["base_seed"], c["budget"], c["cell"]))


def _base(cfg, seed: int):
    from omegaconf import open_dict

    from trainables.cli.base_model import prepare

    other = cfg.copy()
    with open_dict(other):
        other.seed = seed
    model, splits, path, meta = prepare(other, log=lambda *_: None)
    return model, splits, float(meta.get("val_acc", float("nan"))), path


def run_cells(cfg, out: Path, worker: int, workers: int) -> int:
    """Run this worker's share of the cells not yet on disk (``out/cells/<cell>.json``); with
    ``study.continue_budgets`` one run per cell group, written as every budget's cell. Returns
    the number of protocol runs made."""
    import copy

    import torch

    from search.study import continued_record, trial_cells
    from trainables.cli.compose import configs_of
    from trainables.protocol.config import MeasureConfig, PruneConfig
    from trainables.protocol.stages import run_protocol

    torch.set_num_threads(int(cfg.trial_threads or 1))
    prune0, finetune, _, _ = configs_of(cfg)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    bases: dict[int, tuple] = {}
    cells = _cells(cfg)
    by_number = {c["cell"]: c for c in cells}
    trials = trial_cells(cfg, [by_number[i] for i in range(len(cells))])
    mine = [c for c in cells if c["cell"] in trials]
    mine = [c for i, c in enumerate(mine) if i % workers == worker]
    runs = 0
    for cell in mine:
        shorter = [by_number[k] for k in trials[cell["cell"]]]
        paths = [out / "cells" / f"{c['cell']}.json" for c in [cell, *shorter]]
        if all(p.exists() for p in paths):
            continue
        if cell["base_seed"] not in bases:
            bases[cell["base_seed"]] = _base(cfg, cell["base_seed"])
        base, splits, _, _ = bases[cell["base_seed"]]
        prune = PruneConfig(**{**asdict(prune0), **{k: v for k, v in cell.items() if k in asdict(prune0)}})
        t0 = time.perf_counter()
        record = run_protocol(copy.deepcopy(base), splits, prune, finetune, measure=MeasureConfig(latency=False),
                              seed=cell["seed"], evaluate_test=True, q_points=[c["q"] for c in shorter],
                              config={"trial": cell, "prune": asdict(prune), "finetune": asdict(finetune)})
        records = [record, *(continued_record(record, c["q"]) for c in shorter)]
        record.pop("continued", None)
        runs += 1
        for c, rec, path in zip([cell, *shorter], records, paths, strict=True):
            rec.pop("prune_log", None)  # the kept indices per unit are in record["units"]
            rec["config"]["trial"] = c  # a continued record carries the longest cell's trial config otherwise
            path.write_text(json.dumps({"cell": c, "record": rec}))
            print(f"cell {c['cell']}: {c['arm']} seed {c['seed']} base {c['base_seed']} budget {c['budget']:g}: "
                  f"test {rec['final_test_acc']:.4f} in {time.perf_counter() - t0:.0f}s", flush=True)
    return runs


def _settings(cell: dict) -> str:
    return json.dumps({k: v for k, v in cell.items() if k != "cell"}, sort_keys=True)


def reuse_cells(cfg, out: Path, earlier: Path) -> int:
    """Copy the finished cells of ``earlier`` whose settings are cells of this grid into ``out``
    (renumbered); cells already in ``out`` stay. Returns how many were copied."""
    if not (earlier / "cells").is_dir():
        raise FileNotFoundError(f"--reuse {earlier}: no cells/ folder there (give an earlier --out)")
    wanted = {_settings(c): c for c in _cells(cfg)}
    (out / "cells").mkdir(parents=True, exist_ok=True)
    copied = 0
    for path in sorted((earlier / "cells").glob("*.json")):
        done = json.loads(path.read_text())
        cell = wanted.get(_settings(done["cell"]))
        target = out / "cells" / f"{cell['cell']}.json" if cell is not None else None
        if target is not None and not target.exists():
            target.write_text(json.dumps({**done, "cell": cell}))
            copied += 1
    return copied


def report(cfg, out: Path) -> Path:
    """runs.parquet from the cells on disk (missing cells are left out and counted) and the report."""
    from search.study import base_seeds, run_row
    from search.study_report import write_report, write_runs
    from trainables.cli.compose import config_task, configs_of

    prune, finetune, _, _ = configs_of(cfg)
    rows = []
    for path in sorted((out / "cells").glob("*.json"), key=lambda p: int(p.stem)):
        done = json.loads(path.read_text())
        rows.append(run_row(f"cell{done['cell']['cell']}", "COMPLETED", done["cell"], done["record"], None,
                            finetune.recovery_delta))
    vals = {seed: _base(cfg, seed)[2] for seed in base_seeds(cfg)}
    meta = {"model": cfg.model.name, "data": cfg.data.name, "level": "ratio", "metric": cfg.study.metric,
            "margin": cfg.study.margin / 100, "confidence": cfg.study.confidence,
            "recovery_delta": finetune.recovery_delta, "p": prune.p, "q": prune.q, "lr": finetune.lr,
            "schedule": prune.schedule, "n_cells": len(_cells(cfg)), "base_seeds": base_seeds(cfg),
            "base_val_accs": {str(k): v for k, v in vals.items()}, "budgets": list(cfg.study.budgets),
            "score": config_task(cfg).score_name, "runner": "bench/budget_study.py (no Ray)",
            "budget_scales": cfg.study.get("budget_scales", "pq"),
            "continue_budgets": bool(cfg.study.get("continue_budgets", False))}
    write_runs(rows, out / "runs.parquet", meta)
    write_report(out / "runs.parquet")
    print(f"{len(rows)} of {len(_cells(cfg))} cells done")
    return out / "report.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--worker", default="0/1", help="k/n: run every n-th cell starting at k")
    parser.add_argument("--report", action="store_true", help="write runs.parquet and report.md from the cells done")
    parser.add_argument("--reuse", type=Path, help="an earlier --out: copy its finished cells that this grid shares")
    parser.add_argument("overrides", nargs="*", help="search.study overrides (after --)")
    args = parser.parse_args(argv)
    from search.study import load_study_config

    try:
        k, n = (int(v) for v in args.worker.split("/"))
        if not 0 <= k < n:
            raise ValueError
    except ValueError:
        print(f"error: --worker must be k/n with 0 <= k < n, but got {args.worker!r}", file=sys.stderr)
        return 2
    cfg = load_study_config(args.overrides)
    if args.report:
        print(report(cfg, args.out))
    else:
        if args.reuse is not None:
            try:
                copied = reuse_cells(cfg, args.out, args.reuse)
            except FileNotFoundError as err:
                print(f"error: {err}", file=sys.stderr)
                return 2
            print(f"reused {copied} finished cell(s) of {args.reuse}", flush=True)
        run_cells(cfg, args.out, k, n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
