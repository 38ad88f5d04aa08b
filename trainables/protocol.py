"""The prune / fine-tune protocol of Mittal et al. 2019, and two variants.

- ``layer_by_layer``: units from the one nearest the output to the one nearest the input;
  at each, score the filters on the current (partly pruned) network, keep the top m_k,
  fine-tune ``p`` epochs; after the last unit fine-tune ``q`` epochs.
- ``one_shot``: score every unit on the unpruned network, prune all, fine-tune ``q``.
- ``iterative``: ``steps`` rounds of removing a share of filters across all units by one
  global ranking (scores normalised per unit), each followed by ``p`` epochs; then ``q``.

The protocol talks to the outside only through ``report(metrics: dict)``, called at
every evaluation; the Ray trainable and MLflow plug in there. It returns the run record,
plain JSON-serialisable data (see ``run_protocol``). Fine-tuning lives in
``trainables.finetune``, ratio planning in ``trainables.planning``, the typed state and
record in ``trainables.records``.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

import torch
from torch import Tensor, nn

from data import DataSplits, iterate_batches
from trainables.config import METHODS, FinetuneConfig, MeasureConfig, PruneConfig
from trainables.criteria import Criterion, ScoringContext, get_criterion
from trainables.finetune import Finetuner, Report, recalibrate_bn
from trainables.metrics import count_flops, count_params, measure_latency
from trainables.planning import plan_ratios, select_keep
from trainables.records import Measurement, ProtocolState, RunRecord, UnitRow
from trainables.schedules import kept_count
from trainables.surgery import Unit, describe_units, prune_layer

__all__ = ["run_protocol", "plan_ratios", "select_keep", "resolve_classes", "recalibrate_bn", "scoring_batches"]

_SCORING_SEED_OFFSET = 7919  # keeps the scoring batches apart from every other seeded stream
_ITERATIVE_MIN_KEPT = 0.1  # iterative: no unit loses more than 90% of its filters


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
) -> dict:
    """Prune ``model`` in place following ``prune.method`` and return the run record.

    ``splits`` has ``train``, ``train_eval``, ``val``, ``test`` datasets, ``class_names``,
    ``eval_classes`` and ``num_workers`` (a ``data.DataSplits``). ``report`` receives every
    evaluation as ``{"step", "epoch", "val_acc", "phase", ...}``. The record holds
    ``base_val_acc``, ``units`` (pruning order: name, filters before/after, damage and
    recovered val acc, keep_idxs), ``curve``, ``final_val_acc``, ``final_test_acc``
    (+ ``final_test_top5`` with more than 10 classes), FLOPs, params and latency
    before/after, ``prune_log`` (replayable ``prune_layer`` records in order), ``wall_s``
    and ``config`` (see ``trainables.records.RunRecord``).

    The protocol is a list of stages (one per unit or step, then the final fine-tuning).
    After each stage ``checkpoint(state)`` receives a plain state (with the model's
    ``state_dict``); handing that state back as ``resume`` to a fresh copy of the same base
    model continues after that stage with the same numbers an uninterrupted run gives.
    ``evaluate_test=False`` never reads the test split (a search must not). ``shard``
    (rank, world size) splits the fine-tuning batches between data-parallel workers, and
    ``wrap_ddp`` wraps the model in DistributedDataParallel for each fine-tuning stage.
    The configs are validated when they are built, so nothing is re-checked here.
    """
    t0 = time.perf_counter()
    finetune = finetune or FinetuneConfig()
    measure = measure or MeasureConfig()
    report = report or (lambda _m: None)
    units = describe_units(model)
    ratios = plan_ratios(model, units, prune)
    stages = _stages(units, ratios, splits, prune, seed)
    state = _restore(model, resume) if resume else None
    tuner = Finetuner(model, splits, finetune, seed, report, progress, _total_epochs(prune, len(units)),
                      start_step=state.step if state else 0, curve=state.curve if state else None,
                      shard=shard, wrap_ddp=wrap_ddp)
    state = state or _start(model, tuner, measure)
    _run_stages(stages, model, tuner, state, seed, checkpoint)
    tuner.close()
    final_val = tuner.curve[-1]["val_acc"]
    if finetune.eval_max_images is not None and finetune.eval_max_images < len(splits.val):
        final_val = tuner.val_acc(full=True)  # the curve used a subset; the result uses all of val
    test = tuner.evaluate(splits.test) if evaluate_test else None
    record = RunRecord(
        base_val_acc=state.base_val, units=state.rows, curve=tuner.curve, final_val_acc=final_val,
        final_test_acc=test["top1"] if test else None, ratios=ratios, unit_names=[u.name for u in units],
        before=state.before, after=_measure(model, measure), latency_batch_size=measure.batch_size,
        prune_log=state.prune_log, wall_s=time.perf_counter() - t0,
        config=config if config is not None else {"prune": asdict(prune), "finetune": asdict(finetune), "seed": seed},
        final_test_top5=test["top5"] if test and len(splits.class_names) > 10 else None,
    )
    report(_final_report(tuner, record))
    return record.to_dict()


def _stages(units: list[Unit], ratios: list[float], splits: DataSplits, prune: PruneConfig, seed: int) -> list[Stage]:
    """The stages of ``prune.method``, with the criterion and its scoring batches bound in."""
    build = _METHODS.get(prune.method)
    if build is None:  # only a config mutated after construction gets here; same words as its own check
        raise ValueError(f"prune.method must be one of {', '.join(METHODS)}, but got {prune.method!r}")
    criterion = get_criterion(prune.criterion)
    target_ids = resolve_classes(prune.target_classes, splits.class_names)
    ctx = ScoringContext(
        batches=scoring_batches(splits, prune, seed), seed=seed, target_classes=target_ids,
        options=dict(prune.criterion_options),
    )
    return build(units, ratios, criterion, ctx, prune)


def _total_epochs(prune: PruneConfig, n_units: int) -> float:
    """Fine-tuning epochs of the whole run (sizes the progress bar)."""
    n_stage_p = {"layer_by_layer": n_units, "iterative": prune.steps}.get(prune.method, 0)
    return prune.q + prune.p * n_stage_p


def _start(model: nn.Module, tuner: Finetuner, measure: MeasureConfig) -> ProtocolState:
    """A fresh run's state: the unpruned model's cost and val accuracy (reported as "base")."""
    before = _measure(model, measure)
    base_val = tuner.val_acc(full=True)
    tuner.emit("base", base_val)
    return ProtocolState(before=before, base_val=base_val)


def _restore(model: nn.Module, resume: dict) -> ProtocolState:
    """Rebuild the pruned architecture from the log, load the weights, return the state."""
    if "model_state" not in resume:
        raise ValueError("resume: the checkpoint has no model_state; pass a state from checkpoint(state)")
    state = ProtocolState.from_dict(resume)
    for rec in state.prune_log:
        prune_layer(model, rec["unit"], rec["keep_idxs"])
    model.load_state_dict(resume["model_state"])
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
    return Measurement(flops=count_flops(model), params=count_params(model), latency_ms=latency)


def _final_report(tuner: Finetuner, record: RunRecord) -> dict[str, Any]:
    """The last ``report``: final accuracies and both objectives (FLOPs, latency)."""
    return {"step": tuner.step, "epoch": round(tuner.epoch, 4), "val_acc": record.final_val_acc, "phase": "final",
            "test_acc": record.final_test_acc, "flops": record.after.flops, "params": record.after.params,
            "latency_ms": record.after.latency_ms, "flops_before": record.before.flops}


# ---- the methods: each turns (units, ratios, criterion, ctx, prune) into a list of stages ----

Stage = Callable[[nn.Module, Finetuner, ProtocolState], None]
MethodBuilder = Callable[[list[Unit], list[float], Criterion, ScoringContext, PruneConfig], list[Stage]]


def _damage(tuner: Finetuner, prune: PruneConfig, salt: int, unit: str) -> float:
    """Val top-1 right after a pruning step (after adaptive BN if configured), reported as "damage"."""
    tuner.adapt_bn(prune, salt)
    damage = tuner.val_acc()
    tuner.emit("damage", damage, unit=unit)
    return damage


def _final_finetune(tuner: Finetuner, prune: PruneConfig) -> float | None:
    """The last ``q`` epochs; val top-1 at their end, None when ``q`` is 0."""
    if prune.q > 0:
        return tuner.finetune(prune.q, "final_finetune", anneal=tuner.ft.anneal_final)
    return None


def _last_damage(state: ProtocolState) -> float:
    if state.damage is None:
        raise RuntimeError("protocol state has no damage: the final stage ran before a pruning stage")
    return state.damage


def _layer_by_layer(units: list[Unit], ratios: list[float], criterion: Criterion, ctx: ScoringContext,
                    prune: PruneConfig) -> list[Stage]:
    def unit_stage(unit: Unit, ratio: float) -> Stage:
        def stage(model: nn.Module, tuner: Finetuner, state: ProtocolState) -> None:
            scores = criterion(model, unit, ctx)  # on the current, partly pruned network
            rec = prune_layer(model, unit.name, select_keep(scores, kept_count(unit.n_filters, ratio, prune.round_to)))
            state.prune_log.append(rec)
            damage = _damage(tuner, prune, len(state.prune_log), unit.name)
            recovered = tuner.finetune(prune.p, "recovery", unit=unit.name) if prune.p > 0 else damage
            state.rows.append(UnitRow.from_log(rec, damage, recovered))
        return stage

    def final(model: nn.Module, tuner: Finetuner, state: ProtocolState) -> None:
        _final_finetune(tuner, prune)

    pairs = reversed(list(zip(units, ratios, strict=True)))  # output side inward
    return [unit_stage(u, r) for u, r in pairs] + [final]


def _one_shot(units: list[Unit], ratios: list[float], criterion: Criterion, ctx: ScoringContext,
              prune: PruneConfig) -> list[Stage]:
    def prune_all(model: nn.Module, tuner: Finetuner, state: ProtocolState) -> None:
        all_scores = {u.name: criterion(model, u, ctx) for u in units}  # all scored on the unpruned net
        for u, r in reversed(list(zip(units, ratios, strict=True))):
            keep = select_keep(all_scores[u.name], kept_count(u.n_filters, r, prune.round_to))
            state.prune_log.append(prune_layer(model, u.name, keep))
        state.damage = _damage(tuner, prune, 0, "all")

    def final(model: nn.Module, tuner: Finetuner, state: ProtocolState) -> None:
        damage = _last_damage(state)
        recovered = _final_finetune(tuner, prune)
        state.rows = [UnitRow.from_log(rec, damage, damage if recovered is None else recovered) for rec in state.prune_log]

    return [prune_all, final]


def _iterative(units: list[Unit], ratios: list[float], criterion: Criterion, ctx: ScoringContext,
               prune: PruneConfig) -> list[Stage]:
    """Global ranking: after step s, s/steps of the schedule's total filter budget is removed.

    Only the total follows the schedule; which filters go, and so how much each unit loses,
    is decided by one ranking over all units of scores divided by their unit's mean |score|.
    No unit loses more than 90% of its filters.
    """
    first = {u.name: u.n_filters for u in units}
    total_before = sum(first.values())
    total_target = sum(kept_count(u.n_filters, r, prune.round_to) for u, r in zip(units, ratios, strict=True))
    floor = {name: max(1, round(_ITERATIVE_MIN_KEPT * n)) for name, n in first.items()}

    def step_stage(step: int) -> Stage:
        def stage(model: nn.Module, tuner: Finetuner, state: ProtocolState) -> None:
            current = _current_counts(first, state)
            keep_total = round(total_before - (total_before - total_target) * step / prune.steps)
            scores = {u.name: _unit_normalised(criterion(model, _resized(u, current[u.name]), ctx)) for u in units}
            dropped = _global_drop(scores, current, floor, sum(current.values()) - keep_total)
            for u in reversed(units):
                if dropped[u.name]:
                    keep = [i for i in range(current[u.name]) if i not in dropped[u.name]]
                    state.prune_log.append({**prune_layer(model, u.name, keep), "step": step})
            state.damage = _damage(tuner, prune, step, f"step{step}")
            if prune.p > 0:
                tuner.finetune(prune.p, "recovery", unit=f"step{step}")
        return stage

    def final(model: nn.Module, tuner: Finetuner, state: ProtocolState) -> None:
        _final_finetune(tuner, prune)
        current, damage = _current_counts(first, state), _last_damage(state)
        alive = _surviving_filters(first, state)
        state.rows = [
            UnitRow(u.name, first[u.name], current[u.name], damage, tuner.curve[-1]["val_acc"], alive[u.name])
            for u in reversed(units)
        ]

    return [step_stage(s) for s in range(1, prune.steps + 1)] + [final]


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


def _unit_normalised(scores: Tensor) -> Tensor:
    """Scores divided by their mean |score|, so that units with different scales compete fairly."""
    s = scores.double()
    return s / s.abs().mean().clamp_min(1e-12)


def _global_drop(scores: dict[str, Tensor], current: dict[str, int], floor: dict[str, int],
                 n_drop: int) -> dict[str, set[int]]:
    """The ``n_drop`` lowest-scoring filters over all units (current indices per unit), never
    taking a unit below ``floor`` filters; ties go by unit name, then index."""
    entries = [(float(v), name, i) for name, s in scores.items() for i, v in enumerate(s)]
    dropped: dict[str, set[int]] = {name: set() for name in scores}
    for _score, name, i in sorted(entries):  # lowest normalised scores go first
        if n_drop <= 0:
            break
        if current[name] - len(dropped[name]) > floor[name]:
            dropped[name].add(i)
            n_drop -= 1
    return dropped


def _resized(unit: Unit, n: int) -> Unit:
    """``unit`` with ``n`` filters (after earlier steps pruned it)."""
    return Unit(unit.name, unit.convs, unit.act_points, unit.bns, n)


_METHODS: dict[str, MethodBuilder] = {"layer_by_layer": _layer_by_layer, "one_shot": _one_shot, "iterative": _iterative}
