"""Ray Tune's Optuna searcher, told the truth about trials that did not finish.

Ray's ``OptunaSearch.on_trial_complete`` tells Optuna a trial is COMPLETE whenever its last
result carries the searched metrics. Our trials report ``val_acc`` and ``flops`` at every
evaluation (so MLflow and the curve have them), which means a trial stopped by ASHA half-way
through its protocol, or one that raised after some reports, would reach Optuna as a normal
completed trial with an intermediate accuracy: TPE and NSGA-II would then learn from
half-fine-tuned points as if they were final. Only a result with ``trial_done`` (the
protocol's last report) is a finished trial.
"""

from __future__ import annotations

from ray.tune.search.optuna import OptunaSearch

__all__ = ["FinishedOnlyOptunaSearch"]


class FinishedOnlyOptunaSearch(OptunaSearch):
    """``OptunaSearch`` that tells Optuna a stopped trial as PRUNED and an errored one as FAIL.

    Both go through the parent's own paths (a completion without a result is PRUNED, an error
    without a result is FAIL), so nothing private of Ray's class is touched. Optuna's samplers
    ignore PRUNED and FAIL trials when they model good regions (multi-objective TPE and NSGA-II
    use COMPLETE trials only), which is what an unfinished trial deserves.
    """

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if error or (result is not None and not result.get("trial_done")):
            result = None
        super().on_trial_complete(trial_id, result=result, error=error)
