"""The prune / fine-tune protocol of Mittal et al. 2019, and two variants.

- ``layer_by_layer``: units from the one nearest the output to the one nearest the input;
  at each, score the filters on the current (partly pruned) network, keep the top m_k,
  fine-tune ``p`` epochs; after the last unit fine-tune ``q`` epochs.
- ``one_shot``: score every unit on the unpruned network, prune all, fine-tune ``q``.
- ``iterative``: ``steps`` rounds of removing a share of filters across all units by one
  global ranking (scores normalised per unit), each followed by ``p`` epochs; then ``q``.

The protocol talks to the outside only through ``report(metrics: dict)``, called at
every evaluation; the Ray trainable and MLflow plug in there. It returns the run record,
plain JSON-serialisable data (see ``run_protocol``).
"""

from __future__ import annotations

import copy
import itertools
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data._datasets import iterate_batches, take  # submodule import: safe while `data` initialises
from trainables.config import FinetuneConfig, MeasureConfig, PruneConfig
from trainables.criteria import ScoringContext, get_criterion
from trainables.metrics import count_flops, count_params, evaluate, measure_latency
from trainables.schedules import kept_count, make_ratios
from trainables.surgery import Unit, describe_units, prune_layer

__all__ = ["run_protocol", "plan_ratios", "select_keep", "resolve_classes", "recalibrate_bn", "scoring_batches"]

Report = Callable[[dict], None]


def select_keep(scores: Tensor, k: int) -> list[int]:
    """Indices of the ``k`` highest scores, ties broken towards the lower index, sorted."""
    order = torch.sort(-scores.double(), stable=True).indices
    return sorted(order[:k].tolist())


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


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches) -> int:
    """Adaptive BN (Li et al. 2020, EagleEye): re-estimate every BatchNorm's running mean and
    variance on ``batches`` with no gradient step; returns the number of images seen.

    Pruning removes input channels, so the statistics the BN layers stored for the unpruned
    network are stale; recomputing them recovers much of the damage for the price of a few
    forward passes. Only the BN layers are put in training mode (dropout stays off), and
    ``momentum=None`` makes the estimate a plain average over all batches.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    was_training = model.training
    saved = [(m, m.momentum) for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    device = next(model.parameters()).device
    seen = 0
    try:
        for x, _ in batches:
            model(x.to(device))
            seen += len(x)
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        model.train(was_training)
    return seen


def _flops_with_ratios(model: nn.Module, units: list[Unit], ratios: Sequence[float], round_to: int) -> int:
    """FLOPs of ``model`` with ``ratios`` applied; structure only, so the first filters are kept."""
    probe = copy.deepcopy(model)
    for u, r in zip(units, ratios, strict=True):
        prune_layer(probe, u.name, list(range(kept_count(u.n_filters, r, round_to))))
    return count_flops(probe)


def plan_ratios(model: nn.Module, units: list[Unit], prune: PruneConfig) -> list[float]:
    """One ratio per unit (input to output) from the schedule, or scaled to meet a FLOPs target.

    With ``target_flops_reduction`` the schedule's shape is kept and scaled by a bisection
    until the pruned FLOPs are within 2 points of the target reduction.
    """
    ratios = make_ratios(
        prune.schedule, len(units), ratio=prune.ratio, ratio_low=prune.ratio_low,
        ratio_high=prune.ratio_high, ratios=prune.ratios,
    )
    target = prune.target_flops_reduction
    if target is None:
        return ratios
    base = count_flops(model)
    shape = ratios if max(ratios) > 0 else [1.0] * len(units)
    cap = 0.95 / max(shape)  # no unit may lose more than 95% of its filters

    def reduction(scale: float) -> float:
        return 1.0 - _flops_with_ratios(model, units, [s * scale for s in shape], prune.round_to) / base

    lo, hi = 0.0, cap
    if reduction(hi) < target - 0.02:
        raise ValueError(
            f"prune.target_flops_reduction={target} is out of reach: at most {reduction(hi):.3f} with this schedule"
        )
    for _ in range(30):
        mid = (lo + hi) / 2
        got = reduction(mid)
        if abs(got - target) <= 0.005:
            break
        lo, hi = (mid, hi) if got < target else (lo, mid)
    scaled = [s * mid for s in shape]
    if abs(reduction(mid) - target) > 0.02:
        raise ValueError(f"prune.target_flops_reduction={target} cannot be met within 2% with round_to={prune.round_to}")
    return scaled


class _Finetuner:
    """SGD over a seeded, endless stream of training batches, with evaluation and reporting."""

    def __init__(self, model, splits, ft: FinetuneConfig, seed: int, report: Report, progress: bool,
                 total_epochs: float, start_step: int = 0, curve: list[dict] | None = None,
                 shard: tuple[int, int] = (0, 1), wrap_ddp: bool = False):
        self.model, self.splits, self.ft, self.seed, self.report = model, splits, ft, seed, report
        self.rank, self.world = shard
        self.wrap_ddp = wrap_ddp
        # With several workers, one step consumes one batch per worker.
        self.steps_per_epoch = max(1, len(splits.train) // (ft.batch_size * self.world))
        self.step = start_step
        self.curve: list[dict] = list(curve or [])
        self._stream = self._batches(start_step)
        self._bar = None
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=math.ceil(total_epochs * self.steps_per_epoch), desc="fine-tune", unit="step", leave=False)

    def _batches(self, start_step: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Epoch e is shuffled with seed (seed, e); a resumed run skips to ``start_step``."""
        first_epoch, skip = divmod(start_step, self.steps_per_epoch)
        for epoch in itertools.count(first_epoch):
            batches = iterate_batches(
                self.splits.train, self.ft.batch_size, shuffle=True, seed=self.seed * 100_003 + epoch, drop_last=True
            )
            # DistributedSampler-style split: every worker shuffles alike, worker r takes batches r, r+W, ...
            mine = itertools.islice(batches, self.rank, self.steps_per_epoch * self.world, self.world)
            yield from itertools.islice(mine, skip if epoch == first_epoch else 0, None)

    @property
    def epoch(self) -> float:
        return self.step / self.steps_per_epoch

    def val_acc(self, full: bool = False) -> float:
        """Validation accuracy; intermediate evaluations may use only the first
        ``eval_max_images`` validation images (a cheaper curve), ``full`` always uses all."""
        val = self.splits.val
        limit = self.ft.eval_max_images
        if not full and limit is not None and limit < len(val):
            val = take(val, torch.arange(limit), None)  # in-memory data stays in memory: fast slicing
        return self.evaluate(val)["top1"]

    def adapt_bn(self, prune: PruneConfig, salt: int) -> None:
        """Adaptive BN after a pruning step (``prune.adapt_bn_batches`` > 0), on its own seeded
        stream of training batches so that the fine-tuning batches are the same with or without it."""
        if prune.adapt_bn_batches > 0:
            stream = iterate_batches(self.splits.train, prune.adapt_bn_batch_size, shuffle=True,
                                     seed=self.seed * 100_019 + 7_777 + salt)
            recalibrate_bn(self.model, itertools.islice(stream, prune.adapt_bn_batches))

    def evaluate(self, dataset) -> dict:
        batches = iterate_batches(dataset, self.ft.eval_batch_size, shuffle=False)
        return evaluate(self.model, batches, classes=self.splits.eval_classes)

    def emit(self, phase: str, val_acc: float, **extra: Any) -> None:
        point = {"step": self.step, "epoch": round(self.epoch, 4), "val_acc": val_acc, "phase": phase}
        self.curve.append(point)
        # Every report carries the current FLOPs, so a trial stopped early still has both objectives.
        self.report({**point, "flops": count_flops(self.model), **extra})

    def finetune(self, epochs: float, phase: str, anneal: bool = False, **extra: Any) -> float:
        """Train ``epochs`` (fractions allowed); returns the validation accuracy at the end.

        ``anneal`` decays the learning rate to 0 along a cosine over this stage (used for the
        final fine-tuning, so a run ends at a settled optimum rather than a noisy SGD iterate).
        """
        n_steps = round(epochs * self.steps_per_epoch)
        every = max(1, round(self.ft.eval_every * self.steps_per_epoch))
        device = next(self.model.parameters()).device
        # Pruning replaced the Parameter objects: a fresh optimizer each stage.
        opt = torch.optim.SGD(self.model.parameters(), lr=self.ft.lr, momentum=self.ft.momentum, weight_decay=self.ft.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, n_steps)) if anneal else None
        net = self.model
        if self.wrap_ddp:
            # Re-wrapped every stage: pruning changed the parameters DDP would synchronise.
            net = nn.parallel.DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.model.train()
        for i in range(1, n_steps + 1):
            x, y = next(self._stream)
            loss = F.cross_entropy(net(x.to(device)), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            self.step += 1
            if self._bar is not None:
                self._bar.update(1)
                if i % 20 == 1:  # .item() syncs a GPU: only now and then
                    self._bar.set_postfix_str(f"{phase} {extra.get('unit', '')} loss={loss.item():.3f}")
            if i % every == 0 and i != n_steps:
                self.emit(phase, self.val_acc(), **extra)
        acc = self.val_acc()
        self.emit(phase, acc, **extra)
        return acc

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def scoring_batches(splits, prune: PruneConfig, seed: int) -> list[tuple[Tensor, Tensor]]:
    stream = iterate_batches(splits.train, prune.score_batch_size, shuffle=True, seed=seed + 7919)
    return list(itertools.islice(stream, prune.score_batches))


def run_protocol(
    model: nn.Module,
    splits: Any,
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

    ``splits`` has ``train``, ``val``, ``test`` datasets, ``class_names`` and
    ``eval_classes`` (a ``data.DataSplits``). ``report`` receives every evaluation as
    ``{"step", "epoch", "val_acc", "phase", ...}``. The record holds ``base_val_acc``,
    ``units`` (pruning order: name, filters before/after, damage and recovered val acc,
    keep_idxs), ``curve``, ``final_val_acc``, ``final_test_acc`` (+ ``final_test_top5``
    with more than 10 classes), FLOPs, params and latency before/after, ``prune_log``
    (replayable ``prune_layer`` records in order), ``wall_s`` and ``config``.

    The protocol is a list of stages (one per unit or step, then the final fine-tuning).
    After each stage ``checkpoint(state)`` receives a plain state (with the model's
    ``state_dict``); handing that state back as ``resume`` to a fresh copy of the same base
    model continues after that stage with the same numbers an uninterrupted run gives.
    ``evaluate_test=False`` never reads the test split (a search must not). ``shard``
    (rank, world size) splits the fine-tuning batches between data-parallel workers, and
    ``wrap_ddp`` wraps the model in DistributedDataParallel for each fine-tuning stage.
    """
    t0 = time.perf_counter()
    finetune = finetune or FinetuneConfig()
    measure = measure or MeasureConfig()
    prune.validate()
    finetune.validate()
    report = report or (lambda _m: None)
    units = describe_units(model)
    ratios = plan_ratios(model, units, prune)
    criterion = get_criterion(prune.criterion)
    target_ids = resolve_classes(prune.target_classes, splits.class_names)
    ctx = ScoringContext(
        batches=scoring_batches(splits, prune, seed), seed=seed, target_classes=target_ids,
        options=dict(prune.criterion_options),
    )
    n_stage_p = {"layer_by_layer": len(units), "iterative": prune.steps}.get(prune.method, 0)
    state = _restore(model, resume) if resume else None
    tuner = _Finetuner(model, splits, finetune, seed, report, progress, prune.q + prune.p * n_stage_p,
                       start_step=state["step"] if state else 0, curve=state["curve"] if state else None,
                       shard=shard, wrap_ddp=wrap_ddp)
    if state is None:
        before = _measure(model, measure)
        base_val = tuner.val_acc(full=True)
        tuner.emit("base", base_val)
        state = {"stage": 0, "step": 0, "before": before, "base_val": base_val, "rows": [], "prune_log": [], "extra": {}}
    stages = _STAGES[prune.method](units, ratios, criterion, ctx, prune)
    for i, stage in enumerate(stages):
        if i < state["stage"]:
            continue
        # Each stage seeds the global RNG (dropout) itself, so a resumed run matches an uninterrupted one.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1_000 + i)
            stage(model, tuner, state)
        state.update(stage=i + 1, step=tuner.step, curve=tuner.curve)
        if checkpoint is not None:
            checkpoint({**copy.deepcopy({k: v for k, v in state.items() if k != "curve"}), "curve": list(tuner.curve),
                        "model_state": {k: v.detach().clone() for k, v in model.state_dict().items()}})
    tuner.close()
    final_val = tuner.curve[-1]["val_acc"]
    if finetune.eval_max_images is not None and finetune.eval_max_images < len(splits.val):
        final_val = tuner.val_acc(full=True)  # the curve used a subset; the result uses all of val
    test = tuner.evaluate(splits.test) if evaluate_test else None
    after = _measure(model, measure)
    before = state["before"]
    record = {
        "base_val_acc": state["base_val"],
        "units": state["rows"],
        "curve": tuner.curve,
        "final_val_acc": final_val,
        "final_test_acc": test["top1"] if test else None,
        "ratios": ratios,
        "unit_names": [u.name for u in units],
        "flops_before": before["flops"],
        "flops_after": after["flops"],
        "params_before": before["params"],
        "params_after": after["params"],
        "latency_ms_before": before["latency_ms"],
        "latency_ms_after": after["latency_ms"],
        "latency_batch_size": measure.batch_size,
        "prune_log": state["prune_log"],
        "wall_s": time.perf_counter() - t0,
        "config": config if config is not None else {"prune": asdict(prune), "finetune": asdict(finetune), "seed": seed},
    }
    if test and len(splits.class_names) > 10:
        record["final_test_top5"] = test["top5"]
    report({"step": tuner.step, "epoch": round(tuner.epoch, 4), "val_acc": final_val, "phase": "final",
            "test_acc": record["final_test_acc"], "flops": after["flops"], "params": after["params"],
            "latency_ms": after["latency_ms"], "flops_before": before["flops"]})
    return record


def _restore(model: nn.Module, resume: dict) -> dict:
    """Rebuild the pruned architecture from the log, load the weights, return the state."""
    for rec in resume["prune_log"]:
        prune_layer(model, rec["unit"], rec["keep_idxs"])
    model.load_state_dict(resume["model_state"])
    return {k: copy.deepcopy(v) for k, v in resume.items() if k != "model_state"}


def _measure(model: nn.Module, measure: MeasureConfig) -> dict:
    latency = None
    if measure.latency:
        latency = measure_latency(
            model, measure.batch_size, threads=measure.threads, repeats=measure.repeats, warmup=measure.warmup
        )["median_ms"]
    return {"flops": count_flops(model), "params": count_params(model), "latency_ms": latency}


def _row(rec: dict, damage: float, recovered: float) -> dict:
    return {
        "name": rec["unit"], "filters_before": rec["filters_before"], "filters_after": rec["filters_after"],
        "damage_val_acc": damage, "recovered_val_acc": recovered, "keep_idxs": rec["keep_idxs"],
    }


Stage = Callable[[nn.Module, _Finetuner, dict], None]


def _final_stage(prune: PruneConfig) -> Stage:
    def final(model, tuner, state):
        if prune.q > 0:
            tuner.finetune(prune.q, "final_finetune", anneal=tuner.ft.anneal_final)
    return final


def _layer_by_layer(units, ratios, criterion, ctx, prune) -> list[Stage]:
    def unit_stage(unit: Unit, ratio: float) -> Stage:
        def stage(model, tuner, state):
            scores = criterion(model, unit, ctx)  # on the current, partly pruned network
            rec = prune_layer(model, unit.name, select_keep(scores, kept_count(unit.n_filters, ratio, prune.round_to)))
            state["prune_log"].append(rec)
            tuner.adapt_bn(prune, len(state["prune_log"]))
            damage = tuner.val_acc()
            tuner.emit("damage", damage, unit=unit.name, flops=count_flops(model))
            recovered = tuner.finetune(prune.p, "recovery", unit=unit.name) if prune.p > 0 else damage
            state["rows"].append(_row(rec, damage, recovered))
        return stage

    pairs = reversed(list(zip(units, ratios, strict=True)))  # output side inward
    return [unit_stage(u, r) for u, r in pairs] + [_final_stage(prune)]


def _one_shot(units, ratios, criterion, ctx, prune) -> list[Stage]:
    def prune_all(model, tuner, state):
        all_scores = {u.name: criterion(model, u, ctx) for u in units}  # all scored on the unpruned net
        for u, r in reversed(list(zip(units, ratios, strict=True))):
            keep = select_keep(all_scores[u.name], kept_count(u.n_filters, r, prune.round_to))
            state["prune_log"].append(prune_layer(model, u.name, keep))
        tuner.adapt_bn(prune, 0)
        state["extra"]["damage"] = tuner.val_acc()
        tuner.emit("damage", state["extra"]["damage"], unit="all", flops=count_flops(model))

    def final(model, tuner, state):
        damage = state["extra"]["damage"]
        recovered = tuner.finetune(prune.q, "final_finetune", anneal=tuner.ft.anneal_final) if prune.q > 0 else damage
        state["rows"] = [_row(rec, damage, recovered) for rec in state["prune_log"]]

    return [prune_all, final]


def _iterative(units, ratios, criterion, ctx, prune) -> list[Stage]:
    """Global ranking: after step s, s/steps of the schedule's total filter budget is removed.

    Only the total follows the schedule; which filters go, and so how much each unit loses,
    is decided by one ranking over all units of scores divided by their unit's mean |score|.
    No unit loses more than 90% of its filters.
    """
    first = {u.name: u.n_filters for u in units}
    total_before = sum(first.values())
    total_target = sum(kept_count(u.n_filters, r, prune.round_to) for u, r in zip(units, ratios, strict=True))
    floor = {name: max(1, round(0.1 * n)) for name, n in first.items()}

    def current_counts(state) -> dict[str, int]:
        counts = dict(first)
        for rec in state["prune_log"]:
            counts[rec["unit"]] = rec["filters_after"]
        return counts

    def step_stage(step: int) -> Stage:
        def stage(model, tuner, state):
            current = current_counts(state)
            keep_total = round(total_before - (total_before - total_target) * step / prune.steps)
            entries = []
            for u in units:
                s = criterion(model, _resized(u, current[u.name]), ctx).double()
                s = s / s.abs().mean().clamp_min(1e-12)
                entries += [(float(v), u.name, i) for i, v in enumerate(s)]
            n_drop = sum(current.values()) - keep_total
            dropped: dict[str, set[int]] = {u.name: set() for u in units}
            for _score, name, i in sorted(entries):  # lowest normalised scores go first
                if n_drop <= 0:
                    break
                if current[name] - len(dropped[name]) > floor[name]:
                    dropped[name].add(i)
                    n_drop -= 1
            for u in reversed(units):
                if dropped[u.name]:
                    keep = [i for i in range(current[u.name]) if i not in dropped[u.name]]
                    state["prune_log"].append({**prune_layer(model, u.name, keep), "step": step})
            tuner.adapt_bn(prune, step)
            damage = tuner.val_acc()
            state["extra"]["damage"] = damage
            tuner.emit("damage", damage, unit=f"step{step}", flops=count_flops(model))
            if prune.p > 0:
                tuner.finetune(prune.p, "recovery", unit=f"step{step}")
        return stage

    def final(model, tuner, state):
        if prune.q > 0:
            tuner.finetune(prune.q, "final_finetune", anneal=tuner.ft.anneal_final)
        current = current_counts(state)
        alive = {u.name: list(range(u.n_filters)) for u in units}  # original ids of surviving filters
        for rec in state["prune_log"]:
            alive[rec["unit"]] = [alive[rec["unit"]][i] for i in rec["keep_idxs"]]
        state["rows"] = [
            {"name": u.name, "filters_before": first[u.name], "filters_after": current[u.name],
             "damage_val_acc": state["extra"]["damage"], "recovered_val_acc": tuner.curve[-1]["val_acc"],
             "keep_idxs": alive[u.name]}
            for u in reversed(units)
        ]

    return [step_stage(s) for s in range(1, prune.steps + 1)] + [final]


_STAGES = {"layer_by_layer": _layer_by_layer, "one_shot": _one_shot, "iterative": _iterative}


def _resized(unit: Unit, n: int) -> Unit:
    return Unit(unit.name, unit.convs, unit.act_points, unit.bns, n)
