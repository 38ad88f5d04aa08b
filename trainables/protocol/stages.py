"""The prune / fine-tune protocol of Mittal et al. 2019, and two variants.

- ``layer_by_layer``: units from the one nearest the output to the one nearest the input;
  at each, score the filters on the current (partly pruned) network, keep the top m_k,
  fine-tune ``p`` epochs; after the last unit fine-tune ``q`` epochs.
- ``one_shot``: score every unit on the unpruned network, prune all, fine-tune ``q``.
- ``iterative``: ``steps`` rounds of removing a share of filters across all units by one
  global ranking (scores normalised per unit), each followed by ``p`` epochs; then ``q``.
- ``control``: no pruning; the base model fine-tuned with layer_by_layer's budget and
  evaluations (one ``p`` stage per unit, then ``q``): is the pruned model better than its base
  only because the base was still improving?
- ``greedy_car``: layer_by_layer's stages, but each unit's filters are removed one at a time
  by greedy CAR (``trainables.protocol.greedy_car``: the filter whose removal costs the least accuracy,
  ties by loss, re-scored after every ``prune.rescore_every`` removals, optionally
  ``prune.greedy_retrain_steps`` SGD steps between), scored on validation batches; the
  criterion is not used.
- ``scratch``: the pruned architecture (the schedule's kept counts, first filters kept),
  re-initialised with the run's seed and trained with the budget of pretraining + prune +
  fine-tune: the base model's pretraining recipe for ``model.pretrain.epochs`` epochs, then
  the same ``p`` stages and ``q`` as layer_by_layer. The criterion is ignored.

Every fine-tuning stage evaluates at ``finetune.evals_per_stage`` points, and the record
measures recovery speed (``trainables.protocol.recovery``); its schema is in ``trainables.protocol.records``.

The protocol talks to the outside only through ``report(metrics: dict)``, called at
every evaluation; the Ray trainable and MLflow plug in there. It returns the run record,
plain JSON-serialisable data (see ``run_protocol``). Fine-tuning lives in
``trainables.protocol.finetune``, ratio planning in ``trainables.protocol.planning``, the typed state and
record in ``trainables.protocol.records``.
"""

from __future__ import annotations

import copy
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from data import DataSplits, iterate_batches, take
from trainables.core.metrics import count_backbone_flops, count_flops, count_params, measure_latency
from trainables.core.surgery import Unit, describe_units, prune_layer, select_units
from trainables.criteria import Criterion, ScoringContext, get_criterion
from trainables.protocol.config import (
    METHODS,
    FinetuneConfig,
    MeasureConfig,
    PretrainConfig,
    PruneConfig,
)
from trainables.protocol.finetune import Finetuner, Report, recalibrate_bn
from trainables.protocol.greedy_car import greedy_prune_unit
from trainables.protocol.planning import plan_ratios, select_keep
from trainables.protocol.records import (
    CurvePoint,
    Measurement,
    ProtocolState,
    PruningStep,
    RunRecord,
    UnitRow,
)
from trainables.protocol.recovery import run_recovery, stage_recovery
from trainables.protocol.schedules import global_drop as _global_drop
from trainables.protocol.schedules import kept_count
from trainables.protocol.schedules import unit_normalised as _unit_normalised
from trainables.protocol.tasks import Task, task_of

__all__ = ["run_protocol", "plan_ratios", "select_keep", "resolve_classes", "recalibrate_bn", "scoring_batches",
           "validation_batches"]

_SCORING_SEED_OFFSET = 7919  # keeps the scoring batches apart from every other seeded stream
_ITERATIVE_MIN_KEPT = 0.1  # iterative: no unit loses more than 90% of its filters
_SCRATCH_SEED_OFFSET = 104_729  # the scratch model's initialisation and data cycling

# ``trainables.cli.base_model.train_base_model``'s signature: the scratch baseline trains with the
# base model's own recipe. Passed in rather than imported: base_model sits above the protocol.
Pretrainer = Callable[..., dict]


def resolve_classes(classes: Sequence[str | int] | None, class_names: Sequence[str]) -> list[int] | None:
    """Class names or ids -> ids; an unknown name raises a one-line error listing the valid ones."""
    if not classes:
        return None
    ids = []
    for c in classes:
        if isinstance(c, int) and 0 <= c < len(class_names):
            ids.append(c)
        elif isinstance(c, str) and c in class_names:
            ids.append(list(class_names).index(c))
        else:
            raise ValueError(f"prune.target_classes: unknown class {c!r}; valid: {', '.join(class_names)} (or ids 0..{len(class_names) - 1})")
    return ids


def scoring_batches(splits: DataSplits, prune: PruneConfig, seed: int) -> list[tuple[Tensor, Tensor]]:
    """The ``prune.score_batches`` seeded batches that data-driven criteria score filters on.

    Read from ``train_eval`` (training samples, evaluation transform): filters are ranked on
    images like those the deployed model sees, not on augmented crops.
    """
    stream = iterate_batches(splits.train_eval, prune.score_batch_size, shuffle=True,
                             seed=seed + _SCORING_SEED_OFFSET, num_workers=splits.num_workers)
    return list(itertools.islice(stream, prune.score_batches))


def validation_batches(splits: DataSplits, prune: PruneConfig, seed: int) -> list[tuple[Tensor, Tensor]]:
    """``prune.score_batches`` seeded batches of the validation split: greedy CAR decides on
    held-out images, as Abbasi-Asl and Yu did (never on test)."""
    stream = iterate_batches(splits.val, prune.score_batch_size, shuffle=True,
                             seed=seed + _SCORING_SEED_OFFSET, num_workers=splits.num_workers)
    return list(itertools.islice(stream, prune.score_batches))


def run_protocol(
    model: nn.Module,
    splits: DataSplits,
    prune: PruneConfig,
    finetune: FinetuneConfig | None = None,
    *,
    measure: MeasureConfig | None = None,
    seed: int = 0,
    report: Report | None = None,
    checkpoint: Callable[[dict], None] | None = None,
    resume: dict | None = None,
    evaluate_test: bool = True,
    progress: bool = False,
    config: dict | None = None,
    shard: tuple[int, int] = (0, 1),
    wrap_ddp: bool = False,
    pretrain: PretrainConfig | None = None,
    pretrainer: Pretrainer | None = None,
    q_points: Sequence[float] = (),
) -> dict:
    """Prune ``model`` in place following ``prune.method`` and return the run record.

    ``splits`` has ``train``, ``train_eval``, ``val``, ``test`` datasets, ``class_names``,
    ``eval_classes`` and ``num_workers`` (a ``data.DataSplits``). ``report`` receives every
    evaluation as ``{"step", "epoch", "val_acc", "phase", ...}``. The record holds
    ``base_val_acc``, ``units`` (pruning order: name, filters before/after, damage and
    recovered val acc, keep_idxs), ``curve``, ``final_val_acc``, ``final_test_acc``
    (+ ``final_test_top5`` with more than 10 classes), FLOPs, params and latency
    before/after, ``prune_log`` (replayable ``prune_layer`` records in order), ``wall_s``
    and ``config`` (see ``trainables.protocol.records.RunRecord``).

    The protocol is a list of stages (one per unit or step, then the final fine-tuning).
    After each stage ``checkpoint(state)`` receives a plain state (with the model's
    ``state_dict``); handing that state back as ``resume`` to a fresh copy of the same base
    model continues after that stage with the same numbers an uninterrupted run gives.
    ``evaluate_test=False`` never reads the test split (a search must not). ``shard``
    (rank, world size) splits the fine-tuning batches between data-parallel workers, and
    ``wrap_ddp`` wraps the model in DistributedDataParallel for each fine-tuning stage.
    The configs are validated when they are built, so nothing is re-checked here.

    ``prune.method=scratch`` needs ``pretrain`` (the base model's ``PretrainConfig``) and
    ``pretrainer`` (``trainables.cli.base_model.train_base_model``).

    ``q_points`` (shorter final fine-tunings, in epochs, each below ``prune.q``; needs
    ``finetune.anneal_final=false``): the record's ``continued`` holds, per point, the record a
    run with ``q`` set to it gives, read off this run on its way (same weights at that step:
    same stream, constant learning rate; the curve keeps that run's evaluation points). So one
    run answers a sweep over ``q`` (``search.study``'s ``study.continue_budgets``).
    """
    t0 = time.perf_counter()
    finetune = finetune or FinetuneConfig()
    measure = measure or MeasureConfig()
    report = report or (lambda _m: None)
    if prune.method == "scratch" and (pretrain is None or pretrainer is None):
        raise ValueError("pretrain and pretrainer must be the base model's PretrainConfig and "
                         "trainables.cli.base_model.train_base_model for prune.method=scratch, but got None")
    q_points = _check_q_points(q_points, prune, finetune)
    task = task_of(model)
    units = select_units(model, describe_units(model), prune.units)
    plan = _Plan(units, [], prune, finetune.recovery_delta, pretrain, pretrainer, task=task)
    _bind_scoring(plan, splits, seed)
    # control removes nothing: its planned ratios are all 0 (and a FLOPs target is not searched).
    # schedule=global ranks the criterion's scores of the unpruned model, so it plans after binding.
    scorer = (lambda unit: plan.score(model, unit)) if plan.criterion is not None else None
    ratios = [0.0] * len(units) if prune.method == "control" else plan_ratios(model, units, prune, scorer=scorer)
    plan.ratios = ratios
    stages = _METHODS[prune.method](plan)
    state = _restore(model, resume) if resume else None
    tuner = Finetuner(model, splits, finetune, seed, report, progress, _total_epochs(prune, len(units)),
                      start_step=state.step if state else 0, curve=state.curve if state else None,
                      shard=shard, wrap_ddp=wrap_ddp)
    state = state or _start(model, tuner, measure)
    if q_points:
        plan.final_marks = _q_marks(q_points, prune, tuner, splits, evaluate_test, t0, state)
    _run_stages(stages, model, tuner, state, seed, checkpoint)
    tuner.close()
    ends = [_StageEnd(**e) for e in state.q_ends]  # reached in this call, or before a resume after the final stage
    if sorted(e.q for e in ends) != q_points:
        raise RuntimeError(f"q_points={q_points} were not all recorded (got {[e.q for e in ends]}): the run was "
                           "resumed from a checkpoint made with other q_points")
    own = _StageEnd.read(tuner, splits, evaluate_test, t0, prune.q)
    after = _measure(model, measure)
    config = config if config is not None else {"prune": asdict(prune), "finetune": asdict(finetune), "seed": seed}
    record = _record(own, state, ratios, units, after, measure, config, prune, finetune, task, splits,
                     curve=_stage_curve(tuner, own, ends))
    if q_points:
        record.continued = [
            _record(end, state, ratios, units, after, measure, _with_q(config, end.q), replace(prune, q=end.q),
                    finetune, task, splits, curve=_stage_curve(tuner, end, ends)).to_dict()
            for end in ends
        ]
    report(_final_report(tuner, record))
    return record.to_dict()


@dataclass
class _StageEnd:
    """Where a final fine-tuning of ``q`` epochs ends: its step, full-val and test scores, time."""

    q: float
    step: int
    val: float
    test: dict | None
    wall_s: float
    curve_len: int  # curve points up to and including its last evaluation

    @classmethod
    def read(cls, tuner: Finetuner, splits: DataSplits, evaluate_test: bool, t0: float, q: float) -> _StageEnd:
        val = tuner.curve[-1]["val_acc"]
        if tuner.curve_on_subset:
            val = tuner.val_acc(full=True)  # the curve used a subset; the result uses all of val
        test = tuner.evaluate(splits.test) if evaluate_test else None
        return cls(q, tuner.step, val, test, time.perf_counter() - t0, len(tuner.curve))


def _check_q_points(q_points: Sequence[float], prune: PruneConfig, finetune: FinetuneConfig) -> list[float]:
    """The shorter final fine-tunings a run records on its way, sorted; refused where the run
    does not pass through them."""
    points = sorted({float(q) for q in q_points})
    if not points:
        return []
    if finetune.anneal_final:
        raise ValueError(f"q_points={points} need finetune.anneal_final=false: the cosine anneal depends on q, so a "
                         "longer final fine-tuning does not pass through a shorter one")
    if prune.method == "one_shot":
        raise ValueError("q_points are not recorded with prune.method=one_shot (its pruning step's recovery is the "
                         "final fine-tuning itself); valid methods: "
                         + ", ".join(m for m in METHODS if m != "one_shot"))
    bad = [q for q in points if not 0 < q < prune.q]
    if bad:
        raise ValueError(f"q_points must be in (0, prune.q={prune.q:g}), but got {bad[0]:g}")
    return points


def _q_marks(q_points: list[float], prune: PruneConfig, tuner: Finetuner, splits: DataSplits, evaluate_test: bool,
             t0: float, state: ProtocolState) -> dict[int, Callable[[], None]]:
    """The final stage's marks: at the last step of each shorter ``q``, what a run with that
    ``q`` would end with, appended to ``state.q_ends`` (so the stage's checkpoint keeps it)."""
    total = tuner.stage_steps(prune.q)
    by_step: dict[int, list[float]] = {}
    for q in q_points:
        n = tuner.stage_steps(q)
        if not 1 <= n < total:
            raise ValueError(f"q_points: {q:g} epochs is {n} optimiser steps; valid: 1 to {total - 1} steps "
                             f"(prune.q={prune.q:g} is {total})")
        by_step.setdefault(n, []).append(q)

    def mark(n: int) -> Callable[[], None]:
        def at() -> None:
            end = _StageEnd.read(tuner, splits, evaluate_test, t0, 0.0)
            state.q_ends.extend(asdict(replace(end, q=q)) for q in by_step[n])
        return at

    return {n: mark(n) for n in by_step}


def _stage_curve(tuner: Finetuner, end: _StageEnd, ends: list[_StageEnd]) -> list[CurvePoint]:
    """The curve a run ending at ``end`` records: every point before the final fine-tuning, then
    the final fine-tuning's own evaluation points (a run with marks evaluated at others' too)."""
    if not ends:  # no q_points: the run's curve as it is
        return tuner.curve
    curve = tuner.curve[:end.curve_len]
    start = next(i for i, p in enumerate(curve) if p["phase"] == "final_finetune")
    first_step = end.step - tuner.stage_steps(end.q)
    own = set(tuner.stage_evals(end.step - first_step))
    return curve[:start] + [p for p in curve[start:] if p["step"] - first_step in own]


def _with_q(config: dict, q: float) -> dict:
    """The run config of a continued point: ``q`` in place of the run's own."""
    config = copy.deepcopy(config)
    for part in ("prune", "trial"):
        if isinstance(config.get(part), dict) and "q" in config[part]:
            config[part]["q"] = q
    if isinstance(config.get("trial"), dict):
        config["trial"].pop("q_points", None)
    return config


def _record(end: _StageEnd, state: ProtocolState, ratios: list[float], units: list[Unit], after: Measurement,
            measure: MeasureConfig, config: dict, prune: PruneConfig, finetune: FinetuneConfig, task: Task,
            splits: DataSplits, curve: list[CurvePoint]) -> RunRecord:
    curve_base = next(p["val_acc"] for p in curve if p["phase"] == "base")  # same images as the curve
    run_rec = run_recovery(curve, curve_base, finetune.recovery_delta)
    drops = [s.pre_prune_val_acc - s.damage_val_acc for s in state.steps]
    test = end.test
    return RunRecord(
        base_val_acc=state.base_val, units=state.rows, curve=curve, final_val_acc=end.val,
        final_test_acc=test["score"] if test else None, ratios=ratios, unit_names=[u.name for u in units],
        before=state.before, after=after, latency_batch_size=measure.batch_size,
        prune_log=state.prune_log, wall_s=end.wall_s, config=config,
        final_test_top5=test["top5"] if test and "top5" in test and len(splits.class_names) > 10 else None,
        task=task.name, score_name=task.score_name,
        final_test_metrics=({k: v for k, v in test.items() if k not in ("score", "n", "loss")}
                            if test and task.name != "classification" else None),
        method=prune.method, steps=state.steps, recovery_delta=finetune.recovery_delta,
        steps_to_recover=run_rec["steps_to_recover"], recovery_auc=run_rec["recovery_auc"],
        mean_damage=sum(drops) / len(drops) if drops else None,
    )


def _bind_scoring(plan: _Plan, splits: DataSplits, seed: int) -> None:
    """Bind the criterion and its scoring batches to ``plan`` (control and scratch ignore the
    criterion: nothing is scored; greedy CAR scores validation batches itself)."""
    prune = plan.prune
    if prune.method not in _METHODS:  # only a config mutated after construction gets here; same words as its own check
        raise ValueError(f"prune.method must be one of {', '.join(METHODS)}, but got {prune.method!r}")
    if prune.method in _UNSCORED:
        return
    if prune.method == "greedy_car":  # its own score on validation batches: no criterion
        plan.ctx = ScoringContext(batches=validation_batches(splits, prune, seed), seed=seed)
        return
    target_ids = resolve_classes(prune.target_classes, splits.class_names)
    plan.criterion = get_criterion(prune.criterion)
    loss = plan.task.logits_loss if plan.task is not None else None
    plan.ctx = ScoringContext(
        batches=scoring_batches(splits, prune, seed), seed=seed, target_classes=target_ids,
        options=dict(prune.criterion_options), **({"loss_fn": loss} if loss is not None else {}),
    )


def _total_epochs(prune: PruneConfig, n_units: int) -> float:
    """Fine-tuning epochs of the whole run (sizes the progress bar)."""
    n_stage_p = {"layer_by_layer": n_units, "iterative": prune.steps, "control": n_units,
                 "scratch": n_units, "greedy_car": n_units}.get(prune.method, 0)
    return prune.q + prune.p * n_stage_p


def _start(model: nn.Module, tuner: Finetuner, measure: MeasureConfig) -> ProtocolState:
    """A fresh run's state: the unpruned model's cost and val accuracy (reported as "base")."""
    before = _measure(model, measure)
    base_val = tuner.val_acc(full=True)
    # Every later curve point is measured on the evaluation subset (eval_max_images), so the
    # curve's base point is too: recovery compares like with like. The record's base_val_acc
    # stays the accuracy on all of val, like final_val_acc.
    tuner.emit("base", tuner.val_acc() if tuner.curve_on_subset else base_val)
    return ProtocolState(before=before, base_val=base_val)


def rebuild_pruned(model: nn.Module, record: dict, state_dict: dict | None = None) -> nn.Module:
    """The pruned model of a run record, from a fresh copy of its base architecture: replays
    ``record["prune_log"]`` on ``model`` in place, then loads ``state_dict`` if given (how a
    detector logged to MLflow as weights + record is loaded back)."""
    for rec in record["prune_log"]:
        prune_layer(model, rec["unit"], rec["keep_idxs"])
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return model


def _restore(model: nn.Module, resume: dict) -> ProtocolState:
    """Rebuild the pruned architecture from the log, load the weights, return the state."""
    if "model_state" not in resume:
        raise ValueError("resume: the checkpoint has no model_state; pass a state from checkpoint(state)")
    state = ProtocolState.from_dict(resume)
    rebuild_pruned(model, {"prune_log": state.prune_log}, resume["model_state"])
    return state


def _run_stages(stages: list[Stage], model: nn.Module, tuner: Finetuner, state: ProtocolState, seed: int,
                checkpoint: Callable[[dict], None] | None) -> None:
    """Run the stages not yet done, checkpointing after each."""
    for i, stage in enumerate(stages):
        if i < state.stage:
            continue
        # Each stage seeds the global RNG (dropout) itself, so a resumed run matches an uninterrupted one.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1_000 + i)
            stage(model, tuner, state)
        state.stage, state.step, state.curve = i + 1, tuner.step, tuner.curve
        if checkpoint is not None:
            checkpoint({**state.to_dict(), "model_state": {k: v.detach().clone() for k, v in model.state_dict().items()}})


def _measure(model: nn.Module, measure: MeasureConfig) -> Measurement:
    latency = None
    if measure.latency:
        latency = measure_latency(
            model, measure.batch_size, threads=measure.threads, repeats=measure.repeats, warmup=measure.warmup
        )["median_ms"]
    return Measurement(flops=count_flops(model), params=count_params(model), latency_ms=latency,
                       backbone_flops=count_backbone_flops(model))


def _final_report(tuner: Finetuner, record: RunRecord) -> dict[str, Any]:
    """The last ``report``: final accuracies and both objectives (FLOPs, latency)."""
    return {"step": tuner.step, "epoch": round(tuner.epoch, 4), "val_acc": record.final_val_acc, "phase": "final",
            "test_acc": record.final_test_acc, "flops": record.after.flops, "params": record.after.params,
            "latency_ms": record.after.latency_ms, "flops_before": record.before.flops,
            **{f"test_{k}": v for k, v in (record.final_test_metrics or {}).items()}}


# ---- the methods: each turns a plan (units, ratios, criterion, ctx, prune) into a list of stages ----

Stage = Callable[[nn.Module, Finetuner, ProtocolState], None]


@dataclass
class _Plan:
    """What a method builds its stages from; ``criterion`` and ``ctx`` are bound only for
    the methods that score filters."""

    units: list[Unit]
    ratios: list[float]
    prune: PruneConfig
    delta: float  # finetune.recovery_delta
    pretrain: PretrainConfig | None = None  # scratch only
    pretrainer: Pretrainer | None = None  # scratch only
    criterion: Criterion | None = None
    ctx: ScoringContext | None = None
    task: Task | None = None  # the model's task: its loss for gradient criteria
    final_marks: dict[int, Callable[[], None]] | None = None  # run_protocol's q_points, in final-stage steps

    def score(self, model: nn.Module, unit: Unit) -> Tensor:
        if self.criterion is None or self.ctx is None:
            raise RuntimeError(f"prune.method={self.prune.method} has no criterion bound")
        return self.criterion(model, unit, self.ctx)


MethodBuilder = Callable[[_Plan], list[Stage]]


def _damage(tuner: Finetuner, prune: PruneConfig, salt: int, unit: str) -> float:
    """Val top-1 right after a pruning step (after adaptive BN if configured), reported as "damage"."""
    tuner.adapt_bn(prune, salt)
    damage = tuner.val_acc()
    tuner.emit("damage", damage, unit=unit)
    return damage


def _open_step(tuner: Finetuner, state: ProtocolState, plan: _Plan, pre: float, names: list[str],
               salt: int, label: str) -> PruningStep:
    """Measure the damage of the pruning just done and log the step (``pre``: the last
    evaluation before it)."""
    damage = _damage(tuner, plan.prune, salt, label)
    step = PruningStep(step=len(state.steps) + 1, units=names, pre_prune_val_acc=pre, damage_val_acc=damage)
    state.steps.append(step)
    return step


def _close_step(tuner: Finetuner, step: PruningStep, delta: float) -> None:
    """Fill in the recovery of ``step`` from the curve since its damage point (the latest one)."""
    first = max(i for i, p in enumerate(tuner.curve) if p["phase"] == "damage")
    points = tuner.curve[first:]
    step.recovered_val_acc = points[-1]["val_acc"]  # the damage itself when nothing was fine-tuned
    rec = stage_recovery(points, step.pre_prune_val_acc, delta)
    step.steps_to_recover, step.recovery_auc = rec["steps_to_recover"], rec["recovery_auc"]


def _final_finetune(tuner: Finetuner, plan: _Plan) -> float | None:
    """The last ``q`` epochs (with the plan's marks); val top-1 at their end, None when ``q`` is 0."""
    if plan.prune.q > 0:
        return tuner.finetune(plan.prune.q, "final_finetune", anneal=tuner.ft.anneal_final, marks=plan.final_marks)
    return None


def _final_stage(plan: _Plan) -> Stage:
    def final(model: nn.Module, tuner: Finetuner, state: ProtocolState) -> None:
        _final_finetune(tuner, plan)
    return final


def _layer_by_layer(plan: _Plan) -> list[Stage]:
    prune = plan.prune

    def unit_stage(unit: Unit, ratio: float) -> Stage:
        def stage(model: nn.Module, tuner: Finetuner, state: ProtocolState) -> None:
            pre = tuner.curve[-1]["val_acc"]  # base, or the previous stage's last evaluation
            scores = plan.score(model, unit)  # on the current, partly pruned network
            rec = prune_layer(model, unit.name, select_keep(scores, kept_count(unit.n_filters, ratio, prune.round_to)))
            state.prune_log.append(rec)
            _recover_unit(tuner, state, plan, pre, rec)
        return stage

    pairs = reversed(list(zip(plan.units, plan.ratios, strict=True)))  # output side inward
    return [unit_stage(u, r) for u, r in pairs] + [_final_stage(plan)]


def _recover_unit(tuner: Finetuner, state: ProtocolState, plan: _Plan, pre: float, rec: dict) -> None:
    """After a unit was pruned (``rec``: its whole pruning): the damage point, p epochs of
    recovery, the unit's row of the record."""
    unit = rec["unit"]
    step = _open_step(tuner, state, plan, pre, [unit], len(state.prune_log), unit)
    if plan.prune.p > 0:
        tuner.finetune(plan.prune.p, "recovery", unit=unit)
    _close_step(tuner, step, plan.delta)
    state.rows.append(UnitRow.from_log(rec, step))


def _greedy_car(plan: _Plan) -> list[Stage]:
    """layer_by_layer with greedy CAR choosing each unit's filters (see the module docstring).

    The prune log holds every physical pruning (one per retraining round, then the rest),
    each with the unit's ``removal_order`` (original indices) and ``rescore_every``.
    """
    prune = plan.prune

    def unit_stage(unit: Unit, ratio: float) -> Stage:
        def stage(model: nn.Module, tuner: Finetuner, state: ProtocolState) -> None:
            if plan.ctx is None:
                raise RuntimeError("prune.method=greedy_car has no validation batches bound")
            pre = tuner.curve[-1]["val_acc"]
            n_remove = unit.n_filters - kept_count(unit.n_filters, ratio, prune.round_to)
            order, log = greedy_prune_unit(model, unit, plan.ctx.batches, n_remove=n_remove,
                                           rescore_every=prune.rescore_every,
                                           retrain=_greedy_retrainer(tuner, prune.greedy_retrain_steps))
            alive = list(range(unit.n_filters))  # original index of each current filter
            for rec in log:
                alive = [alive[i] for i in rec["keep_idxs"]]
            log.append(prune_layer(model, unit.name, [i for i, o in enumerate(alive) if o not in order]))
            info = {"removal_order": order, "rescore_every": prune.rescore_every}
            state.prune_log += [{**rec, **info} for rec in log]
            kept = sorted(set(range(unit.n_filters)) - set(order))
            whole = {"unit": unit.name, "filters_before": unit.n_filters, "filters_after": len(kept), "keep_idxs": kept}
            _recover_unit(tuner, state, plan, pre, whole)
        return stage

    pairs = reversed(list(zip(plan.units, plan.ratios, strict=True)))  # output side inward
    return [unit_stage(u, r) for u, r in pairs] + [_final_stage(plan)]


def _greedy_retrainer(tuner: Finetuner, steps: int) -> Callable[[nn.Module], None] | None:
    """``steps`` SGD steps of the run's fine-tuning stream between greedy removals (they count
    in the run's steps; no evaluation, so the curve is unchanged); None for 0 steps."""
    if steps == 0:
        return None

    def retrain(model: nn.Module) -> None:  # the run's own model, pruned in place (tuner.model)
        tuner.train_steps(steps)
    return retrain


def _one_shot(plan: _Plan) -> list[Stage]:
    units, prune = plan.units, plan.prune

    def prune_all(model: nn.Module, tuner: Finetuner, state: ProtocolState) -> None:
        pre = tuner.curve[-1]["val_acc"]
        all_scores = {u.name: plan.score(model, u) for u in units}  # all scored on the unpruned net
        for u, r in reversed(list(zip(units, plan.ratios, strict=True))):
            keep = select_keep(all_scores[u.name], kept_count(u.n_filters, r, prune.round_to))
            state.prune_log.append(prune_layer(model, u.name, keep))
        _open_step(tuner, state, plan, pre, [rec["unit"] for rec in state.prune_log], 0, "all")

    def final(model: nn.Module, tuner: Finetuner, state: ProtocolState) -> None:
        if not state.steps:
            raise RuntimeError("protocol state has no pruning step: the final stage ran before the pruning stage")
        _final_finetune(tuner, plan)
        _close_step(tuner, state.steps[-1], plan.delta)  # one_shot's recovery is the final fine-tuning
        state.rows = [UnitRow.from_log(rec) for rec in state.prune_log]  # not measured per unit

    return [prune_all, final]


def _iterative(plan: _Plan) -> list[Stage]:
    """Global ranking: after step s, s/steps of the schedule's total filter budget is removed.

    Only the total follows the schedule; which filters go, and so how much each unit loses,
    is decided by one ranking over all units of scores divided by their unit's mean |score|.
    No unit loses more than 90% of its filters.
    """
    units, prune = plan.units, plan.prune
    first = {u.name: u.n_filters for u in units}
    total_before = sum(first.values())
    total_target = sum(kept_count(u.n_filters, r, prune.round_to) for u, r in zip(units, plan.ratios, strict=True))
    floor = {name: max(1, round(_ITERATIVE_MIN_KEPT * n)) for name, n in first.items()}

    def step_stage(step: int) -> Stage:
        def stage(model: nn.Module, tuner: Finetuner, state: ProtocolState) -> None:
            pre = tuner.curve[-1]["val_acc"]
            current = _current_counts(first, state)
            keep_total = round(total_before - (total_before - total_target) * step / prune.steps)
            scores = {u.name: _unit_normalised(plan.score(model, _resized(u, current[u.name]))) for u in units}
            dropped = _global_drop(scores, current, floor, sum(current.values()) - keep_total)
            names = []
            for u in reversed(units):
                if dropped[u.name]:
                    keep = [i for i in range(current[u.name]) if i not in dropped[u.name]]
                    state.prune_log.append({**prune_layer(model, u.name, keep), "step": step})
                    names.append(u.name)
            measured = _open_step(tuner, state, plan, pre, names, step, f"step{step}")
            if prune.p > 0:
                tuner.finetune(prune.p, "recovery", unit=f"step{step}")
            _close_step(tuner, measured, plan.delta)
        return stage

    def final(model: nn.Module, tuner: Finetuner, state: ProtocolState) -> None:
        _final_finetune(tuner, plan)
        current, alive = _current_counts(first, state), _surviving_filters(first, state)
        # Not measured per unit: the steps carry the measurements.
        state.rows = [UnitRow(u.name, first[u.name], current[u.name], None, None, alive[u.name]) for u in reversed(units)]

    return [step_stage(s) for s in range(1, prune.steps + 1)] + [final]


def _control(plan: _Plan, phase: str = "control") -> list[Stage]:
    """No pruning: layer_by_layer's fine-tuning stages (one of ``p`` per unit) and ``q``."""
    def stage(model: nn.Module, tuner: Finetuner, state: ProtocolState) -> None:
        if plan.prune.p > 0:
            tuner.finetune(plan.prune.p, phase)
    return [stage for _ in plan.units] + [_final_stage(plan)]


def _scratch(plan: _Plan) -> list[Stage]:
    """The pruned architecture from scratch: pretraining recipe, then control's stages."""
    prune = plan.prune

    def build_and_pretrain(model: nn.Module, tuner: Finetuner, state: ProtocolState) -> None:
        for u, r in reversed(list(zip(plan.units, plan.ratios, strict=True))):  # as plan_ratios counts them
            state.prune_log.append(prune_layer(model, u.name, list(range(kept_count(u.n_filters, r, prune.round_to)))))
            state.rows.append(UnitRow.from_log(state.prune_log[-1]))
        _reinitialise(model, tuner.seed + _SCRATCH_SEED_OFFSET)
        tuner.emit("init", tuner.val_acc())
        _pretrain(model, tuner, plan)

    return [build_and_pretrain] + _control(plan, phase="scratch")


def _reinitialise(model: nn.Module, seed: int) -> None:
    """Every layer's own ``reset_parameters`` (PyTorch's default initialisation, and fresh BN
    statistics) under ``seed``; a parameter no layer can reset is refused."""
    resettable = [m for m in model.modules() if callable(getattr(m, "reset_parameters", None))]
    covered = {id(p) for m in resettable for p in m.parameters(recurse=False)}
    stuck = [n for n, p in model.named_parameters() if id(p) not in covered]
    if stuck:
        raise ValueError(f"prune.method=scratch must re-initialise every parameter, but {stuck[0]} has no "
                         "layer with reset_parameters")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in resettable:
            m.reset_parameters()


def _pretrain(model: nn.Module, tuner: Finetuner, plan: _Plan) -> None:
    """The base model's pretraining (its recipe, ``pretrain.epochs`` epochs of the full
    training set) on the pruned architecture; the steps count in the run's budget and the
    per-epoch evaluations join the curve (phase "scratch_pretrain", all of val)."""
    pretrain, splits = plan.pretrain, tuner.splits
    if pretrain is None or plan.pretrainer is None:
        raise RuntimeError("prune.method=scratch without pretrain / pretrainer")
    if pretrain.epochs == 0:
        return
    # The base saw epochs of all train_size_full images: a fraction of them is cycled up to that.
    train = _cycled(splits.train, splits.train_size_full, tuner.seed + _SCRATCH_SEED_OFFSET)
    summary = plan.pretrainer(model, replace(splits, train=train, train_eval=train), pretrain, seed=tuner.seed,
                              progress=False, log=lambda *_: None)
    per_epoch, start = max(1, len(train) // pretrain.batch_size), tuner.step
    for h in summary["history"]:
        tuner.skip_to(start + h["epoch"] * per_epoch)
        tuner.emit("scratch_pretrain", h["val_acc"])


def _cycled(train: Any, n: int, seed: int) -> Any:
    """``n`` samples of ``train``: all of it when it has n, else seeded passes over it cut at n."""
    if len(train) >= n:
        return train
    g = torch.Generator().manual_seed(seed)
    passes = [torch.randperm(len(train), generator=g) for _ in range(-(-n // len(train)))]
    return take(train, torch.cat(passes)[:n], None)


def _current_counts(first: dict[str, int], state: ProtocolState) -> dict[str, int]:
    """Filters per unit after the pruning logged so far."""
    counts = dict(first)
    for rec in state.prune_log:
        counts[rec["unit"]] = rec["filters_after"]
    return counts


def _surviving_filters(first: dict[str, int], state: ProtocolState) -> dict[str, list[int]]:
    """Per unit, the original (unpruned) indices of the filters still alive."""
    alive = {name: list(range(n)) for name, n in first.items()}
    for rec in state.prune_log:
        alive[rec["unit"]] = [alive[rec["unit"]][i] for i in rec["keep_idxs"]]
    return alive


def _resized(unit: Unit, n: int) -> Unit:
    """``unit`` with ``n`` filters (after earlier steps pruned it)."""
    return replace(unit, n_filters=n)  # keeps every field (channel_groups, others)


_METHODS: dict[str, MethodBuilder] = {"layer_by_layer": _layer_by_layer, "one_shot": _one_shot, "iterative": _iterative,
                                      "control": _control, "scratch": _scratch, "greedy_car": _greedy_car}
_UNSCORED = ("control", "scratch")
