"""The search on a multi-node Ray cluster on this machine, through the faults a cluster has:
trials lost, retried and duplicated when a worker node dies mid-search, and when the driver is
SIGKILLed mid-search and the search is resumed with ``resume=``.

    python bench/cluster_faults.py                 # both scenarios once, printed
    python bench/cluster_faults.py --repeats 2 --write

The cluster: a head and a worker node, each its own ``ray start`` (separate raylets, 1 CPU and a
custom resource each; bench/loopback_cluster.py, which tests/test_multinode.py uses too). Each
search is tiny (small CNN, 600 generated Fashion-MNIST-like images, 2 trials at a time, a
checkpoint after every protocol stage) and attaches with ``ray_address=``; the storage path is a
``file://`` URI every search shares. Per scenario and repeat:

* worker lost: 8 trials; the worker node's processes are SIGKILLed once one trial finished on it
  and another has written 2+ of its checkpoints there (a new worker joins for the next scenario);
* driver killed: 4 trials; the driver is SIGKILLed once one trial finished and another is
  between checkpoints, then ``python -m search.launch resume=<folder>`` finishes the search.

Counted afterwards from ``trials.parquet``, MLflow (child runs, deleted ones) and Tune's own
records (``result.json`` lines, ``num_failures``): lost = asked - completed rows; duplicated =
rows beyond one per trial id + MLflow runs beyond one per trial id. ``--write`` replaces this
script's section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from bench.loopback_cluster import LoopbackCluster, Outcome, kill_the_driver, lose_a_worker  # noqa: E402
from bench.report import write_section  # noqa: E402

COLUMNS = ("asked", "completed", "lost", "duplicated", "retried", "restarts_total", "restored", "from_scratch",
           "from_scratch_with_checkpoint",
           "mlflow_runs", "orphans_deleted")


def _table(outcomes: list[Outcome]) -> str:
    head = ["scenario", *COLUMNS, "trials finished per node", "wall s", "what happened"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for o in outcomes:
        per_node = ", ".join(f"{k} {v}" for k, v in sorted(o.nodes.items()))
        lines.append("| " + " | ".join([o.scenario, *(str(getattr(o, c)) for c in COLUMNS), per_node,
                                        f"{o.wall_s:.0f}", o.notes]) + " |")
    return "\n".join(lines)


def _totals(outcomes: list[Outcome]) -> str:
    rows = []
    for scenario in dict.fromkeys(o.scenario for o in outcomes):
        runs = [o for o in outcomes if o.scenario == scenario]
        rows.append(f"- {scenario}, {len(runs)} run(s): {sum(o.asked for o in runs)} trials asked, "
                    f"{sum(o.lost for o in runs)} lost, {sum(o.duplicated for o in runs)} duplicated, "
                    f"{sum(o.retried for o in runs)} retried after a failure; of "
                    f"{sum(o.restarts_total for o in runs)} restarts, {sum(o.restored for o in runs)} from a "
                    f"checkpoint, {sum(o.from_scratch for o in runs)} from scratch "
                    f"({sum(o.from_scratch_with_checkpoint for o in runs)} of them with a checkpoint written before)")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()

    from conftest import make_learnable_fmnist  # the same generated data set as the tests

    outcomes: list[Outcome] = []
    load_before = os.getloadavg()
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="cluster_faults_") as tmp:
        work = Path(tmp)
        data = make_learnable_fmnist(work / "data")
        with LoopbackCluster() as cluster:
            cluster.start(workers=1)
            print(f"cluster up in {time.time() - t0:.0f} s: {[(n.name, n.node_id[:8]) for n in cluster.nodes]}", flush=True)
            for r in range(args.repeats):
                worker = next(n for n in reversed(cluster.nodes) if n.name != "head" and n.alive())
                outcomes.append(lose_a_worker(cluster, data, work / f"r{r}", n=8, worker=worker.name))
                print(outcomes[-1], flush=True)
                cluster.add_node(f"worker{len(cluster.nodes)}")
                outcomes.append(kill_the_driver(cluster, data, work / f"r{r}", n=4))
                print(outcomes[-1], flush=True)
    load_after = os.getloadavg()
    versions = ", ".join(f"{p} {importlib.metadata.version(p)}" for p in ("ray", "torch", "optuna", "mlflow"))
    text = (
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}; {versions}. "
        f"Load average (1 min) {load_before[0]:.1f} before, {load_after[0]:.1f} after (other jobs shared "
        f"the cores). Command: `python bench/cluster_faults.py {' '.join(sys.argv[1:])}`; "
        f"{time.time() - t0:.0f} s in all.\n\n"
        "A head and a worker node on one machine (separate `ray start` raylets, 1 CPU each), the search "
        "attached with `ray_address=`, a `file://` storage path shared by all searches, "
        "`search.max_failures=2`, a checkpoint after every protocol stage (`checkpoint_every_s=0`). "
        "Lost = asked - completed rows of trials.parquet; duplicated = rows beyond one per trial id + "
        "MLflow child runs beyond one per trial id; retried = Tune's `num_failures > 0`; restarts = "
        "results with `iterations_since_restore == 1` after a trial's first (a retry or a resume); "
        "restored = restarts that continued from a checkpoint (the first result after it has "
        "`resumed_stage` > 0: the trial reads the furthest-advanced complete checkpoint in its folder on "
        "storage, not only the one Tune restored); from_scratch = restarts at the trial's start; "
        "from_scratch_with_checkpoint = those of them whose trial had reported a checkpoint before; orphans_deleted = MLflow runs of trials the killed driver started but Tune never saved "
        "(the resumed search samples new ones in their place and deletes those runs, restorable).\n\n"
        + _totals(outcomes) + "\n\n" + _table(outcomes) + "\n\n"
        "A worker loss restarts the interrupted trial from a checkpoint (its driver lives on). After a "
        "driver kill Tune restores each trial from the newest checkpoint the experiment state it last "
        "synced knows; that state is uploaded at most every `SyncConfig.sync_period` (300 s by default), "
        "so it can know an older checkpoint or none. The trial itself therefore lists its folder on "
        "storage and continues from the furthest-advanced complete checkpoint there (compared by "
        "protocol stage and step from a small progress file, with the sizes of the files written "
        "beside it so a checkpoint whose upload the kill cut short is never chosen). A trial that "
        "finished just before the kill only reports its final result again. A trial that had not "
        "written a checkpoint yet starts again from scratch; seeded, it gives the same numbers.\n"
    )
    print(text)
    if args.write:
        write_section("## Cluster faults: a worker node lost, the driver killed (multi-node Ray on one machine)", text)


if __name__ == "__main__":
    main()
