"""A Ray cluster of several nodes on one machine, and the search's fault scenarios run on it.

Each node is its own ``ray start --block`` process (its own raylet, object store and worker
processes) started in a session of its own, so everything that node runs belongs to one session
whose id is the ``ray start`` pid (Ray puts each worker process in a process group of its own,
but it stays in the session): stopping a node kills exactly that session's processes, never a
Ray that something else started on this machine (``ray stop`` would end every Ray of the user).
Every port is picked free here instead of Ray's defaults (6379, 10001, 52365, ...), which
another Ray on the machine may hold.

Ray turns ``--node-ip-address=127.0.0.1`` into the machine's own address
(``ray._private.services.resolve_ip_for_localhost``: a node must be reachable from the others),
so the nodes listen on that address, not on loopback alone. Token authentication
(``RAY_AUTH_MODE=token`` with a token made for this cluster only, passed in the environment,
never written to ``~/.ray``) keeps out anyone who does not hold the token.

Shared by ``tests/test_multinode.py`` (CI) and ``bench/cluster_faults.py`` (the figures in
``bench/RESULTS.md``), so the test asserts what the benchmark reports.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The `ray` command of this Python's environment (on PATH only when the environment is activated).
RAY = next((str(p) for p in (Path(sys.executable).parent / "ray",) if p.exists()), shutil.which("ray"))

__all__ = ["RAY", "LoopbackCluster", "Node", "Outcome", "SearchRun", "kill_session", "kill_the_driver", "lose_a_worker",
           "outcome", "restarts", "results_of", "session_members", "tiny_search_args", "trials_started_on"]


def free_port() -> int:
    """A TCP port nothing listens on right now (the OS picks it; a tiny race remains)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def session_members(sid: int) -> list[int]:
    """Pids of the live (not zombie) processes of session ``sid`` (Linux: /proc/<pid>/stat)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # "pid (comm) state ppid pgrp session ...": comm may hold spaces, so split after it
            state, _ppid, _pgrp, session = stat.read_text().rpartition(")")[2].split()[:4]
        except (OSError, ValueError):
            continue  # the process ended while we looked
        if int(session) == sid and state != "Z":
            pids.append(int(stat.parent.name))
    return pids


def kill_session(sid: int, sig: int = signal.SIGKILL) -> None:
    for pid in session_members(sid):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


@dataclass
class Node:
    """One ``ray start --block`` process and everything it started (one session)."""

    name: str  # head, worker1, ...: also the node's custom resource, which only this node has
    proc: subprocess.Popen
    log: Path
    node_id: str | None = None  # Ray's node id, known once the node has joined

    @property
    def sid(self) -> int:
        return self.proc.pid  # started with start_new_session: the leader's pid is the session id

    def alive(self) -> bool:
        return self.proc.poll() is None


class LoopbackCluster:
    """A head node and worker nodes on this machine, each with ``num_cpus`` CPUs and a custom
    resource named after it; use as a context manager so every node is stopped at the end."""

    def __init__(self, num_cpus: int = 1, object_store_mb: int = 150):
        # Short and under /tmp: Ray's Unix sockets live in the temp dir, and a socket path
        # longer than 107 bytes (pytest's tmp_path easily is) cannot be bound.
        self.root = Path(tempfile.mkdtemp(prefix="rmn", dir="/tmp"))
        self.num_cpus, self.object_store_mb = num_cpus, object_store_mb
        self.port = free_port()
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        self.env.pop("RAY_ADDRESS", None)  # a search attaches to this cluster only through ray_address=
        self.nodes: list[Node] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> LoopbackCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, workers: int = 1, timeout: float = 180) -> LoopbackCluster:
        self.add_node("head", timeout=timeout, learn_id=False)
        for i in range(workers):
            self.add_node(f"worker{i + 1}", timeout=timeout, learn_id=i == workers - 1)
        return self

    def add_node(self, name: str, timeout: float = 180, learn_id: bool = True) -> Node:
        """Start one node and wait until Ray says it runs; then (``learn_id``) wait until the
        cluster lists it and learn the node id of every node."""
        head = not self.nodes
        args = [RAY, "start", "--block", "--node-ip-address=127.0.0.1", f"--num-cpus={self.num_cpus}",
                f"--resources={json.dumps({name: 1})}", f"--temp-dir={self.root / name}", "--disable-usage-stats",
                f"--object-store-memory={self.object_store_mb * 2**20}",
                *(f"--{flag}={free_port()}" for flag in (
                    "node-manager-port", "object-manager-port", "metrics-export-port", "dashboard-agent-listen-port",
                    "dashboard-agent-grpc-port", "runtime-env-agent-port"))]
        if head:
            args += ["--head", f"--port={self.port}", "--include-dashboard=false", f"--ray-client-server-port={free_port()}"]
        else:
            args += [f"--address={self.address}"]
        log = self.root / f"{name}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        node = Node(name, proc, log)
        self.nodes.append(node)
        deadline = time.time() + timeout
        while "Ray runtime started." not in log.read_text():
            if not node.alive() or time.time() > deadline:
                raise RuntimeError(f"ray node {name} did not start; its log {log} ends:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        if learn_id:
            self._learn_node_ids(deadline)
        return node

    def _learn_node_ids(self, deadline: float) -> None:
        """Node id of every node, from the cluster's node table (a short-lived driver)."""
        probe = ("import json, sys, time, ray\n"
                 "ray.init(address=sys.argv[1], log_to_driver=False)\n"
                 "want = set(sys.argv[2:])\n"
                 "while True:\n"
                 "    alive = {r: n['NodeID'] for n in ray.nodes() if n['Alive'] for r in n['Resources'] if r in want}\n"
                 "    if set(alive) == want: break\n"
                 "    time.sleep(0.5)\n"
                 "print(json.dumps(alive))\n")
        names = [n.name for n in self.nodes if n.alive()]
        result = subprocess.run([sys.executable, "-c", probe, self.address, *names], env=self.env,
                                capture_output=True, text=True, timeout=max(10.0, deadline - time.time()))
        if result.returncode != 0:
            raise RuntimeError(f"cannot read the node table of {self.address}:\n{result.stderr[-3000:]}")
        ids = json.loads(result.stdout.strip().splitlines()[-1])
        for node in self.nodes:
            node.node_id = ids.get(node.name, node.node_id)

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def names_by_id(self) -> dict[str, str]:
        """Node id -> node name (head, worker1, ...), for every node this cluster ever had."""
        return {n.node_id: n.name for n in self.nodes if n.node_id}

    def kill(self, node: Node) -> None:
        """SIGKILL every process of the node at once (its raylet, object store, the trials it
        runs): the node is gone as if its machine had died."""
        kill_session(node.sid)
        node.proc.wait()

    def stop(self) -> None:
        """Stop every node this cluster started, workers first: SIGTERM to ``ray start`` (Ray's
        own shutdown of the node), then SIGKILL to whatever of its session is left after 15 s;
        then remove the temp dir."""
        for node in reversed(self.nodes):
            if node.alive():
                node.proc.terminate()
                try:
                    node.proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    pass
            kill_session(node.sid)
            node.proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)


# -- the search on the cluster -------------------------------------------------------------------


def tiny_search_args(data_root: Path, work: Path, name: str, n: int, address: str, *extra: str) -> list[str]:
    """A search of ``n`` tiny trials (the small CNN, a few hundred images, short fine-tuning)
    that attaches to ``address``; the base model cache, the outputs, MLflow and the shared
    ``storage_path`` live under ``work``. The storage path is a ``file://`` URI, as an
    ``s3://`` one would be on a real cluster, and every search shares it."""
    return [
        f"ray_address={address}", f"data.root={data_root}", "data.val_size=100", "data.batch_size=32",
        "data.eval_batch_size=100", "model.pretrain.epochs=1", f"cache_dir={work / 'cache'}",
        f"output_root={work / 'out'}", f"storage_path=file://{work / 'shared'}", f"name={name}",
        f"search.num_trials={n}", "search.max_concurrent_trials=2", "search.max_failures=2",
        "search.p={low: 0.02, high: 0.05}", "search.q={low: 0.1, high: 0.2}",
        "measure.batch_size=4", "measure.repeats=1",
        # A checkpoint after every protocol stage (the default waits 30 s between them, longer
        # than these trials last): a trial interrupted mid-way has one to continue from.
        "checkpoint_every_s=0", *extra,
    ]


@dataclass
class SearchRun:
    """``python -m search.launch`` as a child process in a session of its own (a SIGKILL of the
    session is a driver crash); output to ``<out>.log``."""

    cluster: LoopbackCluster
    args: list[str]
    out: Path
    proc: subprocess.Popen | None = None
    t0: float = 0.0

    def __enter__(self) -> SearchRun:
        return self.start()

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:  # never leave a search of ours running
            self.kill()

    def start(self) -> SearchRun:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.t0 = time.time()
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "search.launch", *self.args], cwd=ROOT,
                                         env={**self.cluster.env, "OMP_NUM_THREADS": "1"},
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    @property
    def log(self) -> Path:
        return self.out.with_name(self.out.name + ".log")

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError(f"the search did not end within {timeout:.0f} s; {self.log} ends:\n{self.tail()}") from None

    def kill(self) -> None:
        kill_session(self.proc.pid)
        self.proc.wait()

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text()[-n:] if self.log.exists() else ""

    def trial_dirs(self) -> list[Path]:
        """The trial folders of the search's Tune experiment (in the shared storage), so far."""
        state = self.out / "launch_state.json"
        if not state.exists():
            return []
        tune = Path(json.loads(state.read_text())["experiment_path"].removeprefix("file://"))
        return sorted(p for p in tune.iterdir() if p.is_dir()) if tune.exists() else []


def results_of(trial_dir: Path) -> list[dict]:
    """Every result line Tune wrote for a trial (``result.json``, one JSON object per line)."""
    path = trial_dir / "result.json"
    if not path.exists():
        return []
    lines = []
    for line in path.read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written right now
            break
    return lines


def restarts(results: list[dict]) -> list[int]:
    """The first training iteration after each restart of a trial (a retry or a resume) in its
    result lines. Tune numbers a restored trial's results on from its checkpoint's and counts
    ``iterations_since_restore`` from 1 again: a restart from a checkpoint taken at iteration
    ``t`` starts at ``t + 1``, one from scratch at 1.

    Lines before a restart are not a full history: on a retry Tune brings the trial's folder
    back from storage as last synced, which can drop the last results before the failure, or
    all of them: a first line that already starts past iteration 1 is a restart too."""
    return [r["training_iteration"] for i, r in enumerate(results)
            if r.get("iterations_since_restore") == 1 and (i or r.get("training_iteration", 1) > 1)]


def restart_sources(results: list[dict]) -> list[tuple[bool, bool]]:
    """For each restart of ``restarts``: ``(continued from a checkpoint, a checkpoint existed)``.

    A restart continued from a checkpoint when its first result says it resumed past stage 0
    (``resumed_stage``: the trial may continue from a checkpoint on storage that Tune's restored
    state did not know, and then Tune numbers its results from 1 again) or, for results from
    before that key, starts past iteration 1. A checkpoint existed when a result before the
    restart carried one (Tune writes ``checkpoint_dir_name`` into it)."""
    found = []
    for i, r in enumerate(results):
        if r.get("iterations_since_restore") == 1 and (i or r.get("training_iteration", 1) > 1):
            resumed = r.get("resumed_stage")
            from_checkpoint = resumed > 0 if resumed is not None else r.get("training_iteration", 1) > 1
            existed = any(prev.get("checkpoint_dir_name") for prev in results[:i]) or r.get("training_iteration", 1) > 1
            found.append((from_checkpoint, existed))
    return found


@dataclass
class Outcome:
    """What one search on the cluster left behind, counted from trials.parquet, MLflow and
    Tune's own records; lost and duplicated should be 0."""

    scenario: str
    asked: int  # search.num_trials
    rows: int  # rows of trials.parquet
    completed: int  # rows with status COMPLETED
    lost: int  # trials asked for that are not in trials.parquet as COMPLETED
    duplicated: int  # rows beyond one per trial id, plus MLflow child runs beyond one per trial id
    mlflow_runs: int  # child runs not deleted
    orphans_deleted: int  # runs of trials the resumed search never knew (deleted, restorable)
    retried: int  # trials Tune started again after a failure (num_failures > 0)
    restarts_total: int  # all restarts (a retry or a resume), over all trials
    restored: int  # restarts that continued from a checkpoint
    from_scratch: int  # restarts that began the trial again
    nodes: dict[str, int]  # node name -> trials that finished there
    from_scratch_with_checkpoint: int = 0  # from_scratch restarts of trials that had written a checkpoint before
    trials_per_node_seen: dict[str, int] = field(default_factory=dict)  # node name -> trials with a result there
    wall_s: float = 0.0
    notes: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def outcome(scenario: str, run: SearchRun, asked: int, wall_s: float, notes: str = "") -> Outcome:
    """Count what the finished search of ``run`` wrote (see :class:`Outcome`)."""
    import mlflow
    from ray.tune import ExperimentAnalysis

    from search.pareto import read_trials

    rows = read_trials(run.out / "trials.parquet")
    ids = [r["trial_id"] for r in rows]
    state = json.loads((run.out / "launch_state.json").read_text())
    client = mlflow.MlflowClient(state["tracking_uri"])
    experiment = client.get_experiment_by_name("prunesearch").experiment_id
    parent = f"tags.mlflow.parentRunId = '{state['parent_run_id']}'"
    runs = client.search_runs([experiment], filter_string=parent)
    deleted = client.search_runs([experiment], filter_string=parent, run_view_type=mlflow.entities.ViewType.DELETED_ONLY)
    per_trial = Counter(r.data.tags.get("trial_id") for r in runs)
    names = run.cluster.names_by_id()
    failures = {t.trial_id: t.num_failures for t in ExperimentAnalysis(state["experiment_path"]).trials}
    n_restored = n_restarts = n_scratch = n_scratch_ck = 0
    seen: Counter = Counter()
    # Only the experiment's trials: a trial the killed driver started but never saved has a folder
    # too (its MLflow run is an orphan, deleted; the resumed search sampled another in its place).
    for trial_dir in (d for d in run.trial_dirs() if d.name.split("_")[2] in failures):
        results = results_of(trial_dir)
        found = restart_sources(results)
        n_restarts += len(found)
        n_restored += sum(ck for ck, _ in found)
        n_scratch += sum(not ck for ck, _ in found)
        n_scratch_ck += sum(not ck and existed for ck, existed in found)
        seen.update({names.get(n, n) for n in {r.get("node_id") for r in results} if n})
    completed = {r["trial_id"] for r in rows if r["status"] == "COMPLETED"}
    return Outcome(
        scenario=scenario, asked=asked, rows=len(rows), completed=len(completed), lost=asked - len(completed),
        duplicated=(len(ids) - len(set(ids))) + sum(c - 1 for c in per_trial.values()),
        mlflow_runs=len(runs), orphans_deleted=len(deleted),
        retried=sum(n > 0 for n in failures.values()), restarts_total=n_restarts, restored=n_restored,
        from_scratch=n_scratch, from_scratch_with_checkpoint=n_scratch_ck, nodes=dict(Counter(names.get(r["node_id"], str(r["node_id"])) for r in rows)),
        trials_per_node_seen=dict(seen), wall_s=round(wall_s, 1), notes=notes,
    )


# -- the scenarios ---------------------------------------------------------------------------------


def trials_started_on(cluster: LoopbackCluster, node: Node) -> set[str]:
    """Trial folder names that ran on ``node``: a Tune trial works in a folder of its own under
    the temp dir of the node that runs it (``.../artifacts/<time>/<experiment>/working_dirs/<trial>``),
    and every node here has its own temp dir."""
    return {p.name for p in (cluster.root / node.name).glob("session_*/artifacts/*/*/working_dirs/*")}


def _progress(trial_dir: Path) -> tuple[int, bool]:
    """(checkpoints written, finished): the final checkpoint is the only one with the record."""
    ckpts = list(trial_dir.glob("checkpoint_*"))
    return len(ckpts), any((c / "record.json").exists() for c in ckpts)


def _wait_for(what: str, run: SearchRun, condition, timeout: float):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if run.proc.poll() is not None:
            raise RuntimeError(f"the search ended (exit {run.proc.returncode}) before {what}; {run.log} ends:\n{run.tail()}")
        found = condition()
        if found:
            return found
        time.sleep(0.2)
    raise RuntimeError(f"no {what} within {timeout:.0f} s; {run.log} ends:\n{run.tail()}")


def lose_a_worker(cluster: LoopbackCluster, data_root: Path, work: Path, n: int = 8, worker: str = "worker1",
                  timeout: float = 600) -> Outcome:
    """A search on the cluster loses ``worker`` (every process of it SIGKILLed: a crashed machine)
    while a trial on it has written two checkpoints or more and not its last, after another
    trial finished there; Tune retries the interrupted trial (``search.max_failures``) on the
    node that is left.

    Two, not one: Tune takes a trial's checkpoint in two steps (the result that carries it, then
    a ``save`` call on the trial's actor; ``TuneController._schedule_trial_save``), and counts
    it only after the second. A node lost in between loses that checkpoint for Tune, which then
    restores the one before (or, with none, starts the trial again). The second checkpoint on
    storage means the trial went on past the first one's ``save``."""
    node = cluster.node(worker)
    name = f"lose_{worker}"
    with SearchRun(cluster, tiny_search_args(data_root, work, name, n, cluster.address), work / "out" / name) as run:
        def victim():
            states = {d.name: _progress(d) for d in run.trial_dirs() if d.name in trials_started_on(cluster, node)}
            finished = [t for t, (_, done) in states.items() if done]
            mid = [t for t, (k, done) in states.items() if k >= 2 and not done]
            return finished and mid and (mid[0], states[mid[0]][0])

        trial, ckpts = _wait_for(f"a trial with 2+ checkpoints on {worker} after one finished there", run, victim, timeout)
        cluster.kill(node)
        killed_at = time.time() - run.t0
        if run.wait(timeout) != 0:
            raise RuntimeError(f"the search failed after losing {worker}; {run.log} ends:\n{run.tail()}")
    return outcome("worker node killed mid-search", run, n, time.time() - run.t0,
                   notes=f"{worker} killed at {killed_at:.0f} s, trial {trial.split('_')[2]} had {ckpts} checkpoint(s)")


def kill_the_driver(cluster: LoopbackCluster, data_root: Path, work: Path, n: int = 4, timeout: float = 600) -> Outcome:
    """SIGKILL the search's driver once a trial has finished and another is between checkpoints,
    then ``python -m search.launch resume=<folder>`` (same cluster) finishes the search."""
    name = "driver_killed"
    with SearchRun(cluster, tiny_search_args(data_root, work, name, n, cluster.address), work / "out" / name) as run:
        def mid_search():
            states = [_progress(d) for d in run.trial_dirs()]
            return any(done for _, done in states) and any(k and not done for k, done in states)

        _wait_for("a finished trial and one between checkpoints", run, mid_search, timeout)
        run.kill()
        killed_at = time.time() - run.t0
    if (run.out / "trials.parquet").exists():
        raise RuntimeError("the killed search wrote trials.parquet: it was not killed mid-search")
    with SearchRun(cluster, [f"resume={run.out}"], run.out) as resumed:
        if resumed.wait(timeout) != 0:
            raise RuntimeError(f"the resumed search failed; {resumed.log} ends:\n{resumed.tail()}")
    return outcome("driver SIGKILLed, then resume=", run, n, time.time() - run.t0,
                   notes=f"driver killed at {killed_at:.0f} s; resume took {time.time() - resumed.t0:.0f} s")
