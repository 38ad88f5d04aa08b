"""A budget sweep continued vs run from the start: what study.continue_budgets saves, and whether
its numbers are the same.

The same study cells (``search.study.grid_cells``: random and l1 at one ratio, budgets
0.25x, 1x, 4x of ``prune.q`` with ``study.budget_scales=q`` and a constant final learning rate)
run twice with ``bench/budget_study.py``'s runner in this process, one thread: every cell from
the start, then each criterion's budgets as one continued run (``study.continue_budgets=true``).
The base model is trained (or loaded from the cache) before either clock starts. Prints the
wall time, the optimiser steps trained and how many cells have the very same record (all keys
but the wall time), and with ``--write`` replaces its section of bench/RESULTS.md.

    python bench/continue_budgets.py --write
    python bench/continue_budgets.py --out /tmp/cb -- 'study.budgets=[0.5,1,2,8]' study.seeds=[0,1]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.budget_study import _base, run_cells  # noqa: E402
from bench.report import BenchRun  # noqa: E402

SECTION = "## Budget sweeps: continued vs from the start"
GRID = ["study.criteria=[random,l1]", "study.ratios=[0.6]", "study.seeds=[0]", "study.control=false",
        "study.budgets=[0.25,1,4]", "study.budget_scales=q", "finetune.anneal_final=false"]


def _records(folder: Path) -> dict[int, dict]:
    return {int(p.stem): json.loads(p.read_text())["record"] for p in (folder / "cells").glob("*.json")}


def _same(a: dict, b: dict) -> bool:
    return {k: v for k, v in a.items() if k != "wall_s"} == {k: v for k, v in b.items() if k != "wall_s"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "continue-budgets",
                        help="work folder (emptied first)")
    parser.add_argument("--write", action="store_true", help="replace this benchmark's section of bench/RESULTS.md")
    parser.add_argument("overrides", nargs="*", help="more search.study overrides (after --)")
    args = parser.parse_args(argv)
    from search.study import grid_cells, load_study_config, trial_cells

    run = BenchRun(SECTION)
    fresh_cfg = load_study_config([*GRID, *args.overrides])
    cont_cfg = load_study_config([*GRID, *args.overrides, "study.continue_budgets=true"])
    for seed in {c["base_seed"] for c in grid_cells(fresh_cfg)}:
        _base(fresh_cfg, seed)  # trained or loaded before the clocks start
    shutil.rmtree(args.out, ignore_errors=True)
    walls, steps, runs, records = {}, {}, {}, {}
    for name, cfg in (("from the start", fresh_cfg), ("continued", cont_cfg)):
        t0 = time.perf_counter()
        runs[name] = run_cells(cfg, args.out / name.replace(" ", "-"), 0, 1)
        walls[name] = time.perf_counter() - t0
        trials = trial_cells(cfg, grid_cells(cfg))
        if runs[name] != len(trials):
            raise RuntimeError(f"{name}: {runs[name]} protocol runs, but the grid has {len(trials)} trials")
        records[name] = _records(args.out / name.replace(" ", "-"))
        steps[name] = sum(records[name][i]["curve"][-1]["step"] for i in trials)  # what each run trained, to its end
    fresh, cont = records["from the start"], records["continued"]
    same = sum(_same(fresh[i], cont[i]) for i in fresh)
    n_cells = len(grid_cells(fresh_cfg))
    rows = ["| budgets run | runs | optimiser steps trained | wall (s) |", "|---|---|---|---|"]
    rows += [f"| {name} | {runs[name]} | {steps[name]} | {walls[name]:.0f} |" for name in walls]
    ratio = walls["continued"] / walls["from the start"]
    budgets = ", ".join(f"{b:g}x" for b in fresh_cfg.study.budgets)
    body = "\n".join([
        "", f"{n_cells} cells ({', '.join(fresh_cfg.study.criteria)} at ratio "
        f"{', '.join(f'{r:g}' for r in fresh_cfg.study.ratios)}, seeds {list(fresh_cfg.study.seeds)}, budgets {budgets} "
        f"of prune.q = {fresh_cfg.prune.q:g} epochs; p = {fresh_cfg.prune.p:g} fixed; constant final learning rate), "
        "run in this process with bench/budget_study.py's runner, one after the other.", "", *rows, "",
        f"Continued / from the start: **{ratio:.2f}x** the wall time. **{same} of {n_cells}** cells have the very same "
        "record (every key but the wall time: accuracies, curve, recovery metrics).", ""])
    run.finish(body, extra="1 thread.", write=args.write)
    return 0 if same == n_cells else 1


if __name__ == "__main__":
    sys.exit(main())
