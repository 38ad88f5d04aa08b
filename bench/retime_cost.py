"""What re-timing costs per model, and at 100 and 1000 trials (search.retime).

    python bench/retime_cost.py                  # 12 models, 3 repeats
    python bench/retime_cost.py --models 16 --repeats 5 --write

The default small_cnn (conf/launch.yaml's measure settings: batch 64, 3 timed passes after 1
warm-up, 1 thread; search.retime.rounds=6) pruned at ratios drawn from the default search's
range (0.1-0.8 per unit), saved as trial checkpoints. Measured, interleaved per repeat:
  * load: rebuilding one trial's model from its checkpoint (what the node's task does first);
  * per model per round: the marginal cost of one more model in ``retime_models`` = (T_N -
    T_{N/2}) / (N/2) / rounds, which leaves out the base's timing each round;
  * task overhead: one group of N models timed through ``retime_on_nodes`` (a Ray task pinned
    to this node; a fresh worker process) minus the same in this process.
Extrapolated: seconds for a search of n completed trials = overhead + n x (load + rounds x per
model per round) with scope=all, and the same for the models ``select_for_retiming`` keeps with
scope=front (layers=2) on a simulated search cloud (labelled as such: the count depends on the
search).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from search.retime import retime_models, retime_on_nodes, select_for_retiming, timing_device  # noqa: E402
from trainables.core.models import build_model  # noqa: E402
from trainables.core.surgery import describe_units, prune_layer  # noqa: E402
from trainables.ray_trainable import TrialContext, load_trial_model  # noqa: E402

TIMING = {"input_shape": (1, 28, 28), "batch_size": 64, "threads": 1, "repeats": 3, "warmup": 1, "seed": 0}
ROUNDS = 6


def _checkpoints(folder: Path, base: torch.nn.Module, n: int, rng: random.Random) -> list[tuple[str, object]]:
    """``n`` trial checkpoints of ``base`` pruned at ratios drawn per unit from [0.1, 0.8]."""
    from ray.train import Checkpoint

    out = []
    for i in range(n):
        model = build_model("small_cnn")
        model.load_state_dict(base.state_dict())
        log = []
        for unit in describe_units(model):
            keep = list(range(max(1, round(unit.n_filters * (1 - rng.uniform(0.1, 0.8))))))
            prune_layer(model, unit.name, keep)
            log.append({"unit": unit.name, "keep_idxs": keep})
        d = folder / f"t{i}"
        d.mkdir()
        torch.save({"prune_log": log, "model_state": model.state_dict()}, d / "state.pt")
        out.append((f"t{i}", Checkpoint.from_directory(str(d))))
    return out


def _simulated_front_share(n: int, seed: int) -> int:
    """How many of ``n`` simulated trials scope=front (layers=2) re-times: accuracy falls with
    the share of FLOPs removed, plus noise; the trial's own latency follows FLOPs with the
    contention noise seen in the default search (x0.5-x3)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        kept = rng.uniform(0.04, 0.81)  # (1 - ratio)^2 over the default ratio range
        acc = 0.9 - 0.3 * (1 - kept) ** 2 + rng.gauss(0, 0.03)
        rows.append({"trial_id": f"t{i}", "status": "COMPLETED", "val_acc": acc, "flops": kept,
                     "latency_ms_trial": (1 + 4 * kept) * rng.uniform(0.5, 3.0)})
    return len(select_for_retiming(rows, "flops", scope="front", layers=2))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="append the section to bench/RESULTS.md")
    args = parser.parse_args(argv)
    if args.models < 2 or args.repeats < 1:
        parser.error(f"--models must be >= 2 and --repeats >= 1, but got {args.models} and {args.repeats}")
    import ray

    torch.manual_seed(0)
    torch.set_num_threads(1)
    base = build_model("small_cnn")
    ctx = TrialContext(model_name="small_cnn", model_kwargs={}, num_classes=10,
                       base_state={k: v.clone() for k, v in base.state_dict().items()}, data_args={}, prune={},
                       finetune={}, measure={}, input_shape=(1, 28, 28))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    here = ray.get_runtime_context().get_node_id()
    load, marginal, overhead = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        items = _checkpoints(Path(tmp), base, args.models, random.Random(0))
        half = args.models // 2
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            models = {}
            for trial_id, ckpt in items:
                with ckpt.as_directory() as d:
                    models[trial_id] = load_trial_model(ctx, d)[0]
            load.append((time.perf_counter() - t0) / len(items))
            walls = {}
            for n in (args.models, half):
                t0 = time.perf_counter()
                retime_models(dict(list(models.items())[:n]), base, rounds=ROUNDS, **TIMING)
                walls[n] = time.perf_counter() - t0
            marginal.append((walls[args.models] - walls[half]) / (args.models - half) / ROUNDS)
            t0 = time.perf_counter()
            retime_on_nodes({here: items}, ctx, rounds=ROUNDS, **TIMING)
            task = time.perf_counter() - t0
            overhead.append(task - walls[args.models] - load[-1] * len(items))
    ray.shutdown()
    med = {"load": statistics.median(load), "per_model_round": statistics.median(marginal),
           "overhead": statistics.median(overhead)}
    per_model = med["load"] + ROUNDS * med["per_model_round"]
    fronts = {n: _simulated_front_share(n, seed=1) for n in (100, 1000)}
    result = {**med, "per_model": per_model, "fronts": fronts,
              "all": {n: med["overhead"] + n * per_model for n in (100, 1000)},
              "front": {n: med["overhead"] + k * per_model for n, k in fronts.items()}}
    text = _section(args, result)
    print(text)
    if args.write:
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write("\n" + text + "\n")
    return result


def _section(args, r: dict) -> str:
    load = os.getloadavg()[0]
    rows = "\n".join(
        f"| {n} | {r['all'][n]:.0f} s ({r['all'][n] / 60:.1f} min) | {r['fronts'][n]} | {r['front'][n]:.0f} s |"
        for n in (100, 1000))
    return f"""## Re-timing cost per model, and at 100 and 1000 trials (issue 22 point 5)

`python bench/retime_cost.py --models {args.models} --repeats {args.repeats}` ({time.strftime('%Y-%m-%d %H:%M')} UTC).
Machine: {os.cpu_count()} cores ({timing_device("cpu", 1).removeprefix("cpu: ").split(",")[0]}), load average {load:.1f} while
it ran (other helpers' tests and searches: the numbers are upper bounds for a quiet machine); torch
{torch.__version__}, ray {__import__('ray').__version__}. Default small_cnn, measure settings of
conf/launch.yaml (batch 64, 3 timed passes after 1 warm-up, 1 thread), {ROUNDS} rounds; medians of
{args.repeats} interleaved repeats.

| cost | seconds (median) |
|---|---|
| rebuild one model from its checkpoint | {r['load']:.3f} |
| one model, one round (marginal: (T_N - T_N/2) / (N/2)) | {r['per_model_round']:.3f} |
| one model, all {ROUNDS} rounds + rebuild | {r['per_model']:.3f} |
| the pinned Ray task's fixed overhead (worker start, base weights) | {r['overhead']:.2f} |

Extrapolated (overhead + models x per model; a node's models are timed serially, nodes in parallel):

| completed trials | scope=all | scope=front models (layers=2, simulated cloud) | scope=front |
|---|---|---|---|
{rows}

The front's count comes from a simulated search (accuracy falling with FLOPs removed plus noise,
the trial's own latency with x0.5-x3 contention noise), not a real 1000-trial run: it grows with
how ragged the front is, not with the number of trials. `search.retime.scope=auto` (the default)
re-times every model up to `all_up_to=100` completed trials and the front's layers above.
"""


if __name__ == "__main__":
    main()
