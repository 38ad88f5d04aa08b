"""The embedded default search end to end: wall time, trials completed, hypervolume; then the
same budget with random sampling, hypervolumes side by side.

    python bench/search_e2e.py                    # default sampler (TPE) then random
    python bench/search_e2e.py --samplers tpe --write

Each search runs as ``python -m search.launch`` in a fresh process, exactly as a user runs it
(the base model is cached after the first run; delete ~/.cache/prunesearch to time a fresh
clone, base-model training included).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import write_section  # noqa: E402
from search.pareto import front_rows, hypervolume, read_trials  # noqa: E402


def run(sampler: str, root: Path, extra: list[str]) -> dict:
    name = f"bench-{sampler}-{time.strftime('%H%M%S')}"
    t0 = time.perf_counter()
    printed = subprocess.run([sys.executable, "-m", "search.launch", f"search.sampler={sampler}", f"name={name}",
                              f"output_root={root}", *extra], cwd=ROOT, check=True, stdout=subprocess.PIPE,
                             text=True).stdout
    wall = time.perf_counter() - t0
    rows = read_trials(root / name / "trials.parquet")
    front = front_rows(rows)
    halves = re.search(r"half-timings: Spearman rho (-?[0-9.]+)", printed)
    done = [r for r in rows if r["status"] == "COMPLETED" and r["latency_ms"] is not None]
    return {
        # latency: the two halves of the driver's serial re-timing, and how each timing ranks
        # against FLOPs (the trials' own timings ran beside other trials)
        "halves_rho": float(halves.group(1)) if halves else float("nan"),
        "serial_vs_flops": _spearman([r["latency_ms"] for r in done], [r["flops"] for r in done]),
        "trial_vs_flops": _spearman([r["latency_ms_trial"] for r in done], [r["flops"] for r in done]),
        "sampler": sampler, "wall_s": wall, "trials": len(rows),
        "completed": sum(r["status"] == "COMPLETED" for r in rows),
        "hypervolume": hypervolume([(r["val_acc"], r["flops_kept"]) for r in front], (0.0, 1.0)),
        "front": len(front), "best_val": max((r["val_acc"] or 0) for r in rows),
    }


def _spearman(a: list[float], b: list[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic) if len(a) >= 3 else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samplers", nargs="+", default=["tpe", "random"])
    ap.add_argument("--output-root", type=Path, default=ROOT / "outputs" / "bench")
    ap.add_argument("--write", action="store_true")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    results = [run(s, args.output_root.resolve(), args.overrides) for s in args.samplers]
    lines = ["| sampler | wall (s) | trials | completed | completed per 10 min | front size | hypervolume (ref: acc 0, FLOPs ratio 1) "
             "| best val acc | latency halves rho | rho(latency, FLOPs) serial / in-trial |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['sampler']} | {r['wall_s']:.0f} | {r['trials']} | {r['completed']} | {600 * r['completed'] / r['wall_s']:.1f} "
              f"| {r['front']} | {r['hypervolume']:.4f} | {100 * r['best_val']:.2f} | {r['halves_rho']:.3f} "
              f"| {r['serial_vs_flops']:.3f} / {r['trial_vs_flops']:.3f} |" for r in results]
    text = (f"`python -m search.launch` (embedded default), one after the other, {time.strftime('%Y-%m-%d')}. "
            f"Command: `python bench/search_e2e.py {' '.join(sys.argv[1:])}`.\n\n" + "\n".join(lines) + "\n")
    print(text)
    if args.write:
        write_section("## Search: the embedded default end to end", text)


if __name__ == "__main__":
    main()
