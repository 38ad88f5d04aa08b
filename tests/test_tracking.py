"""MLflow tracking: one run per trial however often it is asked for, no metric step twice after a
resume, every run ended, a FLOPs ratio beside the FLOPs, a search summary to sort searches by, an
experiment declared for training with a saved runs view, and a pruned model a user loads with one
call; then a real tiny Tune run whose trainable reports what ``trainables.ray_trainable`` reports.
What the browser shows of all this is checked in tests/test_mlflow_ui.py."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import ray
import torch
from mlflow import MlflowClient
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from search.tracking import (
    EXPERIMENT_KIND,
    RUNS_VIEW,
    SearchTracker,
    default_tracking_uri,
    summary_key,
    ui_url,
)
from search.tune_callback import MLflowTuneCallback

PARENT = "mlflow.parentRunId"
# A trial config as Optuna samples it (search/space.py): flat, one ratio_<i> per unit.
CONFIG = {"criterion": "l1", "schedule": "per_layer", "ratio_0": 0.25, "ratio_1": 0.5, "lr": 0.01}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite store for the module: creating one runs MLflow's migrations (seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def tracker(store, request) -> SearchTracker:
    """A started search in an experiment of its own (named after the test)."""
    t = SearchTracker(store, request.node.name)
    t.start_search("search", {"model": {"name": "small_cnn"}, "budget": 2, "units": ["a", "b"]})
    return t


def children(client: MlflowClient, t: SearchTracker) -> dict[str, mlflow.entities.Run]:
    runs = client.search_runs([t.experiment_id], f"tags.`{PARENT}` = '{t.parent_run_id}'")
    return {r.data.tags["trial_id"]: r for r in runs}


def steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def curve_point(step: int, val_acc: float) -> dict:
    """One evaluation during fine-tuning, keyed as the protocol's ``emit`` reports it."""
    return {"step": step, "epoch": step / 20, "val_acc": val_acc, "phase": "recovery", "flops": 5e6,
            "unit": "features.7"}


def final_result(step: int, val_acc: float) -> dict:
    """The last result of a finished trial, keyed as ``trainables.ray_trainable`` reports it: the
    protocol's final report (``test_acc`` None, so dropped) plus ``trial_done``, ``wall_s``, ``params``."""
    return {"step": step, "epoch": step / 20, "val_acc": val_acc, "phase": "final", "flops": 5e6,
            "params": 1e4, "latency_ms": 1.5, "flops_before": 8e6, "trial_done": True, "wall_s": 3.0}


def test_tracking_imports_without_ray():
    """A pure-MLflow user (``python -m search.blend``) does not load the cluster."""
    code = (
        "import sys\n"
        "sys.modules['ray'] = None\n"  # any import of ray now raises ImportError
        "import search.tracking\n"
        "leaked = [m for m in sys.modules if m.split('.')[0] == 'ray' and sys.modules[m] is not None]\n"
        "assert not leaked, leaked\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_default_tracking_uri_is_absolute_and_env_wins(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    uri = default_tracking_uri("out")
    assert uri.startswith("sqlite:///")
    path = Path(uri[len("sqlite:///"):])
    assert path.is_absolute() and path == tmp_path.resolve() / "out" / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert default_tracking_uri("out") == "http://mlflow.example:5000"


def test_artifacts_live_next_to_the_store(store, tracker):
    location = tracker.client.get_experiment(tracker.experiment_id).artifact_location
    assert location == (Path(store[len("sqlite:///"):]).parent / "mlartifacts").as_uri()


def test_start_search_logs_flat_config(tracker):
    run = tracker.client.get_run(tracker.parent_run_id)
    assert run.data.params["model.name"] == "small_cnn"
    assert json.loads(run.data.params["units"]) == ["a", "b"]
    local = mlflow.artifacts.download_artifacts(
        run_id=tracker.parent_run_id, artifact_path="config.yaml", tracking_uri=tracker.tracking_uri
    )
    assert "small_cnn" in Path(local).read_text()


def test_trial_run_is_get_or_create(tracker):
    first = tracker.trial_run("t1", CONFIG)
    assert tracker.trial_run("t1", CONFIG) == first
    fresh = SearchTracker(tracker.tracking_uri, tracker.client.get_experiment(tracker.experiment_id).name,
                          parent_run_id=tracker.parent_run_id)
    assert fresh.trial_run("t1", CONFIG) == first  # found again by tag, not created
    found = children(tracker.client, tracker)
    assert list(found) == ["t1"]
    run = found["t1"]
    assert run.data.tags["criterion"] == "l1"
    # under the run command's keys: the per-unit ratios are one list, lr is the fine-tuning one
    assert run.data.params == {"criterion": "l1", "prune.schedule": "per_layer", "prune.ratios": "[0.25, 0.5]",
                               "finetune.lr": "0.01"}


def test_front_trial_config_is_unwrapped(tracker):
    """A full-fidelity fine-tuning trial nests the searched config (search/launch.py); its run
    has the same params as the searched trial, so the two sit in the same columns."""
    tracker.trial_run("ft", {"front_config": CONFIG})
    tracker.trial_run("t1", CONFIG)
    runs = children(tracker.client, tracker)
    assert runs["ft"].data.params == runs["t1"].data.params
    assert runs["ft"].data.params["prune.ratios"] == "[0.25, 0.5]"
    assert runs["ft"].data.tags["criterion"] == "l1"  # sortable in the UI like any trial


def test_log_result_never_logs_a_step_twice(tracker):
    tracker.trial_run("t1", CONFIG)
    for step in (0, 1, 2):
        tracker.log_result("t1", curve_point(step, 0.5 + step / 10))
    # A resumed search: a new tracker re-opens the search run and the trial runs again from step 1.
    resumed = SearchTracker(tracker.tracking_uri, tracker.client.get_experiment(tracker.experiment_id).name)
    resumed.start_search("search", {}, run_id=tracker.parent_run_id)
    resumed.trial_run("t1", CONFIG)
    for step in (1, 2, 3):
        resumed.log_result("t1", curve_point(step, 0.9))
    run_id = resumed.trial_run("t1", {})
    history = {m.step: m.value for m in tracker.client.get_metric_history(run_id, "val_acc")}
    assert steps(tracker.client, run_id, "val_acc") == [0, 1, 2, 3]
    assert history == pytest.approx({0: 0.5, 1: 0.6, 2: 0.7, 3: 0.9})  # old points kept
    assert steps(tracker.client, run_id, "epoch") == [0, 1, 2, 3]
    # Strings (phase, unit) are not metrics; step is the x-axis, not a metric.
    assert set(tracker.client.get_run(run_id).data.metrics) == {"val_acc", "epoch", "flops"}
    with pytest.raises(ValueError, match="no 'step'"):
        resumed.log_result("t1", {"val_acc": 0.9})


def test_end_trial_statuses_and_tags(tracker):
    """The callback's sequence for a finished trial: the curve, then the last result (same step as
    the curve's last point) through log_result, then the same result as end_trial's final."""
    for trial_id in ("done", "stopped", "failed"):
        tracker.trial_run(trial_id, {**CONFIG, "criterion": "apoz"})
        tracker.log_result(trial_id, curve_point(10, 0.9))
    final = final_result(10, 0.93)  # val_acc on the whole validation set; the curve used a subset
    tracker.log_result("done", final)
    tracker.end_trial("done", "FINISHED", final=final)
    tracker.end_trial("stopped", "KILLED")
    tracker.end_trial("failed", "FAILED")
    runs = children(tracker.client, tracker)
    assert {k: r.info.status for k, r in runs.items()} == {
        "done": "FINISHED", "stopped": "KILLED", "failed": "FAILED"}
    assert {k: r.data.tags["stopped_early"] for k, r in runs.items()} == {
        "done": "false", "stopped": "true", "failed": "false"}
    done, client = runs["done"], tracker.client
    # MLflow's latest value of each final metric is the final one.
    assert {k: done.data.metrics[k] for k in ("val_acc", "flops", "params", "wall_s")} == (
        pytest.approx({k: final[k] for k in ("val_acc", "flops", "params", "wall_s")}))
    # the trial's own timing has its own name: latency_ms is the search's serial re-timing
    assert done.data.metrics["latency_ms_trial"] == final["latency_ms"] and "latency_ms" not in done.data.metrics
    assert done.data.metrics["flops_kept"] == pytest.approx(5e6 / 8e6)  # pruned / unpruned FLOPs
    assert steps(client, done.info.run_id, "flops_kept") == [10]
    assert "flops_kept" not in runs["stopped"].data.metrics  # curve points carry no flops_before
    assert steps(client, done.info.run_id, "val_acc") == [10, 11]  # differs from the curve: one step on
    assert steps(client, done.info.run_id, "flops") == [10]  # equal final value: not again
    assert steps(client, done.info.run_id, "params") == [10]  # logged with the last result, not again
    assert steps(client, runs["stopped"].info.run_id, "val_acc") == [10]
    assert client.list_artifacts(done.info.run_id) == []  # record.json only for front trials
    tracker.set_pareto("done", True)
    assert tracker.client.get_run(done.info.run_id).data.tags["pareto"] == "true"
    with pytest.raises(ValueError, match="valid: FINISHED, KILLED, FAILED"):
        tracker.end_trial("done", "DONE")


def test_command_tag_is_kept_whole_or_says_it_was_cut(tracker):
    from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

    tracker.trial_run("t1", CONFIG)
    tracker.trial_run("t2", CONFIG)
    command = "python -m trainables.run criterion=l1 prune.schedule=per_layer 'prune.ratios=[0.25,0.5]'"
    tracker.set_command("t1", command)
    long = "python -m trainables.run 'prune.ratios=[" + ",".join(["0.123456789"] * 2000) + "]'"
    tracker.set_command("t2", long)
    runs = children(tracker.client, tracker)
    assert runs["t1"].data.tags["command"] == command
    cut = runs["t2"].data.tags["command"]
    assert len(cut) == MAX_TAG_VAL_LENGTH and cut.endswith("(cut: the whole command is in trials.parquet)")
    assert cut.startswith(long[:1000])


def test_log_artifact_stores_a_file_of_the_trial(tracker, tmp_path):
    """How search/results.py keeps the record of a front trial."""
    tracker.trial_run("t1", CONFIG)
    record = tmp_path / "record.json"
    record.write_text(json.dumps({"final_val_acc": 0.93}))
    tracker.log_artifact("t1", record)
    run_id = tracker.find_run("t1")
    assert [f.path for f in tracker.client.list_artifacts(run_id)] == ["record.json"]
    local = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="record.json", tracking_uri=tracker.tracking_uri)
    assert json.loads(Path(local).read_text())["final_val_acc"] == 0.93
    with pytest.raises(FileNotFoundError, match="not a file"):
        tracker.log_artifact("t1", tmp_path)


def test_finalize_dangling_and_finish_search(tracker, tmp_path):
    for trial_id in ("a", "b", "c"):
        tracker.trial_run(trial_id, {})
    tracker.end_trial("c", "FINISHED")
    assert tracker.finalize_dangling() == 2
    runs = children(tracker.client, tracker)
    assert {k: r.info.status for k, r in runs.items()} == {"a": "KILLED", "b": "KILLED", "c": "FINISHED"}
    assert tracker.finalize_dangling() == 0
    tracker.trial_run("a", {})  # a resumed search runs trial a again: its run is re-opened
    assert tracker.client.get_run(runs["a"].info.run_id).info.status == "RUNNING"
    (tmp_path / "trials.parquet").write_bytes(b"PAR1")
    tracker.finish_search({"hypervolume": 0.42}, [tmp_path / "trials.parquet"])
    parent = tracker.client.get_run(tracker.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.metrics["hypervolume"] == 0.42
    # c finished without metrics: counted as a trial, but there is no best accuracy to report.
    assert parent.data.metrics == {"hypervolume": 0.42, "n_trials": 3.0}
    assert [f.path for f in tracker.client.list_artifacts(tracker.parent_run_id)] == [
        "config.yaml", "trials.parquet"]
    assert "RUNNING" not in {r.info.status for r in children(tracker.client, tracker).values()}


def test_drop_orphans_deletes_only_runs_of_unknown_trials(tracker):
    for trial_id in ("kept", "ended", "lost"):
        tracker.trial_run(trial_id, CONFIG)
    tracker.end_trial("ended", "FAILED")  # a failed trial Tune knows is not an orphan
    lost = tracker.find_run("lost")
    assert tracker.drop_orphans(["kept", "ended", "never-started"]) == ["lost"]
    assert sorted(children(tracker.client, tracker)) == ["ended", "kept"]
    run = tracker.client.get_run(lost)  # soft-deleted: still there, tagged, restorable
    assert run.info.lifecycle_stage == "deleted" and run.info.status == "KILLED"
    assert run.data.tags["orphaned"] == "true"
    assert tracker.find_run("lost") is None
    assert tracker.drop_orphans(["kept", "ended"]) == []


def test_pruned_model_loads_with_one_call(tracker, monkeypatch):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 3, 3, padding=1), torch.nn.BatchNorm2d(3), torch.nn.ReLU(),
        torch.nn.MaxPool2d(2), torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 10),
    )
    x = torch.randn(2, 1, 8, 8)  # (B, C, H, W)
    model(torch.randn(8, 1, 8, 8))  # non-trivial BatchNorm running statistics
    tracker.trial_run("t1", CONFIG)
    uri = tracker.log_pruned_model("t1", model, x, {"units": {"0": {"kept": [0, 2]}}})
    run_id = tracker.trial_run("t1", {})
    assert uri == f"runs:/{run_id}/model/model.pt2"
    assert model.training  # left as it came
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracker.tracking_uri)  # the user's environment
    loaded = torch.export.load(
        mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="model/model.pt2")).module()
    model.eval()
    torch.testing.assert_close(loaded(x), model(x))
    x5 = torch.randn(5, 1, 8, 8)
    torch.testing.assert_close(loaded(x5), model(x5))  # any batch size
    record = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="model/record.json")
    assert json.loads(Path(record).read_text())["units"]["0"]["kept"] == [0, 2]


def test_callback_pickles_without_its_client(tracker):
    name = tracker.client.get_experiment(tracker.experiment_id).name
    callback = MLflowTuneCallback(tracker.tracking_uri, name, tracker.parent_run_id)
    assert callback.tracker.parent_run_id == tracker.parent_run_id  # client created
    for dumps, loads in ((pickle.dumps, pickle.loads), (ray.cloudpickle.dumps, ray.cloudpickle.loads)):
        copy = loads(dumps(callback))
        assert copy._tracker is None
        assert (copy.tracking_uri, copy.experiment, copy.parent_run_id) == (
            tracker.tracking_uri, name, tracker.parent_run_id)
        assert copy.tracker.experiment_id == tracker.experiment_id


def test_tiny_tune_run_logs_every_trial_once(tracker, tmp_path, ray_session):
    """ASHA stops the weak trial at its first rung; one trial raises; one finishes (ASHA's max_t
    decides STOP on its last result, so on_trial_complete must read trial_done from it)."""
    # Built here, captured as data: Ray workers cannot import this test module's functions.
    script = {q: [curve_point(10 * i, q) for i in range(3)] + [final_result(20, q + 0.01)] for q in (0.9, 0.2, 0.95)}

    def trainable(config):
        for i, result in enumerate(script[config["quality"]]):
            if config["quality"] > 0.93 and i == 2:
                raise RuntimeError("boom")
            tune.report(result)

    name = tracker.client.get_experiment(tracker.experiment_id).name
    callback = MLflowTuneCallback(tracker.tracking_uri, name, tracker.parent_run_id, strict=True)
    tuner = tune.Tuner(
        trainable,
        # Grid order + one trial at a time make ASHA's decisions deterministic.
        param_space={"quality": tune.grid_search([0.9, 0.2, 0.95]), **CONFIG},
        tune_config=tune.TuneConfig(
            metric="val_acc", mode="max", max_concurrent_trials=1,
            scheduler=ASHAScheduler(time_attr="training_iteration", max_t=4, grace_period=1, reduction_factor=2),
        ),
        run_config=tune.RunConfig(name="tiny", storage_path=str(tmp_path / "ray"), callbacks=[callback], verbose=0),
    )
    results = tuner.fit()
    trial_of = {r.config["quality"]: r.metrics["trial_id"] for r in results}
    runs = children(tracker.client, tracker)
    assert set(runs) == set(trial_of.values())  # one run per trial
    done, stopped, failed = (runs[trial_of[q]] for q in (0.9, 0.2, 0.95))
    assert (done.info.status, stopped.info.status, failed.info.status) == ("FINISHED", "KILLED", "FAILED")
    assert (done.data.tags["stopped_early"], stopped.data.tags["stopped_early"]) == ("false", "true")
    client = tracker.client
    assert steps(client, done.info.run_id, "epoch") == [0, 10, 20]
    assert steps(client, done.info.run_id, "val_acc") == [0, 10, 20, 21]  # the final value one step on
    assert done.data.metrics["val_acc"] == pytest.approx(0.91)
    assert steps(client, stopped.info.run_id, "val_acc") == [0]
    assert steps(client, failed.info.run_id, "val_acc") == [0, 10]
    assert (done.data.metrics["latency_ms_trial"], done.data.metrics["flops_before"]) == (1.5, 8e6)
    # Only the trial's own numbers: no Tune bookkeeping, no step, no flags or strings.
    assert set(done.data.metrics) == {"val_acc", "epoch", "flops", "flops_kept", "params", "latency_ms_trial",
                                      "flops_before", "wall_s"}
    assert done.data.metrics["flops_kept"] == pytest.approx(5e6 / 8e6)
    assert done.data.params["prune.ratios"] == "[0.25, 0.5]" and done.data.tags["criterion"] == "l1"
    assert client.list_artifacts(done.info.run_id) == []
    assert [f.path for f in client.list_artifacts(failed.info.run_id)] == ["error.txt"]
    assert tracker.finalize_dangling() == 0  # nothing left RUNNING


class _StopAllAfterFirstTrial(tune.Stopper):
    """Stops the whole experiment, as ``TuneConfig(time_budget_s=...)`` does, after one trial."""

    def __init__(self) -> None:
        self.seen_last_step = False

    def __call__(self, trial_id: str, result: dict) -> bool:
        self.seen_last_step |= result.get("step") == 2
        return False

    def stop_all(self) -> bool:
        return self.seen_last_step


def test_experiment_level_stop_ends_the_runs(tracker, tmp_path, ray_session):
    """stop_all() bypasses on_trial_complete; on_experiment_end still ends the run (KILLED)."""

    points = [curve_point(i, 0.5) for i in range(3)]

    def trainable(config):
        for point in points:
            tune.report(point)

    name = tracker.client.get_experiment(tracker.experiment_id).name
    callback = MLflowTuneCallback(tracker.tracking_uri, name, tracker.parent_run_id, strict=True)
    tune.Tuner(
        trainable,
        param_space={"x": tune.grid_search([1, 2])},
        tune_config=tune.TuneConfig(max_concurrent_trials=1),
        run_config=tune.RunConfig(name="budget", storage_path=str(tmp_path / "ray"), callbacks=[callback],
                                  stop=_StopAllAfterFirstTrial(), verbose=0),
    ).fit()
    runs = children(tracker.client, tracker)
    assert [(r.info.status, r.data.tags["stopped_early"]) for r in runs.values()] == [("KILLED", "true")]
    assert steps(tracker.client, next(iter(runs.values())).info.run_id, "val_acc") == [0, 1, 2]


def test_progress_callback_prints_one_line_per_ended_trial():
    from types import SimpleNamespace

    from search.tune_callback import ProgressCallback

    lines: list[str] = []
    progress = ProgressCallback(3, printer=lines.append)
    done = SimpleNamespace(config={"criterion": "l1", "ratio": 0.30034730118, "seed": 1, "lr": 0.01},
                           last_result={"val_acc": 0.91234, "trial_done": True})
    stopped = SimpleNamespace(config={"front_config": {"criterion": "taylor"}}, last_result={"val_acc": 0.5})
    failed = SimpleNamespace(config={"criterion": "apoz"}, last_result={})
    progress.on_trial_complete(0, [], done)
    progress.on_trial_complete(0, [], stopped)
    progress.on_trial_error(0, [], failed)
    assert [ln.split("  (")[0] for ln in lines] == [
        "[1/3] done    criterion=l1 prune.ratio=0.3 seed=1  val_acc=0.9123",  # command-line keys
        "[2/3] stopped criterion=taylor  val_acc=0.5000",
        "[3/3] failed  criterion=apoz  val_acc=-",
    ]
    assert all(ln.endswith(" s)") for ln in lines)


def test_child_runs_are_named_by_what_differs(tracker):
    from search.tracking import run_name

    assert run_name("a1_00003", {"criterion": "l1", "schedule": "uniform", "ratio": 0.5, "p": 0.0213, "q": 0.31,
                                 "lr": 0.01}) == "l1 · uniform 0.50 · p0.021 q0.31 · a1_00003"
    assert run_name("b_1", {"criterion": "taylor", "schedule": "per_layer", "ratio_0": 0.2, "ratio_1": 0.4}) == \
        "taylor · per_layer mean 0.30 · b_1"
    assert run_name("c_2", {"criterion": "fpgm", "schedule": "differential", "ratio_low": 0.1, "ratio_high": 0.6,
                            "seed": 2, "method": "one_shot"}) == "fpgm · differential 0.10-0.60 · seed2 · one_shot · c_2"
    tracker.trial_run("t9", {"criterion": "l1", "schedule": "uniform", "ratio": 0.25})
    run = children(tracker.client, tracker)["t9"]
    assert run.info.run_name == "l1 · uniform 0.25 · t9"


def _finished_trial(t: SearchTracker, trial_id: str, val_acc: float, flops: float, status: str = "FINISHED",
                    **tags: str) -> None:
    """A trial run as the Tune callback leaves it: the curve, then the final result (with the
    unpruned model's FLOPs, 8e6, as ``flops_before``), then ended with ``status``."""
    t.trial_run(trial_id, CONFIG, tags)
    t.log_result(trial_id, curve_point(5, val_acc - 0.1))
    final = {**final_result(10, val_acc), "flops": flops}
    if status == "FINISHED":
        t.log_result(trial_id, final)
    t.end_trial(trial_id, status, final=final if status == "FINISHED" else None)


def test_search_summary_sorts_searches(tracker, tmp_path):
    """The parent run carries the best accuracy overall and at each FLOPs-ratio target, from
    finished trials only, and the caller's own summary values win."""
    for trial_id, acc, flops in (("big", 0.95, 6e6), ("half", 0.90, 4e6), ("third", 0.85, 2.6e6),
                                 ("quarter", 0.80, 2e6), ("tiny", 0.60, 1e6)):
        _finished_trial(tracker, trial_id, acc, flops)
    _finished_trial(tracker, "stopped", 0.99, 1e6, status="KILLED")  # ASHA: unfinished, never counts
    _finished_trial(tracker, "failed", 0.99, 1e6, status="FAILED")
    _finished_trial(tracker, "refit", 0.99, 1e6, fidelity="full")  # a front trial re-run at full fidelity
    _finished_trial(tracker, "orphan", 0.99, 1e6)
    tracker.drop_orphans(["big", "half", "third", "quarter", "tiny", "stopped", "failed", "refit"])
    summary = tracker.search_summary((0.5, 0.25, 0.1))
    assert summary == pytest.approx({"n_trials": 7, "best_val_acc": 0.95, "best_val_acc_flops_kept_le_0.5": 0.90,
                                     "best_val_acc_flops_kept_le_0.25": 0.80})  # nothing at <= 0.1: left out
    assert summary_key(0.5) == "best_val_acc_flops_kept_le_0.5"
    with pytest.raises(ValueError, match=r"flops_kept must be shares of FLOPs kept in \(0, 1\], but got \[0\]"):
        tracker.search_summary((0.5, 0))
    tracker.finish_search({"hypervolume": 0.5, "n_trials": 8}, [], flops_kept=(0.5, 0.125))
    metrics = tracker.client.get_run(tracker.parent_run_id).data.metrics
    assert metrics == pytest.approx({"hypervolume": 0.5, "n_trials": 8, "best_val_acc": 0.95,
                                     "best_val_acc_flops_kept_le_0.5": 0.90,
                                     "best_val_acc_flops_kept_le_0.125": 0.60})


def test_experiment_is_declared_for_training_with_a_runs_view(store, tracker):
    """MLflow's UI reads the kind tag and the saved view; the view's columns are what a user
    compares, and the link opens the runs table with that view (checked in a browser in
    tests/test_mlflow_ui.py)."""
    experiment = tracker.client.get_experiment(tracker.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == EXPERIMENT_KIND == "custom_model_development"
    view = json.loads(experiment.tags[f"mlflow.sharedViewState.{RUNS_VIEW}"])
    columns = view["selectedColumns"]
    for column in ("metrics.`val_acc`", "metrics.`flops_kept`", "params.`criterion`", "params.`finetune.lr`",
                   "params.`prune.ratio`", "tags.`pareto`", "metrics.`hypervolume`",
                   "metrics.`best_val_acc_flops_kept_le_0.5`"):
        assert column in columns
    assert view["columnOrder"][1:] == columns and view["orderByKey"] == "metrics.`val_acc`"
    assert ui_url(tracker.experiment_id, "http://h:1/") == tracker.ui_url("http://h:1") == (
        f"http://h:1/#/experiments/{tracker.experiment_id}/runs?workflowType=machine_learning"
        f"&viewStateShareKey={RUNS_VIEW}")
    # A kind a user chose is kept; an out-of-date view is rewritten; nothing else is touched.
    client = tracker.client
    client.set_experiment_tag(tracker.experiment_id, "mlflow.experimentKind", "finetuning")
    client.set_experiment_tag(tracker.experiment_id, f"mlflow.sharedViewState.{RUNS_VIEW}", "{}")
    client.set_experiment_tag(tracker.experiment_id, "mlflow.sharedViewState.mine", "{}")
    SearchTracker(store, experiment.name)
    tags = client.get_experiment(tracker.experiment_id).tags
    assert tags["mlflow.experimentKind"] == "finetuning" and tags["mlflow.sharedViewState.mine"] == "{}"
    assert json.loads(tags[f"mlflow.sharedViewState.{RUNS_VIEW}"]) == view
