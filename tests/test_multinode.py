"""The search on a real multi-node Ray cluster on this machine, and the faults a cluster has.

Two nodes started by ``ray start`` (separate raylets, 1 CPU each, a custom resource each: ``head``
and ``worker1``; see bench/loopback_cluster.py), the search attached with ``ray_address=`` and a
``file://`` storage path shared by every search. Only processes the test started are ever stopped.
The figures of the same scenarios are in bench/RESULTS.md (bench/cluster_faults.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import child_runs

from bench.loopback_cluster import (
    RAY,
    LoopbackCluster,
    kill_the_driver,
    lose_a_worker,
    restarts,
    results_of,
    session_members,
    trials_started_on,
)
from search._session import tune_storage
from search.pareto import read_trials

pytestmark = pytest.mark.skipif(RAY is None or not sys.platform.startswith("linux"),
                                reason="needs the ray command line and Linux (/proc) to start and stop nodes")


@pytest.fixture(scope="module")
def cluster():
    with LoopbackCluster() as c:
        c.start(workers=1)
        yield c
    for node in c.nodes:  # stopped: nothing of ours is left running
        assert not session_members(node.sid), f"{node.name} left processes behind"


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("multinode")


def _assert_every_trial_once(out: Path, n: int) -> list[dict]:
    rows = read_trials(out / "trials.parquet")
    assert len(rows) == n and len({r["trial_id"] for r in rows}) == n
    assert all(r["status"] == "COMPLETED" for r in rows)
    runs = child_runs(out, "prunesearch")  # not deleted ones
    assert sorted(r.data.tags["trial_id"] for r in runs) == sorted(r["trial_id"] for r in rows)
    assert all(r.info.status == "FINISHED" for r in runs)
    return rows


def test_trials_run_on_both_nodes_and_survive_losing_the_worker(cluster, tiny_fmnist, work):
    """Both nodes run trials (node ids in trials.parquet, told apart by each node's own custom
    resource); then the worker dies mid-trial and Tune retries that trial on the head from a
    checkpoint it wrote on the worker; every trial once, one MLflow run each."""
    n = 8  # about 4 per node: one finishes on the worker, the next is interrupted there
    result = lose_a_worker(cluster, tiny_fmnist, work, n=n)
    out = work / "out" / "lose_worker1"
    rows = _assert_every_trial_once(out, n)
    names = cluster.names_by_id()
    assert {names[r["node_id"]] for r in rows} == {"head", "worker1"}  # finished on each node
    assert all(r["node_ip"] for r in rows)
    assert (result.lost, result.duplicated) == (0, 0)
    assert result.retried >= 1 and result.restored >= 1 and result.from_scratch == 0
    # The retried trial ran on the worker, then on the head, and continued from a checkpoint:
    # its first result after the restart is not the trial's first.
    retried = [d for d in (work / "shared" / "lose_worker1" / "tune").iterdir() if d.is_dir() and restarts(results_of(d))]
    assert retried
    on_worker = trials_started_on(cluster, cluster.node("worker1"))
    for trial_dir in retried:
        results = results_of(trial_dir)
        # It ran on the worker: the worker's own temp dir holds its working folder (its result
        # lines from there can be lost: Tune restores the trial's folder as last synced).
        assert trial_dir.name in on_worker
        [first_after] = restarts(results)
        assert first_after > 1
        assert names[results[-1]["node_id"]] == "head"


@pytest.mark.slow
def test_a_killed_driver_resumes_on_the_cluster(cluster, tiny_fmnist, work):
    """The driver SIGKILLed mid-search; ``resume=`` on the same cluster finishes the search with
    every trial once and no duplicate MLflow run (orphans of trials Tune never saved: deleted)."""
    if not cluster.node("worker1").alive():  # the test above killed it: join a fresh worker
        cluster.add_node("worker2")
    n = 4
    result = kill_the_driver(cluster, tiny_fmnist, work, n=n)
    _assert_every_trial_once(work / "out" / "driver_killed", n)
    assert (result.lost, result.duplicated) == (0, 0)


def test_each_search_gets_its_own_folder_of_a_shared_storage_path(tmp_path):
    # Two searches sharing one storage path (a cluster's EFS or S3 prefix) must not share Tune's
    # experiment folder, or resuming one would restore the other's trials; a URI stays a URI.
    a, b = tmp_path / "out" / "a", tmp_path / "out" / "b"
    assert tune_storage("s3://bucket/prune/", a) == "s3://bucket/prune/a"
    assert tune_storage(str(tmp_path / "shared"), a) != tune_storage(str(tmp_path / "shared"), b)
    assert tune_storage(str(tmp_path / "shared"), a) == str(tmp_path / "shared" / "a")
    assert tune_storage("~/x", a) == str(Path.home() / "x" / "a")
    assert tune_storage(None, a) == str(a / "ray")


def test_restarts_are_read_from_result_lines_even_when_the_first_lines_are_lost():
    def lines(*pairs):  # (training_iteration, iterations_since_restore)
        return [{"training_iteration": t, "iterations_since_restore": s} for t, s in pairs]

    assert restarts(lines((1, 1), (2, 2), (3, 3))) == []  # never restarted
    assert restarts(lines((1, 1), (2, 2), (3, 1), (4, 2))) == [3]  # from the checkpoint of iteration 2
    assert restarts(lines((1, 1), (2, 2), (1, 1))) == [1]  # from scratch
    assert restarts(lines((3, 1), (4, 2))) == [3]  # the lines before the failure lost with the node
