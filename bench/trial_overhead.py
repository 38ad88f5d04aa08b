"""Per-trial fixed overhead of the Ray trainable, fast path and TorchTrainer path, against the
same protocol run as plain PyTorch, on the embedded default (cached small-CNN base model).

    python bench/trial_overhead.py                 # 3 interleaved repeats, tiny fine-tuning budget
    python bench/trial_overhead.py --repeats 5 --write

Each repeat times: plain ``run_protocol`` in this process; a one-trial Tune run on the fast
path; a one-trial Tune run whose trial launches a 1-worker TorchTrainer. Overhead = Tune
wall time - plain wall time. Medians are reported (the machine is shared and noisy).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.latency import write_section  # noqa: E402
from trainables.base_model import prepare  # noqa: E402
from trainables.compose import configs_of, data_args, load_run_config  # noqa: E402
from trainables.protocol import run_protocol  # noqa: E402
from trainables.ray_trainable import TrialContext, trial_configs, trial_fn  # noqa: E402

TRIAL = {"criterion": "l1", "schedule": "uniform", "ratio": 0.5, "p": 0.01, "q": 0.05, "lr": 0.01}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()

    import ray
    from ray import tune

    cfg = load_run_config(["progress=false", "measure.latency=false"])
    base, splits, _, _ = prepare(cfg)
    prune, finetune, measure, _ = configs_of(cfg)
    ctx = TrialContext(
        model_name=cfg.model.name, model_kwargs={}, num_classes=splits.num_classes, base_state=base.state_dict(),
        data_args=data_args(cfg), prune=asdict(prune), finetune=asdict(finetune), measure=asdict(measure),
        seed=0, threads=1,
    )
    torch.set_num_threads(1)
    times: dict[str, list[float]] = {"plain": [], "fast": [], "torch_trainer": []}
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            from data import get_data

            plain_splits = get_data(**ctx.data_args)  # a trial loads its data too: count it
            p, f, m = trial_configs(ctx, TRIAL)
            run_protocol(copy.deepcopy(base), plain_splits, p, f, measure=m, evaluate_test=False)
            times["plain"].append(time.perf_counter() - t0)
            for path in ("fast", "torch_trainer"):
                with tempfile.TemporaryDirectory() as tmp:
                    c = copy.copy(ctx)
                    c.path, c.storage_path = path, tmp
                    res = {"cpu": 1} if path == "fast" else {"cpu": 0.01}
                    tuner = tune.Tuner(tune.with_resources(tune.with_parameters(trial_fn, ctx=c), res), param_space=TRIAL,
                                       run_config=tune.RunConfig(storage_path=tmp, verbose=0))
                    t0 = time.perf_counter()
                    [result] = list(tuner.fit())
                    times[path].append(time.perf_counter() - t0)
                    assert result.error is None and result.metrics["trial_done"]
    finally:
        ray.shutdown()
    med = {k: statistics.median(v) for k, v in times.items()}
    lines = [
        "| path | median wall per trial (s) | overhead vs plain (s) | runs (s) |", "|---|---|---|---|",
        *(f"| {k} | {med[k]:.1f} | {med[k] - med['plain']:+.1f} | {', '.join(f'{t:.1f}' for t in v)} |" for k, v in times.items()),
    ]
    text = (f"One trial of the embedded default, `{TRIAL}`, one torch thread, local Ray with 2 CPUs, "
            f"{args.repeats} interleaved repeats, {time.strftime('%Y-%m-%d')}. Command: `python bench/trial_overhead.py "
            f"{' '.join(sys.argv[1:])}`.\n\n" + "\n".join(lines) + "\n")
    print(text)
    if args.write:
        write_section("## Search: per-trial overhead of the Ray trainable", text)


if __name__ == "__main__":
    main()
