"""The search against random configurations at equal compute (Li et al., CVPR 2022, "Revisiting
Random Channel Pruning"): does TPE or NSGA-II find better per-layer ratios than drawing them at
random, with the same number of trials and the same fine-tuning per trial?

    python bench/random_configs.py                              # tpe, nsga2, random; seeds 0 1; both modes
    python bench/random_configs.py --modes target --trials 16 --seeds 0 1 2
    python bench/random_configs.py --table-only                 # re-read finished searches, print the table

Every search is ``python -m search.launch search=random_configs`` in a fresh process: the space
narrowed to what Li et al. vary (one criterion, ``l1``; the ``per_layer`` schedule, one ratio per
unit) and one fixed fine-tuning budget (every trial prunes in one shot and fine-tunes ``--q``
epochs at ``finetune.lr``), so the samplers differ only in where they put the ratios, and equal
trials mean equal compute. ``search.sampler=random`` is the random-configurations baseline;
NSGA-II runs generations of ``search.population_size`` (4 in that config).

Two modes:

* ``plane``: no FLOPs target; each trial's per-layer ratios are used as drawn, and the
  comparison is on the accuracy-vs-FLOPs plane (hypervolume; best accuracy among trials
  keeping at most 50% and 25% of the FLOPs).
* ``target``: ``search.prune_overrides.target_flops_reduction`` (``--targets``, 0.5 by default:
  50% of the FLOPs kept): the planner keeps each drawn shape and scales it until the FLOPs target is
  met (within 2 points), which is Li et al.'s "random configurations under a FLOPs budget".
  Every trial then has about the same FLOPs, so what counts is the best accuracy at the target.
  A target of 0.75 is out of reach for about 1 random shape in 11 on small_cnn (a unit drawn at
  0.1 beside one at 0.8 cannot be scaled far enough before the latter hits the planner's 95%
  cap); those trials fail (see docs/guides/random-baseline.md).

Numbers are read from each search's ``trials.parquet`` (``search.pareto.read_trials``), never
from logs; a search whose folder already holds ``trials.parquet`` is not run again.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from search.pareto import front_rows, hypervolume, read_trials  # noqa: E402

SAMPLERS = ("tpe", "nsga2", "random")
# FLOPs kept (share of the unpruned model's) at which the best accuracy is reported; the target
# mode prunes to the same shares (target_flops_reduction = 1 - kept).
KEPT = (0.5, 0.25)
# The planner meets a FLOPs target within 2 points (trainables.protocol.planning), so a target trial may
# keep e.g. 0.51 of the FLOPs; in the target mode a trial counts at its target with that slack.
TARGET_SLACK = 0.02
REF = (0.0, 1.0)  # the search's own default hypervolume reference: accuracy 0, all FLOPs kept


def search_args(sampler: str, seed: int, args: argparse.Namespace, target: float | None) -> list[str]:
    """The ``search.launch`` overrides of one search: ``search=random_configs`` (one criterion,
    per-layer ratios, one fine-tuning budget for every trial), only the sampler and seed differ."""
    return [
        "search=random_configs", f"search.sampler={sampler}", f"search.seed={seed}",
        f"search.num_trials={args.trials}", f"search.max_concurrent_trials={args.concurrent}",
        f"search.prune_overrides.q={args.q}",
        f"search.prune_overrides.target_flops_reduction={'null' if target is None else target}",
        *args.overrides,
    ]


def folder_name(target: float | None, sampler: str, seed: int) -> str:
    where = "plane" if target is None else f"flops{round(100 * (1 - target))}"
    return f"{where}-{sampler}-s{seed}"


def run_search(out_root: Path, name: str, extra: list[str], log: Path) -> float | None:
    """Runs one search unless its ``trials.parquet`` exists; its wall seconds (also written to
    ``bench_wall_s.txt`` in its folder), or None if it was already there."""
    if (out_root / name / "trials.parquet").exists():
        return None
    t0 = time.perf_counter()
    with log.open("a") as fh:
        fh.write(f"\n=== {name}: python -m search.launch {' '.join(extra)}\n")
        fh.flush()
        subprocess.run([sys.executable, "-m", "search.launch", f"name={name}", f"output_root={out_root}", *extra],
                       cwd=ROOT, check=True, stdout=fh, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    (out_root / name / "bench_wall_s.txt").write_text(f"{wall:.1f}\n")  # for --table-only
    return wall


def best_under(rows: list[dict], kept: float) -> dict | None:
    """The completed trial with the highest val_acc among those keeping at most ``kept`` of the FLOPs;
    of equal val_acc the cheaper one, which is the one on the front (and so has a test_acc)."""
    done = [r for r in rows if r["status"] == "COMPLETED" and r["val_acc"] is not None and r["flops_kept"] <= kept]
    return max(done, key=lambda r: (r["val_acc"], -r["flops_kept"])) if done else None


def summarise(rows: list[dict], target: float | None) -> dict:
    """Per search: trials, completed, hypervolume, and the best val (and its test) accuracy per FLOPs share."""
    front = front_rows(rows)
    out = {
        "trials": len(rows), "completed": sum(r["status"] == "COMPLETED" for r in rows),
        "hypervolume": hypervolume([(r["val_acc"], r["flops_kept"]) for r in front], REF),
        "flops_kept": sorted(round(r["flops_kept"], 3) for r in rows if r["flops_kept"] is not None),
        # the drawn shapes (planned ratios), to count the trials a search shares with random's
        "configs": [tuple(round(x, 4) for x in r["prune_ratios"] or []) for r in rows],
    }
    shares = KEPT if target is None else (1 - target,)
    for kept in shares:
        slack = 0.0 if target is None else TARGET_SLACK
        best = best_under(rows, kept + slack)
        # The best-val trial under a FLOPs cap (the cheapest of equal val_acc) is always
        # Pareto-optimal: a trial dominating it would be under the cap with a higher val_acc or
        # the same val_acc at fewer FLOPs. So the search has tested it.
        out[f"val@{kept:g}"] = best["val_acc"] if best else None
        out[f"test@{kept:g}"] = best["test_acc"] if best else None
    return out


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def table(results: list[dict]) -> str:
    """Markdown: one row per search, then one median row per (mode, sampler)."""
    lines = ["| mode | sampler | seed | trials (completed) | own trials | wall (s) | hypervolume "
             "| best val @<=0.5 FLOPs (test) | best val @<=0.25 FLOPs (test) |", "|---|---|---|---|---|---|---|---|---|"]

    def cells(r: dict, kept: float) -> str:
        if f"val@{kept:g}" not in r:
            return "n/a"
        return f"{_pct(r[f'val@{kept:g}'])} ({_pct(r[f'test@{kept:g}'])})"

    for r in results:
        wall = "reused" if r["wall_s"] is None else f"{r['wall_s']:.0f}"
        own = "-" if r.get("own") is None else str(r["own"])
        lines.append(f"| {r['mode']} | {r['sampler']} | {r['seed']} | {r['trials']} ({r['completed']}) | {own} | {wall} "
                     f"| {r['hypervolume']:.4f} | {cells(r, 0.5)} | {cells(r, 0.25)} |")
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["mode"], r["sampler"]), []).append(r)
    for (mode, sampler), rs in groups.items():
        med = {k: _median([r.get(k) for r in rs]) for k in ("hypervolume", "val@0.5", "test@0.5", "val@0.25", "test@0.25")}

        def mcell(kept: float, med: dict = med, rs: list[dict] = rs) -> str:
            if not any(f"val@{kept:g}" in r for r in rs):
                return "n/a"
            return f"{_pct(med[f'val@{kept:g}'])} ({_pct(med[f'test@{kept:g}'])})"

        lines.append(f"| **{mode}** | **{sampler}** | median of {len(rs)} | {sum(r['trials'] for r in rs)} | | "
                     f"| {med['hypervolume']:.4f} | {mcell(0.5)} | {mcell(0.25)} |")
    return "\n".join(lines)


def count_own(results: list[dict]) -> None:
    """``own``: a search's trials whose shape the random search of the same mode and seed did not
    draw. Optuna's TPE (first 10 trials) and NSGA-II (first generation) start from the same seeded
    random draws as ``RandomSampler``, so only the own trials are the search's doing."""
    random_configs = {(r["mode"], r["seed"]): set(r["configs"]) for r in results if r["sampler"] == "random"}
    for r in results:
        seen = random_configs.get((r["mode"], r["seed"]))
        r["own"] = None if r["sampler"] == "random" or seen is None else sum(c not in seen for c in r["configs"])


def merge_targets(per_target: list[dict], mode: str, sampler: str, seed: int) -> dict:
    """The target mode's two searches (one per FLOPs share) of one sampler and seed as one row."""
    row = {"mode": mode, "sampler": sampler, "seed": seed, "trials": 0, "completed": 0, "wall_s": 0.0,
           "hypervolume": 0.0}
    for s in per_target:
        row["trials"] += s["trials"]
        row["completed"] += s["completed"]
        row["wall_s"] = None if s["wall_s"] is None or row["wall_s"] is None else row["wall_s"] + s["wall_s"]
        # the two searches' trials together on one plane (each alone is one vertical line of points)
        row["points"] = row.get("points", []) + s["points"]
        row["configs"] = row.get("configs", []) + s["configs"]
        row.update({k: v for k, v in s.items() if k.startswith(("val@", "test@"))})
    row["hypervolume"] = hypervolume(row["points"], REF)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=SAMPLERS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--modes", nargs="+", default=["plane", "target"], choices=["plane", "target"])
    ap.add_argument("--targets", nargs="+", type=float, default=[0.5],
                    help="target mode: FLOPs reductions, one search each (0.75: about 1 random shape in 11 is out of reach)")
    ap.add_argument("--trials", type=int, default=12, help="trials per search (equal for every sampler)")
    ap.add_argument("--concurrent", type=int, default=2, help="search.max_concurrent_trials")
    ap.add_argument("--q", type=float, default=0.1, help="search.prune_overrides.q: fine-tuning epochs of every trial")
    ap.add_argument("--output-root", type=Path, default=ROOT / "outputs" / "bench" / "random_configs")
    ap.add_argument("--table-only", action="store_true", help="run nothing; tabulate the searches already done")
    ap.add_argument("overrides", nargs="*", help="more search.launch overrides, the same for every search")
    args = ap.parse_args()
    for key, value, low in (("--trials", args.trials, 1), ("--concurrent", args.concurrent, 1)):
        if value < low:
            ap.error(f"{key} must be >= {low}, but got {value}")
    if not all(0 < t < 1 for t in args.targets):
        ap.error(f"--targets must lie in (0, 1) (FLOPs reductions), but got {args.targets}")
    if not args.q > 0:
        ap.error(f"--q must be > 0 (epochs of fine-tuning per trial), but got {args.q}")
    out_root = args.output_root.resolve()
    out_root.mkdir(parents=True, exist_ok=True)
    log = out_root / "searches.log"
    results = []
    # seeds outermost: a run cut short still has every sampler at the seeds it finished
    for seed in args.seeds:
        for mode in args.modes:
            targets = [None] if mode == "plane" else args.targets
            for sampler in args.samplers:
                per_target = []
                for target in targets:
                    name = folder_name(target, sampler, seed)
                    extra = search_args(sampler, seed, args, target)
                    if args.table_only and not (out_root / name / "trials.parquet").exists():
                        continue
                    wall = None if args.table_only else run_search(out_root, name, extra, log)
                    if wall is None and (out_root / name / "bench_wall_s.txt").exists():
                        wall = float((out_root / name / "bench_wall_s.txt").read_text())
                    rows = read_trials(out_root / name / "trials.parquet")
                    s = summarise(rows, target)
                    s["wall_s"] = wall
                    s["points"] = [(r["val_acc"], r["flops_kept"]) for r in rows
                                   if r["status"] == "COMPLETED" and r["val_acc"] is not None]
                    per_target.append(s)
                    print(f"{name}: {json.dumps({k: v for k, v in s.items() if k not in ('points', 'configs')})}", flush=True)
                if not per_target:
                    continue
                if mode == "plane":
                    results.append({"mode": mode, "sampler": sampler, "seed": seed, **per_target[0]})
                else:
                    results.append(merge_targets(per_target, mode, sampler, seed))
    count_own(results)
    text = (f"Command: `python bench/random_configs.py {' '.join(sys.argv[1:])}` ({time.strftime('%Y-%m-%d %H:%M')}).\n\n"
            + table(results) + "\n")
    (out_root / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
