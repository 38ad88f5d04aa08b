"""Typed records of one prune / fine-tune run: the resumable protocol state and the run record.

Both travel as plain dicts (``to_dict``): the state through ``torch.save`` /
``torch.load(weights_only=True)`` in the Ray trainable, which only unpickles builtins and
tensors, and the record as JSON. The dataclasses exist so that the protocol's code names its
fields and types; the dict shapes are the stable interface (``search.study`` reads them).

Record schema: what is measured where
-------------------------------------
Accuracies are val top-1 in [0, 1]; "steps" are optimiser steps (one batch per worker).

``steps``: one entry per *measured pruning step*, in order (``PruningStep``): one per unit for
``layer_by_layer``, one per global step for ``iterative``, a single one for ``one_shot``, none
for ``control`` and ``scratch``. Each entry: ``step`` (1-based), ``units`` (names pruned in
it), ``pre_prune_val_acc`` (the last evaluation before it: the base model's for the first
step, else the previous stage's last), ``damage_val_acc`` (right after pruning, after adaptive
BN if configured), ``recovered_val_acc`` (end of the fine-tuning that followed: ``p`` epochs,
or the final ``q`` for ``one_shot``; the damage itself when that fine-tuning is empty),
``steps_to_recover`` and ``recovery_auc`` of that fine-tuning (``trainables.protocol.recovery``).

``units``: one row per pruned unit in pruning order (``UnitRow``): ``filters_before``,
``filters_after`` and ``keep_idxs`` always. Only ``layer_by_layer`` measures a unit on its own,
so only its rows carry ``pre_prune_val_acc``, ``damage_val_acc``, ``recovered_val_acc``,
``steps_to_recover`` and ``recovery_auc`` (equal to its ``steps`` entry); ``one_shot`` and
``iterative`` rows have None there (not measured per unit: read ``steps``). ``scratch`` rows
give the architecture (first filters kept) with None measurements; ``control`` has no rows.

Run level: ``method``; ``recovery_delta``; ``steps_to_recover`` (steps after the last pruning
step, or after the re-initialisation for ``scratch``, until val acc >= ``base_val_acc`` -
delta, counting through the final fine-tuning; None = never; 0 for ``control``);
``recovery_auc`` (``trainables.protocol.recovery.run_recovery``); ``mean_damage`` (mean over ``steps``
of pre_prune - damage; None without pruning steps).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, TypedDict

__all__ = ["CurvePoint", "Measurement", "ProtocolState", "PruningStep", "RunRecord", "UnitRow"]


class CurvePoint(TypedDict):
    """One evaluation on the recovery curve, as ``report`` also receives it."""

    step: int  # fine-tuning steps so far (one batch per worker each)
    epoch: float  # step / steps per epoch, rounded to 4 decimals
    val_acc: float  # top-1 in [0, 1]
    # base | damage | recovery | final_finetune; control (control's p stages); scratch: init
    # (the re-initialised model), scratch_pretrain (per pretraining epoch, all of val), scratch
    phase: str


# A ``prune_layer`` record ({"unit", "filters_before", "filters_after", "keep_idxs"}, plus
# "step" in the iterative method); surgery owns its shape, so it stays a plain dict here.
PruneLogEntry = dict[str, Any]


@dataclass
class Measurement:
    """Cost of a model: FLOPs (2 x MACs, one image), parameter count, latency."""

    flops: int
    params: int
    latency_ms: float | None  # median per batch of ``MeasureConfig.batch_size``; None: not measured
    # FLOPs of the feature extractor alone, for models that name one (a detector's backbone):
    # the part pruning shrinks, beside the whole model whose heads it leaves as they are.
    backbone_flops: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {"flops": self.flops, "params": self.params, "latency_ms": self.latency_ms}
        if self.backbone_flops is not None:
            d["backbone_flops"] = self.backbone_flops
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Measurement:
        return cls(flops=d["flops"], params=d["params"], latency_ms=d["latency_ms"],
                   backbone_flops=d.get("backbone_flops"))


@dataclass
class UnitRow:
    """One pruned unit in the record (``record["units"]``), in pruning order.

    The measurements are None where the method does not measure a unit on its own (see the
    module docstring); ``layer_by_layer`` fills them all.
    """

    name: str  # dotted module name of the unit's conv, e.g. "features.10"
    filters_before: int
    filters_after: int
    damage_val_acc: float | None  # val top-1 right after pruning (before fine-tuning)
    recovered_val_acc: float | None  # val top-1 after the fine-tuning that followed
    keep_idxs: list[int]  # surviving filters, as indices into the unpruned unit
    pre_prune_val_acc: float | None = None  # val top-1 just before this unit was pruned
    steps_to_recover: int | None = None  # steps after pruning until >= pre - delta; None: not within the stage
    recovery_auc: float | None = None  # normalised area under the stage's recovery curve, in [0, 1]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "filters_before": self.filters_before, "filters_after": self.filters_after,
            "damage_val_acc": self.damage_val_acc, "recovered_val_acc": self.recovered_val_acc,
            "keep_idxs": list(self.keep_idxs), "pre_prune_val_acc": self.pre_prune_val_acc,
            "steps_to_recover": self.steps_to_recover, "recovery_auc": self.recovery_auc,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UnitRow:
        return cls(d["name"], d["filters_before"], d["filters_after"], d["damage_val_acc"],
                   d["recovered_val_acc"], list(d["keep_idxs"]), d["pre_prune_val_acc"], d["steps_to_recover"],
                   d["recovery_auc"])

    @classmethod
    def from_log(cls, rec: PruneLogEntry, step: PruningStep | None = None) -> UnitRow:
        """The row of one ``prune_layer`` record (its keep_idxs index the unpruned unit), with
        the measurements of ``step`` when the unit was measured on its own."""
        row = cls(rec["unit"], rec["filters_before"], rec["filters_after"], None, None, rec["keep_idxs"])
        if step is not None:
            row.pre_prune_val_acc, row.damage_val_acc = step.pre_prune_val_acc, step.damage_val_acc
            row.recovered_val_acc, row.steps_to_recover = step.recovered_val_acc, step.steps_to_recover
            row.recovery_auc = step.recovery_auc
        return row


@dataclass
class PruningStep:
    """One measured pruning step (``record["steps"]``); see the module docstring."""

    step: int  # 1-based
    units: list[str]  # units pruned in this step, in pruning order
    pre_prune_val_acc: float
    damage_val_acc: float
    recovered_val_acc: float | None = None  # None until the fine-tuning after it has run
    steps_to_recover: int | None = None
    recovery_auc: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "units": list(self.units), "pre_prune_val_acc": self.pre_prune_val_acc,
                "damage_val_acc": self.damage_val_acc, "recovered_val_acc": self.recovered_val_acc,
                "steps_to_recover": self.steps_to_recover, "recovery_auc": self.recovery_auc}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PruningStep:
        return cls(**{k: d[k] for k in ("step", "units", "pre_prune_val_acc", "damage_val_acc",
                                         "recovered_val_acc", "steps_to_recover", "recovery_auc")})


_STATE_KEYS = ("stage", "step", "before", "base_val", "rows", "prune_log", "steps", "curve")


@dataclass
class ProtocolState:
    """Where a run stands after a stage: enough, with the weights, to continue it exactly."""

    before: Measurement  # the unpruned model's cost
    base_val: float  # the unpruned model's val top-1 (all of val)
    stage: int = 0  # stages done
    step: int = 0  # fine-tuning steps done
    rows: list[UnitRow] = field(default_factory=list)
    prune_log: list[PruneLogEntry] = field(default_factory=list)  # replayable, in order
    # the measured pruning steps; one_shot's is opened in one stage and completed in the next
    steps: list[PruningStep] = field(default_factory=list)
    curve: list[CurvePoint] = field(default_factory=list)
    # run_protocol's q_points reached so far (the ends of the shorter final fine-tunings), so a
    # run resumed after its final stage still has them
    q_ends: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The checkpoint's plain-data part (add ``model_state`` for the weights); a deep copy."""
        return copy.deepcopy({
            "stage": self.stage, "step": self.step, "before": self.before.to_dict(), "base_val": self.base_val,
            "rows": [r.to_dict() for r in self.rows], "prune_log": self.prune_log,
            "steps": [s.to_dict() for s in self.steps], "curve": self.curve,
            **({"q_ends": self.q_ends} if self.q_ends else {}),
        })

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProtocolState:
        """The state of a checkpoint dict; ``model_state`` and keys added by adapters
        (the Ray trainable's ``done``) are ignored."""
        missing = [k for k in _STATE_KEYS if k not in d]
        if missing:
            raise ValueError(f"resume: not a protocol checkpoint, missing {', '.join(missing)}; pass a state from checkpoint(state)")
        d = copy.deepcopy({k: v for k, v in d.items() if k in (*_STATE_KEYS, "q_ends")})
        return cls(
            before=Measurement.from_dict(d["before"]), base_val=d["base_val"], stage=d["stage"], step=d["step"],
            rows=[UnitRow.from_dict(r) for r in d["rows"]], prune_log=d["prune_log"],
            steps=[PruningStep.from_dict(s) for s in d["steps"]], curve=d["curve"], q_ends=d.get("q_ends", []),
        )


@dataclass
class RunRecord:
    """What ``run_protocol`` returns, before flattening to the JSON record (see ``to_dict``)."""

    base_val_acc: float
    units: list[UnitRow]  # pruning order
    curve: list[CurvePoint]
    final_val_acc: float  # on all of val
    final_test_acc: float | None  # None when the test split was not read
    ratios: list[float]  # planned share of filters removed per unit, input to output
    unit_names: list[str]  # input to output
    before: Measurement
    after: Measurement
    latency_batch_size: int
    prune_log: list[PruneLogEntry]
    wall_s: float  # seconds of the whole protocol
    config: dict[str, Any]
    method: str = "layer_by_layer"
    steps: list[PruningStep] = field(default_factory=list)
    recovery_delta: float = 0.01
    steps_to_recover: int | None = None
    recovery_auc: float | None = None
    mean_damage: float | None = None
    final_test_top5: float | None = None  # only recorded with more than 10 classes
    # What the accuracies are (trainables.protocol.tasks): classification's top1, detection's map50
    # (mAP@0.5), segmentation's miou. Every metric of the test evaluation, for tasks with more
    # than one (detection: map50, map, map75; segmentation: miou, pixel_acc, class_acc).
    task: str = "classification"
    score_name: str = "top1"
    final_test_metrics: dict[str, float] | None = None
    # run_protocol's q_points: per shorter final fine-tuning, the record a run with that q gives
    continued: list[dict[str, Any]] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The record's JSON shape: keys and order as consumers (run.py, search, bench) read them."""
        record = {
            "base_val_acc": self.base_val_acc,
            "units": [u.to_dict() for u in self.units],
            "curve": self.curve,
            "final_val_acc": self.final_val_acc,
            "final_test_acc": self.final_test_acc,
            "ratios": self.ratios,
            "unit_names": self.unit_names,
            "flops_before": self.before.flops,
            "flops_after": self.after.flops,
            "params_before": self.before.params,
            "params_after": self.after.params,
            "latency_ms_before": self.before.latency_ms,
            "latency_ms_after": self.after.latency_ms,
            "latency_batch_size": self.latency_batch_size,
            "prune_log": self.prune_log,
            "wall_s": self.wall_s,
            "config": self.config,
            "method": self.method,
            "steps": [s.to_dict() for s in self.steps],
            "recovery_delta": self.recovery_delta,
            "steps_to_recover": self.steps_to_recover,
            "recovery_auc": self.recovery_auc,
            "mean_damage": self.mean_damage,
        }
        if self.final_test_top5 is not None:
            record["final_test_top5"] = self.final_test_top5
        if self.task != "classification":  # classification records keep their shape
            record.update(task=self.task, score_name=self.score_name, final_test_metrics=self.final_test_metrics)
            if self.before.backbone_flops is not None:
                record.update(backbone_flops_before=self.before.backbone_flops,
                              backbone_flops_after=self.after.backbone_flops)
        if self.continued is not None:
            record["continued"] = self.continued
        return record
