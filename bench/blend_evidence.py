"""Does blending criteria pay off? He et al. 2021's blended criterion against single criteria.

On the embedded default (small CNN, Fashion-MNIST), at one FLOPs target (50% reduction,
one-shot pruning, then ``--q`` epochs of fine-tuning, the same budget for every entry):

- ``proxy``: the product's ``python -m search.launch search=blended`` with random factors,
  every candidate evaluated by the proxy (one-shot + adaptive BN) and fine-tuned
  (``search.finetune_front`` = all trials): Spearman rho between proxy and fine-tuned
  accuracy over ``--proxy-trials`` candidates.
- ``evidence``: for each seed, the best blend found by evolution (NSGA-II over the cluster
  representatives' factors, ``--trials`` proxy trials, the best one fine-tuned and tested by the
  search itself) against every single criterion of the pool and ``random``, fine-tuned with
  the same budget and seed; mean and 95% confidence interval (Student t) of test accuracy.

    python bench/blend_evidence.py --write                      # both parts
    python bench/blend_evidence.py --parts proxy --proxy-trials 24
    python bench/blend_evidence.py --parts evidence --seeds 0 1 2 --q 2

The base model is the cached one (trained once, seed 0); seeds vary the scoring batches, the
``random`` criterion, the fine-tuning order and the evolution's sampler.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import write_section  # noqa: E402

COMMON = ["prune.method=one_shot", "prune.target_flops_reduction=0.5", "measure.latency=false", "progress=false",
          "finetune.eval_every=10"]


def _single(job: tuple[str, int, float, list[str]]) -> dict:
    """One single-criterion run in a worker process (one torch thread)."""
    criterion, seed, q, extra = job
    import torch

    torch.set_num_threads(1)
    from trainables.cli.base_model import prepare
    from trainables.cli.compose import configs_of, load_run_config
    from trainables.protocol.stages import run_protocol

    cfg = load_run_config([*COMMON, f"prune.q={q}", f"criterion={criterion}", f"seed={seed}", *extra])
    base, splits, _, _ = prepare(cfg, log=lambda *_: None)
    prune, finetune, measure, _ = configs_of(cfg)
    t0 = time.perf_counter()
    rec = run_protocol(base, splits, prune, finetune, measure=measure, seed=seed)
    return {"criterion": criterion, "seed": seed, "test_acc": rec["final_test_acc"], "val_acc": rec["final_val_acc"],
            "flops_ratio": rec["flops_after"] / rec["flops_before"], "wall_s": time.perf_counter() - t0}


def _search(name: str, root: Path, args: list[str]) -> Path:
    cmd = [sys.executable, "-m", "search.launch", "search=blended", f"name={name}", f"output_root={root}",
           "trial_threads=1", *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
    return root / name


def _ci95(values: list[float]) -> tuple[float, float]:
    from scipy.stats import t

    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan")
    return mean, t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def proxy_part(args, root: Path) -> str:
    from scipy.stats import spearmanr

    from search.pareto import read_trials

    out = _search(f"proxy-{time.strftime('%H%M%S')}", root, [
        "search.sampler=random", f"search.num_trials={args.proxy_trials}", f"search.finetune_front={args.proxy_trials}",
        f"search.prune_overrides.q={args.q}", "finetune.eval_every=10", "seed=0", "search.seed=0",
    ])
    rows = [r for r in read_trials(out / "finetuned.parquet") if r["val_acc"] is not None]
    proxy = [r["proxy_val_acc"] for r in rows]
    tuned = [r["val_acc"] for r in rows]
    rho, pval = spearmanr(proxy, tuned)
    clustering = json.loads((out / "clustering" / "clustering.json").read_text())
    return (
        f"`python bench/blend_evidence.py --parts proxy --proxy-trials {args.proxy_trials} --q {args.q}` "
        f"({time.strftime('%Y-%m-%d')}): `search=blended`, random factors over the cluster representatives "
        f"({', '.join(clustering['representatives'])}), 50% FLOPs, one-shot. Proxy = adaptive BN on 50 batches of 128, "
        f"no gradient step; fine-tuned = {args.q} epochs (cosine), same seed.\n\n"
        f"| candidates | proxy val acc, min-max (%) | fine-tuned val acc, min-max (%) | Spearman rho (p) |\n|---|---|---|---|\n"
        f"| {len(rows)} | {100 * min(proxy):.2f}-{100 * max(proxy):.2f} | {100 * min(tuned):.2f}-{100 * max(tuned):.2f} | "
        f"{rho:.3f} ({pval:.3f}) |\n\nClusters of the pool (mean Spearman over units): "
        + "; ".join("{" + ", ".join(c) + "}" for c in clustering["clusters"]) + ". Search folder: `" + str(out) + "`.\n"
    )


def evidence_part(args, root: Path) -> str:
    from search.pareto import read_trials

    pool = args.pool
    jobs = [(c, s, args.q, []) for s in args.seeds for c in [*pool, "random"]]
    with mp.get_context("spawn").Pool(args.workers) as workers:
        singles = []
        for i, res in enumerate(workers.imap_unordered(_single, jobs), 1):
            singles.append(res)
            print(f"[{i}/{len(jobs)}] {res['criterion']} seed {res['seed']}: test {100 * res['test_acc']:.2f} "
                  f"({res['wall_s']:.0f} s)", flush=True)
    blended, weights = [], []
    for s in args.seeds:
        out = _search(f"evidence-s{s}-{time.strftime('%H%M%S')}", root, [
            f"search.num_trials={args.trials}", "search.finetune_front=1", f"search.prune_overrides.q={args.q}",
            f"seed={s}", f"search.seed={s}", "finetune.eval_every=10",
        ])
        [best] = read_trials(out / "finetuned.parquet")
        blended.append({"criterion": "blended (evolved)", "seed": s, "test_acc": best["test_acc"], "val_acc": best["val_acc"]})
        cfg = json.loads(best["config_json"])
        weights.append({c: round(v, 3) for c, v in cfg["criterion.weights"].items()})  # the run command's key
    table = ["| criterion | test acc %, mean ± 95% CI | per seed | val acc % (mean) |", "|---|---|---|---|"]
    results = {}
    for name in ["blended (evolved)", *pool, "random"]:
        rows = sorted((r for r in [*blended, *singles] if r["criterion"] == name), key=lambda r: r["seed"])
        mean, half = _ci95([100 * r["test_acc"] for r in rows])
        results[name] = mean
        per_seed = ", ".join(f"{100 * r['test_acc']:.2f}" for r in rows)
        val = statistics.fmean(100 * r["val_acc"] for r in rows)
        table.append(f"| {name} | {mean:.2f} ± {half:.2f} | {per_seed} | {val:.2f} |")
    best_single = max(pool, key=lambda c: results[c])
    diff = results["blended (evolved)"] - results[best_single]
    import torch

    return (
        f"`python bench/blend_evidence.py --parts evidence --seeds {' '.join(map(str, args.seeds))} --q {args.q} "
        f"--trials {args.trials}` ({time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, {args.workers} workers x 1 thread). small CNN on Fashion-MNIST, one-shot pruning to "
        f"50% FLOPs, then {args.q} epochs of fine-tuning (cosine to 0, lr 0.01) for every entry; test accuracy over "
        f"seeds {', '.join(map(str, args.seeds))}. The evolved blend: NSGA-II, {args.trials} proxy trials per seed over "
        f"the cluster representatives' factors, the best by proxy accuracy fine-tuned.\n\n" + "\n".join(table)
        + f"\n\nEvolved factors per seed: {'; '.join(json.dumps(w) for w in weights)}.\n"
        f"Best single criterion by mean: {best_single} ({results[best_single]:.2f}); evolved blend minus it: "
        f"{diff:+.2f} points; random: {results['random']:.2f}.\n"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", default=["proxy", "evidence"], choices=["proxy", "evidence"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--pool", nargs="+", default=["l1", "l2", "fpgm", "bn_gamma", "mean_activation", "apoz", "entropy",
                                                  "hrank", "taylor"])
    ap.add_argument("--q", type=float, default=1.0, help="fine-tuning epochs after pruning (every entry)")
    ap.add_argument("--trials", type=int, default=24, help="proxy trials of each evolutionary search")
    ap.add_argument("--proxy-trials", type=int, default=24)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--output-root", type=Path, default=ROOT / "outputs" / "bench_blend")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    root = args.output_root.resolve()
    for part in args.parts:
        text = proxy_part(args, root) if part == "proxy" else evidence_part(args, root)
        print(text, flush=True)
        if args.write:
            title = ("## Blended criterion: proxy fidelity (adaptive BN) vs fine-tuned accuracy" if part == "proxy"
                     else "## Blended criterion vs single criteria (He et al.), 50% FLOPs")
            write_section(title, text)


if __name__ == "__main__":
    main()
