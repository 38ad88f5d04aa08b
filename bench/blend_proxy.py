"""How many optimiser steps does the blended search's proxy need to rank blends like fine-tuning?

Seeded random blends (one factor vector each over the cluster representatives of
``search=blended``, factors uniform in ``search.blend.factor``) are each scored

- once at **full fidelity**: one-shot pruning to the search's FLOPs target, adaptive BN, then
  ``--q`` epochs of fine-tuning (cosine to 0), exactly as the search's front fine-tuning
  (``full_prune``) but with ``q`` from the command line (the search's default is 2.0);
- by the **proxy** for every ``k`` of ``--steps``: the same pruning and adaptive BN, then ``k``
  optimiser steps (``search.proxy.finetune_steps=k``; 0 = adaptive BN only), the settings a
  proxy trial of the search gets from ``search._session.trial_prune``.

Per ``k``: Spearman's rho between proxy and full-fidelity validation accuracy over the
candidates (``scipy.stats.spearmanr``, with its p-value), and the wall time per candidate. The
cheapest ``k`` with rho >= 0.8 is the one to make ``search.proxy.finetune_steps``'s default.

    python bench/blend_proxy.py                                   # 20 candidates, q=1, k in {0, 10, 30, 100}
    python bench/blend_proxy.py --candidates 24 --steps 0 10 30 100 300 --q 1
    python bench/blend_proxy.py --candidates 2 --steps 0 5 --q 0.05   # smoke test (a minute)

One process, one torch thread. Raw numbers go to ``--out`` (JSON); the markdown section is
printed at the end (the RESULTS.md format: machine, versions, command, numbers).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _factors(candidates: list[str], n: int, low: float, high: float, seed: int) -> list[dict[str, float]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return [{c: round(float(f), 4) for c, f in zip(candidates, rng.uniform(low, high, len(candidates)), strict=True)}
            for _ in range(n)]


def _run(base, splits, prune: dict, weights: dict[str, float], finetune, seed: int, resume: dict | None = None,
         states: list | None = None) -> dict:
    """One protocol run of a blend; returns val accuracy, optimiser steps and wall seconds.

    ``states`` collects the protocol's stage checkpoints; ``resume`` (the state after the
    one-shot pruning + adaptive BN stage, identical for every proxy k) lets a proxy with k > 0
    skip the base evaluation, scoring and BN re-estimation that the k = 0 run already did:
    the protocol's own resume, which gives the numbers of an uninterrupted run.
    """
    from trainables.protocol.config import MeasureConfig, PruneConfig
    from trainables.protocol.stages import run_protocol

    options = {**prune.get("criterion_options", {}), "weights": weights}
    cfg = PruneConfig(**{**prune, "criterion": "blended", "criterion_options": options})
    t0 = time.perf_counter()
    rec = run_protocol(copy.deepcopy(base), splits, cfg, finetune, measure=MeasureConfig(latency=False), seed=seed,
                       evaluate_test=False, resume=resume, checkpoint=None if states is None else states.append)
    return {"val_acc": rec["final_val_acc"], "steps": rec["curve"][-1]["step"], "wall_s": time.perf_counter() - t0,
            "flops_ratio": rec["flops_after"] / rec["flops_before"]}


def _load_avg() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def measure(args) -> dict:
    import torch

    torch.set_num_threads(1)
    from search._session import blend_candidates, trial_prune
    from search.launch import load_search_config
    from trainables.cli.base_model import prepare
    from trainables.cli.compose import configs_of
    from trainables.protocol.finetune import steps_per_epoch

    cfg = load_search_config(["search=blended", f"seed={args.seed}", "progress=false", *args.overrides])
    base, splits, base_path, _ = prepare(cfg, log=lambda *_: None)
    prune, finetune, _, _ = configs_of(cfg)
    per_epoch = steps_per_epoch(splits, finetune)
    _, full = trial_prune(cfg, prune, per_epoch)
    full = {**full, "q": args.q}
    reps, _ = blend_candidates(cfg, base, splits, base_path, full, Path(args.out).with_suffix(""), log=lambda *_: None)
    factor = cfg.search.blend.factor
    blends = _factors(reps, args.candidates, float(factor.low), float(factor.high), args.seed)
    proxies = {}
    for k in args.steps:
        cfg.search.proxy.finetune_steps = k
        proxies[k], _ = trial_prune(cfg, prune, per_epoch)
    rows = []
    t_start = time.perf_counter()
    for i, weights in enumerate(blends):
        row = {"candidate": i, "weights": weights, "full": _run(base, splits, full, weights, finetune, cfg.seed)}
        states: list[dict] = []
        for k in args.steps:  # ascending: the first (k = 0) run records the pruned state the others resume
            resume = states[0] if states else None
            row[f"proxy_{k}"] = _run(base, splits, proxies[k], weights, finetune, cfg.seed, resume=resume,
                                     states=None if states else states)
            if row[f"proxy_{k}"]["steps"] != k:  # the proxy's q must be exactly k steps
                raise RuntimeError(f"proxy k={k} took {row[f'proxy_{k}']['steps']} steps")
        rows.append(row)
        print(f"[{i + 1}/{len(blends)}] full {100 * row['full']['val_acc']:.2f} ({row['full']['wall_s']:.0f} s); "
              + "; ".join(f"k={k}: {100 * row[f'proxy_{k}']['val_acc']:.2f} ({row[f'proxy_{k}']['wall_s']:.1f} s)"
                          for k in args.steps) + f"; load {_load_avg()}", flush=True)
    return {"representatives": reps, "steps_per_epoch": per_epoch, "q": args.q, "rows": rows, "wall_s":
            time.perf_counter() - t_start, "load_end": _load_avg(), "full_settings": full,
            "finetune": asdict(replace(finetune))}


def summarise(result: dict, args) -> str:
    import numpy as np
    import scipy
    import torch
    from scipy.stats import bootstrap, spearmanr

    rows = result["rows"]
    full = [r["full"]["val_acc"] for r in rows]
    table = ["| proxy | optimiser steps | val acc min-max (%) | Spearman rho vs full (p) | rho 95% CI (bootstrap) "
             "| wall s / candidate (median) |", "|---|---|---|---|---|---|"]
    reached, best = None, None
    for k in args.steps:
        acc = [r[f"proxy_{k}"]["val_acc"] for r in rows]
        rho, p = spearmanr(acc, full)
        # Candidates resampled in pairs: how much rho moves with the particular 20 blends drawn.
        ci = bootstrap((acc, full), lambda a, b: spearmanr(a, b).statistic, paired=True, vectorized=False,
                       n_resamples=2000, method="percentile", rng=np.random.default_rng(args.seed)).confidence_interval
        walls = sorted(r[f"proxy_{k}"]["wall_s"] for r in rows)
        label = "adaptive BN only" if k == 0 else f"adaptive BN + {k} steps"
        table.append(f"| {label} | {k} | {100 * min(acc):.2f}-{100 * max(acc):.2f} | {rho:.3f} ({p:.2g}) | "
                     f"{ci.low:.2f} to {ci.high:.2f} | {walls[len(walls) // 2]:.1f}{'' if k == 0 else ' *'} |")
        if reached is None and rho >= 0.8:
            reached = k
        if best is None or rho > best[1]:
            best = (k, rho)
    full_walls = sorted(r["full"]["wall_s"] for r in rows)
    table.append(f"| full fidelity | {rows[0]['full']['steps']} | {100 * min(full):.2f}-{100 * max(full):.2f} | 1 | | "
                 f"{full_walls[len(full_walls) // 2]:.1f} |")
    verdict = (f"Cheapest k with rho >= 0.8: **{reached}**." if reached is not None else
               f"No k reached rho >= 0.8; the best was k = {best[0]} (rho {best[1]:.3f}).")
    verdict += (" * k > 0 resumes from the k = 0 run's pruned, BN-recalibrated state (the protocol's own resume), "
                "so its wall time is the k steps and the final evaluation only; a search trial pays the k = 0 cost "
                "plus that.")
    return (
        f"`python bench/blend_proxy.py --candidates {args.candidates} --steps {' '.join(map(str, args.steps))} "
        f"--q {args.q}` ({time.strftime('%Y-%m-%d')}; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores shared with other engineers' jobs, load average at the end {result['load_end']}; "
        f"1 process, 1 torch thread; torch {torch.__version__}, scipy {scipy.__version__}). "
        f"`search=blended` defaults: small CNN on Fashion-MNIST, one-shot to 50% FLOPs, representatives "
        f"{', '.join(result['representatives'])}; {len(rows)} random factor vectors (uniform in [0, 1], seed {args.seed}). "
        f"Full fidelity = the search's front fine-tuning (`full_prune`: adaptive BN batches "
        f"{result['full_settings']['adapt_bn_batches']}) with {result['q']} epoch(s) ({rows[0]['full']['steps']} steps, "
        f"cosine to 0; the search's own default is q=2); proxy = adaptive BN (50 batches of 128) + k steps "
        f"(cosine to 0 over the k steps), {result['steps_per_epoch']} steps per epoch. Whole run: "
        f"{result['wall_s'] / 60:.1f} min.\n\n" + "\n".join(table) + f"\n\n{verdict}\n"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--candidates", type=int, default=20)
    ap.add_argument("--steps", nargs="+", type=int, default=[0, 10, 30, 100])
    ap.add_argument("--q", type=float, default=1.0, help="full-fidelity fine-tuning epochs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_blend_proxy.json")
    ap.add_argument("--from-json", type=Path, help="only summarise the raw numbers of an earlier run")
    ap.add_argument("overrides", nargs="*", help="extra search config overrides (key=value)")
    args = ap.parse_args()
    args.steps = sorted(set(args.steps))
    if args.candidates < 3:
        print("note: fewer than 3 candidates give no meaningful rank correlation", file=sys.stderr)
    if args.from_json:
        result = json.loads(args.from_json.read_text())
        args.out = args.from_json
    else:
        result = measure(args)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1, default=str))
    print(summarise(result, args), flush=True)
    print(args.out)


if __name__ == "__main__":
    main()
