"""Detection and segmentation on the embedded scenes: base vs pruned, seeds, and fps.

Two parts, both printed as Markdown for bench/RESULTS.md ("Detection and segmentation"):

1. Accuracy: ``python -m search.study task=<task>`` grids (conf/task_study/: the task's budget;
   the unpruned
   control fine-tuned with the same budget, criteria x ratios x seeds; segmentation also per
   part: encoder, decoder, all). The statistics (mean, 95% t-CI over seeds, paired differences
   to random) are the study's own report (``report.md``), which this script summarises.
2. Speed: the trained base model and copies with every unit's lowest-l1 filters removed at each
   ratio, timed side by side in interleaved rounds on real validation scenes (whole model with
   pre- and post-processing, and the backbone/encoder alone), at batch 1 and 8, one thread.

    python bench/dense_tasks.py detection --seeds 0 1 2
    python bench/dense_tasks.py segmentation --seeds 0 1 2
    python bench/dense_tasks.py detection --speed-only --base <cached base model .pt>
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# What each study runs: criteria x ratios, and for segmentation the parts it prunes.
GRIDS = {
    "detection": {"criteria": ["random", "l1", "mean_activation"], "ratios": [0.25, 0.5], "parts": ["all"]},
    "segmentation": {"criteria": ["random", "l1"], "ratios": [0.5], "parts": ["all", "encoder", "decoder"]},
}
# Criteria per part where they differ from the grid's (CPU time: the parts compare random only).
PART_CRITERIA = {("segmentation", "encoder"): ["random"], ("segmentation", "decoder"): ["random"]}


def run_study(task: str, part: str, seeds: list[int], out_root: Path, extra: list[str]) -> Path:
    grid = GRIDS[task]
    name = f"{task}-{part}"
    cmd = [
        sys.executable, "-m", "search.study", f"task={task}", f"name={name}", f"output_root={out_root}",
        f"study.criteria=[{','.join(PART_CRITERIA.get((task, part), grid['criteria']))}]", f"study.ratios=[{','.join(map(str, grid['ratios']))}]",
        f"study.seeds=[{','.join(map(str, seeds))}]", f"prune.units={part}",
        # The unpruned control once per task (with the whole model's budget), not once per part.
        f"study.control={'auto' if part == 'all' else 'false'}", *extra,
    ]
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True)
    print(f"study {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    return out_root / name


def summarise(folder: Path) -> list[dict]:
    from search.study_report import paired_vs_random, read_runs, study_meta, summarize

    rows, meta = read_runs(folder / "runs.parquet"), study_meta(folder / "runs.parquet")
    summary = summarize(rows, meta.get("metric", "final_test_acc"))
    paired = {(p["arm"], p["level"]): p for p in paired_vs_random(rows, meta.get("metric", "final_test_acc"))}
    for s in summary:
        p = paired.get((s["arm"], s["level"]))
        s["diff_vs_random"] = None if p is None else (p["diff"], p["ci_low"], p["ci_high"], p["p"])
    return summary


def _l1_pruned(model, ratio: float):
    from trainables.core.surgery import describe_units, prune_layer
    from trainables.criteria import get_criterion
    from trainables.protocol.schedules import kept_count

    pruned = copy.deepcopy(model)
    l1 = get_criterion("l1")
    for unit in describe_units(pruned):
        keep = l1(pruned, unit).argsort(descending=True)[: kept_count(unit.n_filters, ratio)].sort().values
        prune_layer(pruned, unit.name, keep.tolist())
    return pruned


def speed(task: str, base_path: Path, ratios: list[float], rounds: int, batches: tuple[int, ...]) -> list[dict]:
    """fps of the base and l1-pruned copies, interleaved (base, r1, r2, base, ...), 1 thread."""
    from data import get_data
    from trainables.cli.base_model import load_checkpoint
    from trainables.core.metrics import count_backbone_flops, count_flops, deployment_form
    from trainables.core.models import build_model

    torch.set_num_threads(1)
    data = "fmnist_detection" if task == "detection" else "fmnist_segmentation"
    model_name = "small_frcnn" if task == "detection" else "small_segnet"
    splits = get_data(data, val_size=500, seed=0)
    base = build_model(model_name, num_classes=splits.num_classes)
    load_checkpoint(base, base_path)
    models = {"base": base, **{f"{int(100 * r)}%": _l1_pruned(base, r) for r in ratios}}
    # Deployed forms (BN folded into the convs; a detector's backbone only) built once, timed many times.
    deployed = {k: deployment_form(m, channels_last=False).eval() for k, m in models.items()}
    # The detector's backbone alone beside the whole detector (the heads keep their cost).
    parts = ("whole", "backbone") if task == "detection" else ("whole",)
    images = splits.val.images
    out = []
    for b in batches:
        times = {(k, w): [] for k in models for w in parts}
        with torch.no_grad():
            for r in range(rounds + 1):  # round 0 warms up
                order = list(models) if r % 2 == 0 else list(reversed(models))
                x = images[(r * b) % (len(images) - b):][:b].contiguous()
                for k in order:
                    net = deployed[k]
                    for what in parts:
                        fn = net if what == "whole" else net.backbone
                        t0 = time.perf_counter()
                        fn(x)
                        if r:
                            times[(k, what)].append(time.perf_counter() - t0)
        for k, m in models.items():
            row = {"batch": b, "model": k, "flops": count_flops(m), "backbone_flops": count_backbone_flops(m)}
            for what in parts:
                med = statistics.median(times[(k, what)])
                row[f"{what}_ms"] = 1e3 * med
                row[f"{what}_fps"] = b / med
            out.append(row)
        base_row = next(r for r in out if r["batch"] == b and r["model"] == "base")
        for row in out:
            if row["batch"] == b:
                row["fps_ratio"] = row["whole_fps"] / base_row["whole_fps"]
                if "backbone" in parts:
                    row["backbone_speedup"] = base_row["backbone_ms"] / row["backbone_ms"]
                row["flops_ratio"] = row["flops"] / base_row["flops"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("task", choices=sorted(GRIDS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=REPO / "outputs" / "bench-dense")
    ap.add_argument("--speed-only", action="store_true", help="skip the studies; time --base")
    ap.add_argument("--base", type=Path, help="the cached base model (default: the studies' own)")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--parts", nargs="+", help="the parts to study (default: the task's grid)")
    ap.add_argument("--summarise", nargs="+", type=Path, default=[],
                    help="study folders already run: summarise them instead of running")
    ap.add_argument("extra", nargs="*", help="more overrides for every study (key=value)")
    args = ap.parse_args()
    results: dict = {"task": args.task, "studies": {}}
    base = args.base
    for folder in args.summarise:
        results["studies"][folder.name] = summarise(folder)
        base = base or Path(json.loads((folder / "launch_state.json").read_text())["base_model"])
    if not args.speed_only and not args.summarise:
        for part in args.parts or GRIDS[args.task]["parts"]:
            folder = run_study(args.task, part, args.seeds, args.out, args.extra)
            results["studies"][part] = summarise(folder)
            base = base or Path(json.loads((folder / "launch_state.json").read_text())["base_model"])
    if base is None:
        raise SystemExit("--speed-only needs --base <cached base model .pt>")
    results["speed"] = speed(args.task, base, GRIDS[args.task]["ratios"] if args.task == "detection" else [0.25, 0.5],
                             args.rounds, (1, 8))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.task}.json").write_text(json.dumps(results, indent=1, default=str))
    print(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
