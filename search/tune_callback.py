"""The Ray Tune side of MLflow tracking: a callback that logs every trial from the driver.

:mod:`search.tracking` holds the MLflow store and never imports ray; this module adapts Tune's
trial events to it (see that module's docstring for why every write happens in the driver).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ray.tune import Callback
from ray.tune.result import AUTO_RESULT_KEYS, DEBUG_METRICS, DONE, EXPERIMENT_TAG, SHOULD_CHECKPOINT

from search.command import searched_keys
from search.tracking import SearchTracker

__all__ = ["MLflowTuneCallback", "ProgressCallback"]

logger = logging.getLogger(__name__)

# Keys Ray Tune adds to every result: bookkeeping, not measurements of the trial.
_TUNE_KEYS = frozenset(AUTO_RESULT_KEYS) | frozenset(DEBUG_METRICS) | {DONE, SHOULD_CHECKPOINT, EXPERIMENT_TAG}


class MLflowTuneCallback(Callback):
    """Ray Tune callback that logs every trial to MLflow from the driver through a SearchTracker.

    Every result of the trainable (``trainables.ray_trainable``) carries the protocol's
    ``step``; the last one of a trial whose protocol finished also carries ``trial_done=True``.

    Hooks (verified in the source of ray 2.60, ``tune/execution/tune_controller.py``):
        * ``on_trial_start``: the run is created (or found again) with ``trial.config`` as params.
        * ``on_trial_result``: stepped metrics; called for every reported result, including the
          one on which a scheduler (ASHA) or a stopper decides STOP (it carries ``done=True``).
          Tune stores the result as ``trial.last_result`` right after this hook.
        * ``on_trial_complete``: fires both for a trial that returned and for one that a
          scheduler or stopper stopped (``TuneController.stop_trial``). They differ only in the
          last result: ``trial_done`` True means the protocol finished (FINISHED, with final
          metrics); otherwise the trial was stopped early (KILLED, tag ``stopped_early=true``).
        * ``on_trial_error``: FAILED, with Tune's error file as ``error.txt``.
        * ``on_experiment_end``: a stop of the whole experiment (a stopper's ``stop_all()``,
          ``TuneConfig(time_budget_s=...)``) terminates trials through
          ``TuneController._stop_experiment_if_needed`` without ``on_trial_complete``; their
          runs are ended here the same way.

    The callback is pickled into the experiment's ``tuner.pkl`` when the Tuner is built and
    unpickled by ``Tuner.restore``; the MLflow client is therefore created lazily and dropped
    from the pickled state. A tracking failure is logged as a warning and the search goes on,
    unless ``strict`` is True (tests), in which case it propagates and stops the search.
    """

    def __init__(
        self, tracking_uri: str, experiment: str, parent_run_id: str, *, strict: bool = False
    ) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.parent_run_id = parent_run_id
        self.strict = strict
        self._tracker: SearchTracker | None = None
        self._open_trials: set[str] = set()  # trials whose run this callback opened, not yet ended

    @property
    def tracker(self) -> SearchTracker:
        if self._tracker is None:
            self._tracker = SearchTracker(
                self.tracking_uri, self.experiment, parent_run_id=self.parent_run_id
            )
        return self._tracker

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_tracker"] = None  # an MLflow client holds a database engine: not picklable
        return state

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._guard("on_trial_start", trial, lambda: self._open(trial))

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        def log() -> None:
            self._open(trial)
            self.tracker.log_result(trial.trial_id, _measurements(result))

        self._guard("on_trial_result", trial, log)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        def end() -> None:
            self._open(trial)  # a trial stopped while PENDING never started
            self._end(trial)

        self._guard("on_trial_complete", trial, end)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        def fail() -> None:
            self._open(trial)
            error_file = getattr(trial, "error_file", None)  # Tune writes <trial dir>/error.txt
            try:
                if error_file and Path(error_file).is_file():
                    self.tracker.log_artifact(trial.trial_id, error_file)
            finally:
                self.tracker.end_trial(trial.trial_id, "FAILED")
                self._open_trials.discard(trial.trial_id)

        self._guard("on_trial_error", trial, fail)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        # An experiment-level stop (a stopper's stop_all(), TuneConfig(time_budget_s=...)) ends
        # trials without on_trial_complete. Trials still live here were interrupted (Ctrl-C, a
        # lost driver): their runs stay RUNNING for Tuner.restore to continue, and
        # SearchTracker.finalize_dangling ends them if the search is never resumed.
        for trial in trials:
            if trial.trial_id in self._open_trials and trial.status in ("TERMINATED", "ERROR"):
                self._guard("on_experiment_end", trial, lambda t=trial: self._end(t))

    def _open(self, trial: Any) -> str:
        tags = {"trial_name": str(trial), "experiment_tag": str(getattr(trial, "experiment_tag", ""))}
        run_id = self.tracker.trial_run(trial.trial_id, dict(trial.config or {}), tags)
        self._open_trials.add(trial.trial_id)
        return run_id

    def _end(self, trial: Any) -> None:
        """FINISHED if the protocol reported ``trial_done``, else KILLED (stopped early).

        ERROR reaches here only from ``on_experiment_end``, for a trial whose ``on_trial_error``
        failed to end its run.
        """
        last = trial.last_result or {}
        if trial.status == "ERROR":
            self.tracker.end_trial(trial.trial_id, "FAILED")
        elif last.get("trial_done"):
            self.tracker.end_trial(trial.trial_id, "FINISHED", final=last)
        else:
            self.tracker.end_trial(trial.trial_id, "KILLED")
        self._open_trials.discard(trial.trial_id)

    def _guard(self, hook: str, trial: Any, action: Callable[[], None]) -> None:
        try:
            action()
        except Exception:
            if self.strict:
                raise
            logger.warning(
                "MLflow tracking failed in %s for trial %s (store %s); the search goes on, but "
                "this trial's run may be incomplete. Fix the cause, then check the run or call "
                "SearchTracker.finalize_dangling.",
                hook, getattr(trial, "trial_id", trial), self.tracking_uri, exc_info=True,
            )


def _measurements(result: Mapping[str, Any]) -> dict[str, Any]:
    """The trial's own values of a Tune result: ``step`` stays, Tune's bookkeeping goes."""
    return {k: v for k, v in result.items() if k not in _TUNE_KEYS}


class ProgressCallback(Callback):
    """One printed line per ended trial, so a search or study of many minutes shows it is moving:
    ``[3/27] done  criterion=l1 prune.ratio=0.3 seed=1  val_acc=0.9112  (214 s)``; settings go by
    their ``trainables.run`` keys (:func:`search.command.searched_keys`), as in the command a front
    row carries.

    Tune's own progress table is off (``verbose=0``: it floods a terminal with one table per
    result); this prints only what a user waits for. Wall time counts from the callback's
    creation (``time.time``, so it survives the pickling of a resumed run).
    """

    _SHOWN = ("criterion", "prune.method", "prune.schedule", "prune.ratio", "prune.target_flops_reduction", "seed",
              "data.fraction")

    def __init__(self, total: int, printer: Callable[[str], None] = print):
        self.total, self.printer, self.t0, self.ended = total, printer, time.time(), 0

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._line(trial, "done" if (trial.last_result or {}).get("trial_done") else "stopped")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._line(trial, "failed")

    def _line(self, trial: Any, what: str) -> None:
        self.ended += 1
        config = searched_keys(dict(trial.config or {}))
        shown = " ".join(f"{k}={config[k]:.3g}" if isinstance(config[k], float) else f"{k}={config[k]}"
                         for k in self._SHOWN if config.get(k) is not None)
        acc = (trial.last_result or {}).get("val_acc")
        acc_text = f"val_acc={acc:.4f}" if isinstance(acc, (int, float)) else "val_acc=-"
        self.printer(f"[{self.ended}/{self.total}] {what:<7} {shown}  {acc_text}  ({time.time() - self.t0:.0f} s)")
