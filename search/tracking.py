"""MLflow tracking of a search: one parent run per search, one child run per trial.

This module is MLflow only; it never imports ray, so a pure-MLflow command (``python -m
search.blend``) does not load the cluster. The Ray Tune side is
:class:`search.tune_callback.MLflowTuneCallback`, which drives a :class:`SearchTracker`.

Every trial's MLflow write happens in the driver process, through that callback, for three
reasons: Ray workers never open the SQLite store (SQLite handles concurrent writers poorly and a
worker may not even share the driver's disk); trials that the scheduler stops early are still
finalised (their own code never learns that it was stopped); and a resumed search finds its runs
again by the tag ``trial_id`` instead of creating duplicates.

Layout of one search in MLflow:
    * experiment: declared a model-training experiment (tag ``mlflow.experimentKind``) and given
      a saved runs-table view, :data:`RUNS_VIEW`, whose columns are what a user compares; open it
      with the URL of :func:`ui_url` (see that function for why the URL is needed).
    * parent run: the resolved config as params (flattened, dotted keys) and ``config.yaml``;
      at the end, summary metrics to sort searches by (``hypervolume``, ``best_val_acc``, the
      best accuracy at each share of FLOPs kept in :data:`SUMMARY_FLOPS_KEPT`, ``n_trials``) and
      the search's files (``trials.parquet``, ``pareto.png``).
    * child run per trial (tag ``mlflow.parentRunId``), named by what differs (:func:`run_name`):
      the sampled hyperparameters as params under the run command's keys (``prune.ratio``,
      ``finetune.lr``: :func:`search.command.searched_keys`), tags ``trial_id``, ``criterion``,
      ``stopped_early``, ``pareto`` and ``command`` (the ``python -m trainables.run`` line that
      rebuilds the trial); metrics stepped by the protocol's fine-tuning step, with
      ``flops_kept`` (pruned / unpruned FLOPs) beside the raw ``flops``. The trial's own latency
      (timed while other trials ran) is ``latency_ms_trial``; ``latency_ms`` is the search's
      serial re-timing, as in ``trials.parquet``. For trials on the front, artifacts
      ``record.json`` and ``model/``.

A pruned model is stored so that a user loads it with one call and no project code::

    torch.export.load(mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="model/model.pt2")).module()
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import (
    MAX_ENTITY_KEY_LENGTH,
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)

from search.command import searched_keys

__all__ = [
    "run_name",
    "ui_url",
    "END_STATUSES",
    "EXPERIMENT_KIND",
    "FINAL_METRICS",
    "RUNS_VIEW",
    "SUMMARY_FLOPS_KEPT",
    "TRIAL_METRIC_NAMES",
    "SearchTracker",
    "default_tracking_uri",
    "summary_key",
]

logger = logging.getLogger(__name__)

END_STATUSES = ("FINISHED", "KILLED", "FAILED")
"""How a trial or a search ends: it completed, it was stopped (early or interrupted), it raised."""

FINAL_METRICS = ("val_acc", "flops", "flops_kept", "params", "latency_ms_trial", "wall_s")
"""Metrics of a finished trial logged by :meth:`SearchTracker.end_trial` (FLOPs = 2 x MACs;
``flops_kept`` = ``flops`` / ``flops_before``, the unpruned model's FLOPs)."""

SUMMARY_FLOPS_KEPT = (0.5, 0.25)
"""Shares of FLOPs kept (pruned / unpruned) at which a finished search logs its best validation
accuracy, as the parent-run metrics named by :func:`summary_key`."""

TRIAL_METRIC_NAMES = {"latency_ms": "latency_ms_trial"}
"""A trial's own result keys logged under another name: its latency, timed while other trials
ran, is not the search's serial re-timing that ``latency_ms`` names in MLflow and trials.parquet."""

EXPERIMENT_KIND = "custom_model_development"
"""The value of MLflow's experiment tag ``mlflow.experimentKind`` for a model-training
experiment (MLflow's UI calls it "Machine learning"; the other kind is ``genai_development``)."""

RUNS_VIEW = "trials"
"""Key of the runs-table view the tracker saves in each experiment (see :func:`ui_url`)."""

_KIND_TAG = "mlflow.experimentKind"
# The experiment tag under which MLflow's UI keeps a view saved with its "Share" button; the
# page reads it back when its URL carries ``viewStateShareKey=<key>``.
_VIEW_TAG = "mlflow.sharedViewState."

_STEP = "step"  # the x-axis of every metric, not a metric itself
_KEPT, _FLOPS, _FLOPS_BEFORE = "flops_kept", "flops", "flops_before"
_TRIAL_TAG = "trial_id"
_PARENT_TAG = "mlflow.parentRunId"


def default_tracking_uri(output_root: str | Path) -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else an SQLite store ``<output_root>/mlflow.db``.

    The path is absolute because Tune runs each trial in its own working directory: a relative
    ``sqlite:///mlflow.db`` would scatter one database per directory. A :class:`SearchTracker`
    on this store keeps artifacts in ``<output_root>/mlartifacts``.
    """
    from_env = os.environ.get("MLFLOW_TRACKING_URI")
    if from_env:
        return from_env
    return f"sqlite:///{(Path(output_root).expanduser().resolve() / 'mlflow.db').as_posix()}"


def ui_url(experiment_id: str, server: str = "http://127.0.0.1:5000") -> str:
    """The address of the experiment's runs table, with the tracker's columns, in MLflow's UI.

    MLflow 3.17's UI does not open an experiment by its ``mlflow.experimentKind`` tag: it
    follows a per-browser switch ("GenAI" / "Model training", saved in the browser, GenAI by
    default), so a plain link opens on the GenAI traces overview. ``workflowType`` in the URL
    sets that switch; ``viewStateShareKey`` loads the view :data:`RUNS_VIEW` (columns and sort).
    """
    return (f"{server.rstrip('/')}/#/experiments/{experiment_id}/runs"
            f"?workflowType=machine_learning&viewStateShareKey={RUNS_VIEW}")


def summary_key(flops_kept: float) -> str:
    """The parent-run metric holding the best validation accuracy of the search's finished
    trials keeping at most ``flops_kept`` of the FLOPs, e.g. ``best_val_acc_flops_kept_le_0.5``."""
    return f"best_val_acc_flops_kept_le_{float(flops_kept):g}"


class SearchTracker:
    """A thin wrapper around :class:`mlflow.MlflowClient` for one search of one experiment.

    Runs of a newly created experiment on an SQLite store keep their files in the folder
    ``mlartifacts`` next to the database (MLflow's own default, ``./mlruns``, is relative to
    whatever directory the process happens to run in); a tracking server decides for itself.
    ``parent_run_id`` attaches to an existing search run without changing it (what the Tune
    callback does); ``start_search`` creates or re-opens one instead.
    """

    def __init__(self, tracking_uri: str, experiment: str, *, parent_run_id: str | None = None) -> None:
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.experiment_id = self._get_or_create_experiment(experiment)
        self.parent_run_id = parent_run_id
        self._runs: dict[str, str] = {}  # trial id -> run id
        self._fresh: set[str] = set()  # runs created here: no metric history to read back
        self._running: set[str] = set()  # runs known RUNNING: trial_run need not ask MLflow
        self._last: dict[tuple[str, str], tuple[int, float] | None] = {}  # (run, key) -> (step, value)

    # -- search (parent run) -------------------------------------------------------------------

    def start_search(self, name: str, config: Mapping[str, Any], run_id: str | None = None) -> str:
        """Create the parent run of a search and return its id; with ``run_id``, re-open that run.

        A new run gets ``config`` flattened as params (dotted keys, lists as JSON, values longer
        than MLflow's limit truncated) and whole as the artifact ``config.yaml``. A re-opened run
        (a resumed search) is set RUNNING again and keeps its params: MLflow params are immutable.
        """
        if run_id is not None:
            run = self.client.get_run(run_id)
            if run.info.experiment_id != self.experiment_id:
                raise ValueError(
                    f"run {run_id} belongs to experiment {run.info.experiment_id}, not to "
                    f"{self.experiment_id}; resume with the experiment name the search started with"
                )
            self.client.update_run(run_id, status="RUNNING")
            self.parent_run_id = run_id
            return run_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags={"role": "search"})
        self.parent_run_id = run.info.run_id
        self._log_params(self.parent_run_id, _flatten_params(config))
        self.client.log_dict(self.parent_run_id, _plain(config), "config.yaml")
        return self.parent_run_id

    def finish_search(
        self,
        metrics: Mapping[str, float],
        artifacts: Sequence[str | Path],
        status: str = "FINISHED",
        flops_kept: Sequence[float] = SUMMARY_FLOPS_KEPT,
    ) -> None:
        """Log the search's summary metrics and files (folders keep their name), then end it.

        Child runs still RUNNING are ended first as KILLED (see :meth:`finalize_dangling`), so a
        finished search never leaves a trial looking alive. The summary is
        :meth:`search_summary` (at ``flops_kept``) updated with ``metrics``: a value the caller
        passes wins over the one read back from the trials.
        """
        _check_status(status)
        parent = self._require_parent()
        paths = [Path(p) for p in artifacts]
        missing = [str(p) for p in paths if not p.exists()]
        if missing:
            raise FileNotFoundError(f"search artifacts not found: {missing}; write them before finish_search")
        bad = {k: v for k, v in metrics.items() if not _is_number(v)}
        if bad:
            raise ValueError(f"search metrics must be numbers, but got {bad}")
        self.finalize_dangling("KILLED")
        summary = {**self.search_summary(flops_kept), **metrics}
        now = _now_ms()
        self._log_metrics(parent, [Metric(_key(k), float(v), now, 0) for k, v in summary.items()])
        for path in paths:
            if path.is_dir():
                self.client.log_artifacts(parent, str(path), artifact_path=path.name)
            else:
                self.client.log_artifact(parent, str(path))
        self.client.set_terminated(parent, status)

    def search_summary(self, flops_kept: Sequence[float] = SUMMARY_FLOPS_KEPT) -> dict[str, float]:
        """What a user sorts searches by, from the search's trial runs as MLflow holds them.

        ``n_trials``: trial runs (deleted orphans and full-fidelity re-runs of front trials left
        out); ``best_val_acc``: the best ``val_acc`` of a finished trial (trials stopped early
        report an unfinished fine-tuning, so they never count); ``summary_key(r)``: the same at
        ``flops_kept <= r``, left out where no finished trial is that small.
        """
        bad = [r for r in flops_kept if not (_is_number(r) and 0 < r <= 1)]
        if bad:
            raise ValueError(f"flops_kept must be shares of FLOPs kept in (0, 1], but got {bad}")
        parent = self._require_parent()
        trials = [r for r in self._search(f"tags.`{_PARENT_TAG}` = '{parent}' AND tags.role = 'trial'")
                  if r.data.tags.get("fidelity") != "full"]
        points = []  # (val_acc, flops_kept or None) of each finished trial
        for run in trials:
            m = run.data.metrics
            if run.info.status == "FINISHED" and _finite(m.get("val_acc")):
                ratio = m.get(_KEPT, _flops_kept(m))
                points.append((m["val_acc"], ratio if _finite(ratio) else None))
        summary: dict[str, float] = {"n_trials": float(len(trials))}
        if points:
            summary["best_val_acc"] = max(acc for acc, _ in points)
        for target in flops_kept:
            small = [acc for acc, ratio in points if ratio is not None and ratio <= target]
            if small:
                summary[summary_key(target)] = max(small)
        return summary

    def ui_url(self, server: str = "http://127.0.0.1:5000") -> str:
        """This experiment's runs table in MLflow's UI at ``server`` (see :func:`ui_url`)."""
        return ui_url(self.experiment_id, server)

    def finalize_dangling(self, status: str = "KILLED") -> int:
        """End every child run of the search that is still RUNNING; return how many there were.

        Such runs belong to trials of an interrupted search (driver killed, cluster lost). A
        resumed search re-opens them through :meth:`trial_run`.
        """
        _check_status(status)
        parent = self._require_parent()
        dangling = self._search(f"tags.`{_PARENT_TAG}` = '{parent}' AND attributes.status = 'RUNNING'")
        for run in dangling:
            self.client.set_tag(run.info.run_id, "ended_by", "finalize_dangling")
            self.client.set_terminated(run.info.run_id, status)
            self._running.discard(run.info.run_id)
        return len(dangling)

    def drop_orphans(self, known_trial_ids: Iterable[str]) -> list[str]:
        """Soft-delete the trial runs of the search whose trial is not in ``known_trial_ids``;
        return their trial ids.

        Orphans come from a search killed in the moment between Tune starting a trial (the
        callback opens its run) and Tune saving its experiment state: the restored search never
        heard of that trial and samples a new one instead. An orphan is tagged ``orphaned=true``
        and deleted, not purged: ``mlflow runs restore --run-id <id>`` brings it back.
        """
        known = set(known_trial_ids)
        parent = self._require_parent()
        dropped = []
        for run in self._search(f"tags.`{_PARENT_TAG}` = '{parent}' AND tags.role = 'trial'"):
            trial_id = run.data.tags.get(_TRIAL_TAG)
            if trial_id in known:
                continue
            run_id = run.info.run_id
            self.client.set_tag(run_id, "orphaned", "true")
            self.client.set_tag(run_id, "orphan_reason", "its trial is not in the Tune experiment "
                                "(the search was killed before Tune saved that trial)")
            if run.info.status == "RUNNING":
                self.client.set_terminated(run_id, "KILLED")
            self.client.delete_run(run_id)
            self._runs.pop(trial_id, None)
            self._running.discard(run_id)
            dropped.append(trial_id)
        return dropped

    # -- trials (child runs) -------------------------------------------------------------------

    def trial_run(
        self, trial_id: str, params: Mapping[str, Any], tags: Mapping[str, str] | None = None
    ) -> str:
        """The id of the child run of ``trial_id``, created on first use and never duplicated.

        A new run gets ``params`` (a Tune trial config: flat, per-layer ratios as ``ratio_<i>``;
        a front fine-tuning trial nests one under ``front_config``) as params under the run
        command's keys (:func:`search.command.searched_keys`: ``prune.ratios``, ``finetune.lr``),
        nested keys dotted, and the tags ``trial_id``, ``criterion`` (from the searched config) and ``tags``. An
        existing run keeps its params and is set RUNNING again if it had been ended (a trial that
        a resumed search runs again).
        """
        _check_trial_id(trial_id)
        run_id = self._find_run(trial_id)
        if run_id is not None:
            if run_id not in self._running and self.client.get_run(run_id).info.status != "RUNNING":
                self.client.update_run(run_id, status="RUNNING")
            self._running.add(run_id)
            return run_id
        all_tags = {_PARENT_TAG: self._require_parent(), _TRIAL_TAG: trial_id, "role": "trial"}
        searched = params.get("front_config", params)  # a front fine-tuning trial re-runs a searched config
        if "criterion" in searched:
            all_tags["criterion"] = str(searched["criterion"])
        all_tags.update({_key(k): str(v)[:MAX_TAG_VAL_LENGTH] for k, v in (tags or {}).items()})
        run = self.client.create_run(self.experiment_id, run_name=run_name(trial_id, searched), tags=all_tags)
        run_id = run.info.run_id
        self._runs[trial_id] = run_id
        self._fresh.add(run_id)
        self._running.add(run_id)
        self._log_params(run_id, _flatten_params(searched_keys(params)))
        return run_id

    def log_result(self, trial_id: str, result: Mapping[str, Any]) -> None:
        """Log the numeric values of one trial result at ``step = int(result["step"])``.

        ``result`` holds the trial's own measurements (the Tune callback drops Tune's
        bookkeeping keys first); strings and booleans (``phase``, ``unit``, ``trial_done``) are
        left out. A value whose step is not after the last step logged for its key is skipped, so
        a trial that runs again after a resume or a retry never logs a step twice (the last steps
        are read back from MLflow once per key when this tracker did not create the run).
        """
        if _STEP not in result:
            raise ValueError(
                f"result of trial {trial_id} has no 'step' (keys: {sorted(result)}); stepped metrics "
                "need the protocol's fine-tuning step; log final values with end_trial"
            )
        step = int(result[_STEP])
        run_id = self._require_run(trial_id)
        now = _now_ms()
        metrics = []
        # val_acc first: MLflow's run page lists a run's metrics, and its comparison view picks its
        # default metric, in the order they were first logged.
        items = sorted(_numeric_items(_with_flops_kept(_renamed(result))), key=lambda item: item[0] != "val_acc")
        for key, value in items:
            last = self._last_point(run_id, key)
            if last is None or step > last[0]:
                metrics.append(Metric(key, value, now, step))
        self._log_metrics(run_id, metrics)

    def end_trial(self, trial_id: str, status: str, final: Mapping[str, Any] | None = None) -> None:
        """End the trial's run with ``status`` (one of :data:`END_STATUSES`).

        ``final`` (the trial's last result) values of :data:`FINAL_METRICS` (``flops_kept``
        derived from ``flops`` and ``flops_before`` when absent) become the run's
        latest values: MLflow shows the value at the highest step, so a final value that differs
        from the last point of its curve (``val_acc`` on the whole validation set after a curve
        on a subset) goes one step after it, and one equal to it is not logged again. Tag
        ``stopped_early`` is ``true`` for KILLED. The run is ended even if logging fails.
        """
        _check_status(status)
        run_id = self._require_run(trial_id)
        try:
            if final:
                self._log_final(run_id, final)
        finally:
            self.client.set_tag(run_id, "stopped_early", str(status == "KILLED").lower())
            self.client.set_terminated(run_id, status)
            self._running.discard(run_id)

    def find_run(self, trial_id: str) -> str | None:
        """The id of the child run of ``trial_id``, or None; never creates or re-opens a run."""
        _check_trial_id(trial_id)
        return self._find_run(trial_id)

    def set_command(self, trial_id: str, command: str) -> None:
        """Tag the trial's run ``command``: the ``python -m trainables.run`` line that rebuilds it.

        A command longer than an MLflow tag holds (per-unit ratios of a very deep network) is cut
        and says so; trials.parquet's ``command`` column keeps it whole."""
        if len(command) > MAX_TAG_VAL_LENGTH:
            note = " ... (cut: the whole command is in trials.parquet)"
            command = command[: MAX_TAG_VAL_LENGTH - len(note)] + note
        self.client.set_tag(self._require_run(trial_id), "command", command)

    def set_pareto(self, trial_id: str, pareto: bool) -> None:
        """Tag the trial's run ``pareto=true|false`` (on the search's accuracy-vs-FLOPs front)."""
        self.client.set_tag(self._require_run(trial_id), "pareto", str(bool(pareto)).lower())

    def log_artifact(self, trial_id: str, path: str | Path) -> None:
        """Store one file of the trial (Tune's ``error.txt``, the protocol's ``record.json``) at
        the top of its run's artifacts."""
        if not Path(path).is_file():
            raise FileNotFoundError(f"cannot log {path} for trial {trial_id}: not a file")
        self.client.log_artifact(self._require_run(trial_id), str(path))

    def log_pruned_model(
        self,
        trial_id: str,
        model: torch.nn.Module,
        example_input: torch.Tensor,
        record: Mapping[str, Any],
    ) -> str:
        """Store the pruned model as ``model/model.pt2`` plus ``model/record.json``; return its URI.

        The model is a ``torch.export`` program in eval mode with a dynamic batch dimension, so it
        loads with one call and no project code (see the module docstring). The returned URI is
        ``runs:/<run_id>/model/model.pt2``. ``model`` is left in the mode it came in.
        """
        run_id = self._require_run(trial_id)
        if getattr(model, "task", "classification") == "detection":
            return self._log_state_dict(run_id, model, record)
        was_training = model.training
        try:
            # Dim.AUTO, not Dim("batch"): export specialises a batch of 1 instead of failing.
            program = torch.export.export(
                model.eval(), (example_input,), dynamic_shapes=({0: torch.export.Dim.AUTO},)
            )
        finally:
            model.train(was_training)
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp, "model")
            folder.mkdir()
            torch.export.save(program, folder / "model.pt2")
            (folder / "record.json").write_text(json.dumps(_plain(record), indent=2))
            self.client.log_artifacts(run_id, str(folder), artifact_path="model")
        return f"runs:/{run_id}/model/model.pt2"

    def _log_state_dict(self, run_id: str, model: torch.nn.Module, record: Mapping[str, Any]) -> str:
        """A detector as ``model/state_dict.pt`` + ``model/record.json``: ``torch.export`` cannot
        trace torchvision's R-CNNs (data-dependent proposal counts), so the pruned model is rebuilt
        instead: ``rebuild_pruned(build_model(b["name"], num_classes=b["num_classes"], **b["kwargs"]),
        record, state_dict)`` with ``b = record["architecture"]`` (``trainables.protocol.stages``) replays
        ``record["prune_log"]`` on the base architecture and loads the weights."""
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp, "model")
            folder.mkdir()
            torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, folder / "state_dict.pt")
            (folder / "record.json").write_text(json.dumps(_plain(record), indent=2))
            self.client.log_artifacts(run_id, str(folder), artifact_path="model")
        return f"runs:/{run_id}/model/state_dict.pt"

    # -- internals -----------------------------------------------------------------------------

    def _get_or_create_experiment(self, name: str) -> str:
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            location = _artifact_location(self.tracking_uri)
            try:
                self.client.create_experiment(name, artifact_location=location)
            except MlflowException:
                # Another process created it between our lookup and our create.
                if self.client.get_experiment_by_name(name) is None:
                    raise
            experiment = self.client.get_experiment_by_name(name)
        if experiment.lifecycle_stage != "active":
            raise ValueError(
                f"experiment '{name}' is deleted in {self.tracking_uri}; restore it "
                "(mlflow experiments restore) or choose another experiment name"
            )
        self._declare_experiment(experiment)
        return experiment.experiment_id

    def _declare_experiment(self, experiment) -> None:
        """Tag the experiment a model-training one (unless a user chose a kind already) and save
        the runs view :data:`RUNS_VIEW`; only what is missing or out of date is written."""
        tags, wanted = experiment.tags, {}
        if not tags.get(_KIND_TAG):
            wanted[_KIND_TAG] = EXPERIMENT_KIND
        view = json.dumps(_runs_view(), separators=(",", ":"))
        if tags.get(_VIEW_TAG + RUNS_VIEW) != view:
            wanted[_VIEW_TAG + RUNS_VIEW] = view
        try:
            for key, value in wanted.items():
                self.client.set_experiment_tag(experiment.experiment_id, key, value)
        except MlflowException as error:  # e.g. a shared server that lets this user log runs only
            logger.warning("could not tag experiment %s for MLflow's UI (%s); its runs are logged "
                           "all the same", experiment.name, error)

    def _require_parent(self) -> str:
        if self.parent_run_id is None:
            raise RuntimeError(
                "no search run: call start_search(...) first, or pass parent_run_id= to SearchTracker"
            )
        return self.parent_run_id

    def _require_run(self, trial_id: str) -> str:
        run_id = self._find_run(trial_id)
        if run_id is None:
            raise LookupError(
                f"no MLflow run for trial '{trial_id}' in search run {self.parent_run_id}; "
                "call trial_run(trial_id, params) first"
            )
        return run_id

    def _find_run(self, trial_id: str) -> str | None:
        if trial_id in self._runs:
            return self._runs[trial_id]
        parent = self._require_parent()
        found = self._search(
            f"tags.`{_PARENT_TAG}` = '{parent}' AND tags.{_TRIAL_TAG} = '{trial_id}'",
            order_by=["attributes.start_time ASC"],
        )
        if not found:
            return None
        if len(found) > 1:
            logger.warning(
                "trial %s has %d runs in search %s; using the oldest, %s",
                trial_id, len(found), parent, found[0].info.run_id,
            )
        self._runs[trial_id] = found[0].info.run_id
        return self._runs[trial_id]

    def _search(self, filter_string: str, order_by: list[str] | None = None) -> list:
        runs, token = [], None
        while True:
            page = self.client.search_runs(
                [self.experiment_id], filter_string, order_by=order_by, page_token=token
            )
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    def _last_point(self, run_id: str, key: str) -> tuple[int, float] | None:
        """The (step, value) MLflow reports as latest for ``key``, read from MLflow at most once."""
        if (run_id, key) not in self._last:
            if run_id in self._fresh:
                self._last[(run_id, key)] = None
            else:
                history = self.client.get_metric_history(run_id, key)
                # MLflow's "latest": highest (step, timestamp, value).
                latest = max(history, key=lambda m: (m.step, m.timestamp, m.value), default=None)
                self._last[(run_id, key)] = None if latest is None else (latest.step, latest.value)
        return self._last[(run_id, key)]

    def _log_final(self, run_id: str, final: Mapping[str, Any]) -> None:
        final = _with_flops_kept(_renamed(final))
        now = _now_ms()
        metrics = []
        for key in FINAL_METRICS:
            if key not in final or not _is_number(final[key]):
                continue
            value, last = float(final[key]), self._last_point(run_id, key)
            if last is None:
                metrics.append(Metric(key, value, now, 0))
            elif not _same(value, last[1]):
                metrics.append(Metric(key, value, now, last[0] + 1))
        self._log_metrics(run_id, metrics)

    def _log_metrics(self, run_id: str, metrics: list[Metric]) -> None:
        for chunk in _chunks(metrics, MAX_METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=chunk)
        for m in metrics:
            self._last[(run_id, m.key)] = (m.step, m.value)

    def _log_params(self, run_id: str, params: dict[str, str]) -> None:
        entries = [Param(k, v) for k, v in params.items()]
        for chunk in _chunks(entries, MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(run_id, params=chunk)


# -- helpers ---------------------------------------------------------------------------------------


def run_name(trial_id: str, config: Mapping[str, Any]) -> str:
    """A child run's name that says what differs between trials, e.g.
    ``l1 · uniform 0.50 · p0.02 q0.30 · 3f2a1_00004``: a list of ``trial_<hash>`` says nothing.

    Per-layer ratios show as their mean; keys a trial does not have are left out.
    """
    parts = [str(config["criterion"])] if "criterion" in config else []
    per_layer = [float(v) for k, v in sorted(config.items()) if k.startswith("ratio_") and k[6:].isdigit()]
    if per_layer:
        parts.append(f"per_layer mean {sum(per_layer) / len(per_layer):.2f}")
    elif "ratio_low" in config and "ratio_high" in config:
        parts.append(f"{config.get('schedule', 'differential')} {float(config['ratio_low']):.2f}-"
                     f"{float(config['ratio_high']):.2f}")
    elif "ratio" in config:
        parts.append(f"{config.get('schedule', 'uniform')} {float(config['ratio']):.2f}")
    if "target_flops_reduction" in config:
        parts.append(f"-{100 * float(config['target_flops_reduction']):.0f}% FLOPs")
    extra = " ".join(f"{k}{config[k]:.2g}" if isinstance(config[k], float) else f"{k}{config[k]}"
                     for k in ("p", "q", "seed", "fraction") if k in config)
    if extra:
        parts.append(extra)
    if config.get("method") not in (None, "layer_by_layer"):
        parts.append(str(config["method"]))
    return " · ".join([*parts, trial_id])


# Columns of the runs view, in order: a trial's outcome, what was searched, then the parent run's
# summary (empty on trial rows, and trial columns empty on parent rows; a user sorts by either).
_VIEW_METRICS = ("val_acc", _KEPT, _FLOPS, "latency_ms")
_VIEW_PARAMS = ("criterion", "prune.schedule", "prune.ratio", "prune.p", "prune.q", "finetune.lr")
_VIEW_TAGS = ("pareto",)
_VIEW_SUMMARY = ("hypervolume", "best_val_acc", *(summary_key(r) for r in SUMMARY_FLOPS_KEPT), "n_trials")


def _runs_view() -> dict[str, Any]:
    """The runs-table state MLflow's UI saves with its "Share" button (keys as MLflow 3.17's UI
    writes them: ``selectedColumns`` as ``<group>.`<name>```, ``columnOrder``, ``columnWidths``,
    the sort); keys it does not know are ignored by the UI, missing ones take its defaults."""
    def col(group: str, name: str) -> str:
        return f"{group}.`{name}`"

    columns = [*(col("metrics", k) for k in _VIEW_METRICS), *(col("params", k) for k in _VIEW_PARAMS),
               *(col("tags", k) for k in _VIEW_TAGS), *(col("metrics", k) for k in _VIEW_SUMMARY)]
    name = col("attributes", "Run Name")
    return {
        "searchFilter": "", "orderByKey": col("metrics", "val_acc"), "orderByAsc": False,
        "startTime": "ALL", "lifecycleFilter": "Active", "datasetsFilter": [], "modelVersionFilter": "All Runs",
        "selectedColumns": columns, "columnOrder": [name, *columns],
        # Room for a run_name ("apoz · per_layer mean 0.52 · p0.047 q0.26 · 5f728_00002") and the
        # summary's longer names.
        "columnWidths": {name: 380, **{col("metrics", k): 220 for k in _VIEW_SUMMARY if "_flops_le_" in k}},
    }


def _artifact_location(tracking_uri: str) -> str | None:
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):].split("?")[0])
        db.parent.mkdir(parents=True, exist_ok=True)  # SQLite creates the file, not its folder
        return (db.resolve().parent / "mlartifacts").as_uri()
    return None  # a tracking server decides


def _check_status(status: str) -> None:
    if status not in END_STATUSES:
        raise ValueError(f"unknown run status {status!r}; valid: {', '.join(END_STATUSES)}")


def _check_trial_id(trial_id: str) -> None:
    if not trial_id or "'" in trial_id or "`" in trial_id:
        raise ValueError(f"trial id {trial_id!r} must be non-empty without quotes (it goes into an MLflow filter)")


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    return _is_number(value) and math.isfinite(value)


def _flops_kept(values: Mapping[str, Any]) -> float | None:
    flops, before = values.get(_FLOPS), values.get(_FLOPS_BEFORE)
    if _finite(flops) and _finite(before) and before > 0:
        return float(flops) / float(before)
    return None


def _with_flops_kept(result: Mapping[str, Any]) -> Mapping[str, Any]:
    """``result`` plus ``flops_kept`` when it carries ``flops`` and ``flops_before`` (a trial's
    final result does; curve points do not) and no share of its own; the caller's dict is kept."""
    kept = None if _KEPT in result else _flops_kept(result)
    return result if kept is None else {**result, _KEPT: kept}


def _renamed(result: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's result under its MLflow names (:data:`TRIAL_METRIC_NAMES`)."""
    return {TRIAL_METRIC_NAMES.get(k, k): v for k, v in result.items()}


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def _now_ms() -> int:
    return int(time.time() * 1000)


def _key(key: Any) -> str:
    """An MLflow-valid param or metric name: unsupported characters become ``_``."""
    text = "".join(c if c.isalnum() or c in "_-. /:" else "_" for c in str(key))
    return text[:MAX_ENTITY_KEY_LENGTH]


def _value(value: Any, limit: int = MAX_PARAM_VAL_LENGTH) -> str:
    text = value if isinstance(value, str) else json.dumps(_plain(value))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _plain(value: Any) -> Any:
    """JSON-safe copy: mappings to dicts, sequences to lists, unknown objects to ``str``."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or (isinstance(value, Sequence) and not isinstance(value, str)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if _is_number(value):
        return float(value)
    return str(value)


def _flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested keys dotted (``model.name``); any other value, lists included, as one string."""
    flat: dict[str, str] = {}
    for name, value in params.items():
        key = _key(f"{prefix}{name}")
        if isinstance(value, Mapping):
            flat.update(_flatten_params(value, prefix=f"{key}."))
        else:
            flat[key] = _value(value)
    return flat


def _numeric_items(result: Mapping[str, Any]) -> Iterator[tuple[str, float]]:
    for name, value in result.items():
        if name != _STEP and _is_number(value):
            yield _key(name), float(value)


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]

