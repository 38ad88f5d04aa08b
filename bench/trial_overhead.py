"""Per-trial framework overhead of the Ray trainable's fast path, measured as the marginal cost of
one more trial, side by side for the old and the new way of running trials.

    python bench/trial_overhead.py                     # 4 trials per run, 2 interleaved repeats
    python bench/trial_overhead.py --trials 6 --repeats 3 --write

Each repeat runs, one after the other:
  * plain: ``run_protocol`` on data already in memory, once per trial config (pure compute);
  * for each variant, two Tune runs on the fast path (one trial, then N trials; one at a time,
    ``reuse_actors=True``): the marginal cost of a trial is (T_N - T_1) / (N - 1), which leaves
    out what a search pays once (Tune's setup, the first actor's start).
A warm-up Tune run comes first and the variants alternate their order, so neither pays the first
run's one-off costs. Overhead per trial = marginal cost - the plain run of the same configs. Variants:
  * ``old``: data loaded in every trial, a checkpoint after every protocol stage (as before);
  * ``new``: data loaded once per worker process and kept for its next trial, checkpoints at most
    every ``--checkpoint-every`` seconds (``checkpoint_every_s``; the final one always).
The trial config is the middle of the default search space (conf/search/default.yaml). Each
trial also reports its own ``data_s`` and ``checkpoint_s``; their medians are in the table.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import write_section  # noqa: E402
from trainables.cli.base_model import prepare  # noqa: E402
from trainables.cli.compose import configs_of, data_args, load_run_config  # noqa: E402
from trainables.protocol.stages import run_protocol  # noqa: E402
from trainables.ray_trainable import TrialContext, trial_configs, trial_fn  # noqa: E402

# The middle of the default search space: p in [0, 0.05], q in [0.1, 0.4], lr log-uniform [1e-3, 3e-2].
TRIAL = {"criterion": "l1", "schedule": "uniform", "ratio": 0.45, "p": 0.025, "q": 0.25, "lr": 0.0055}


def _tune_run(ctx: TrialContext, n: int, tmp: str) -> tuple[float, list[dict]]:
    from ray import tune

    configs = [{**TRIAL, "ratio": TRIAL["ratio"] + 0.01 * i} for i in range(n)]
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(trial_fn, ctx=ctx), {"cpu": 1}),
        param_space={"ratio": tune.grid_search([c["ratio"] for c in configs]), **{k: v for k, v in TRIAL.items() if k != "ratio"}},
        tune_config=tune.TuneConfig(max_concurrent_trials=1, reuse_actors=True),
        run_config=tune.RunConfig(storage_path=tmp, verbose=0),
    )
    t0 = time.perf_counter()
    results = list(tuner.fit())
    wall = time.perf_counter() - t0
    assert all(r.error is None and r.metrics["trial_done"] for r in results), [r.error for r in results]
    return wall, [r.metrics for r in results]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--checkpoint-every", type=float, default=30.0)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()

    import ray

    cfg = load_run_config(["progress=false"], config_name="launch")
    base, splits, _, _ = prepare(cfg)
    prune, finetune, measure, _ = configs_of(cfg)
    ctx = TrialContext(
        model_name=cfg.model.name, model_kwargs={}, num_classes=splits.num_classes, base_state=base.state_dict(),
        data_args=data_args(cfg), prune=asdict(prune), finetune=asdict(finetune), measure=asdict(measure),
        seed=0, threads=1, path="fast",
    )
    variants = {"old": replace(ctx, reuse_data=False, checkpoint_every_s=0.0),
                "new": replace(ctx, reuse_data=True, checkpoint_every_s=args.checkpoint_every)}
    torch.set_num_threads(1)
    plain: list[float] = []
    marginal: dict[str, list[float]] = {k: [] for k in variants}
    telemetry: dict[str, list[dict]] = {k: [] for k in variants}
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:  # warm-up: the first Tune run pays one-off costs
            _tune_run(variants["new"], 1, tmp)
        for repeat in range(args.repeats):
            for i in range(args.trials):
                p, f, m = trial_configs(ctx, {**TRIAL, "ratio": TRIAL["ratio"] + 0.01 * i})
                t0 = time.perf_counter()
                run_protocol(copy.deepcopy(base), splits, p, f, measure=m, evaluate_test=False)
                plain.append(time.perf_counter() - t0)
            for name in sorted(variants, reverse=repeat % 2 == 1):  # alternate which variant goes first
                variant = variants[name]
                with tempfile.TemporaryDirectory() as tmp:
                    t1, _ = _tune_run(variant, 1, os.path.join(tmp, "one"))
                    tn, metrics = _tune_run(variant, args.trials, os.path.join(tmp, "many"))
                marginal[name].append((tn - t1) / (args.trials - 1))
                telemetry[name] += metrics
    finally:
        ray.shutdown()
    plain_med = statistics.median(plain)
    rows = ["| variant | marginal wall per trial (s) | overhead vs plain (s) | overhead share of the trial | "
            "data_s median | checkpoint_s median (checkpoints) | repeats (s) |", "|---|---|---|---|---|---|---|",
            f"| plain `run_protocol` | {plain_med:.2f} | - | - | - | - | {', '.join(f'{t:.2f}' for t in plain)} |"]
    for name in variants:
        med = statistics.median(marginal[name])
        tel = telemetry[name]
        rows.append(
            f"| {name} | {med:.2f} | {med - plain_med:+.2f} | {(med - plain_med) / med:.1%} | "
            f"{statistics.median(t['data_s'] for t in tel):.2f} | {statistics.median(t['checkpoint_s'] for t in tel):.2f} "
            f"({statistics.median(t['n_checkpoints'] for t in tel):.0f} + final) | {', '.join(f'{t:.2f}' for t in marginal[name])} |")
    load = os.getloadavg()
    text = (f"Trial `{TRIAL}` (the middle of the default search space) on the embedded default (small_cnn, Fashion-MNIST, "
            f"cached base), one torch thread per trial, local Ray with 2 CPUs, {args.trials} trials per run, "
            f"{args.repeats} interleaved repeats, {time.strftime('%Y-%m-%d %H:%M')}; load average before the summary "
            f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min). torch {torch.__version__}, ray {ray.__version__}. "
            f"Command: `python bench/trial_overhead.py {' '.join(sys.argv[1:])}`.\n\n" + "\n".join(rows) + "\n")
    print(text)
    if args.write:
        write_section("## Search: per-trial overhead of the Ray trainable", text)


if __name__ == "__main__":
    main()
