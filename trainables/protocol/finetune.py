"""Fine-tuning between pruning steps: seeded SGD (optionally data-parallel), evaluation along
the way, and adaptive BN re-estimation after a pruning step."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from data import DataSplits, iterate_batches, take
from trainables.core.metrics import count_flops
from trainables.protocol.config import FinetuneConfig, PruneConfig
from trainables.protocol.records import CurvePoint
from trainables.protocol.tasks import task_of

__all__ = ["Finetuner", "Report", "recalibrate_bn", "stage_eval_steps", "steps_per_epoch"]

Report = Callable[[dict], None]

# Seed offsets that keep the fine-tuning, adaptive-BN and scoring streams independent of each other.
_TRAIN_SEED_STRIDE = 100_003
_ADAPT_BN_SEED_STRIDE, _ADAPT_BN_SEED_OFFSET = 100_019, 7_777


def steps_per_epoch(splits: DataSplits, ft: FinetuneConfig, world: int = 1) -> int:
    """Optimiser steps in one fine-tuning epoch: ``train_size_full // (batch x world)`` (the
    training set before ``data.fraction``, so a budget in epochs keeps its step count whatever
    the fraction), or one pass over ``splits.train`` with ``finetune.steps_follow_fraction``;
    with ``world`` data-parallel workers one step takes a batch on each."""
    images = len(splits.train) if ft.steps_follow_fraction else splits.train_size_full
    return max(1, int(images) // (int(ft.batch_size) * int(world)))


def stage_eval_steps(n_steps: int, evals_per_stage: int, every: int | None = None) -> list[int]:
    """Steps (1..n, counted within a stage of ``n_steps``) after which the stage evaluates.

    ``evals_per_stage`` points at round(n x i / k), i = 1..k, so every stage, however short,
    is sampled along its length (duplicates merge when n < k); plus every ``every`` steps
    when given; always the last step. A stage of 0 steps evaluates once, at its start (0).
    """
    if n_steps <= 0:
        return [0]
    points = {round(n_steps * i / evals_per_stage) for i in range(1, evals_per_stage + 1)}
    if every is not None:
        points.update(range(every, n_steps + 1, every))
    points.add(n_steps)
    return sorted(p for p in points if 1 <= p <= n_steps)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]]) -> int:
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


class Finetuner:
    """SGD over a seeded, endless stream of training batches, with evaluation and reporting.

    ``step`` counts optimizer steps over the whole run (one batch per worker each) and
    ``curve`` holds every evaluation; both continue from ``start_step`` / ``curve`` on resume.
    ``shard`` is (rank, world size) of data-parallel workers; ``wrap_ddp`` wraps the model in
    DistributedDataParallel for each stage. ``total_epochs`` only sizes the progress bar.

    An epoch is ``splits.train_size_full // batch`` steps (the training set before
    ``data.fraction``), so a budget in epochs is the same number of optimiser steps whatever
    the fraction; the stream cycles through the smaller set (pass j shuffled with its own seed).
    ``finetune.steps_follow_fraction`` makes an epoch one pass over ``splits.train`` instead.
    """

    def __init__(self, model: nn.Module, splits: DataSplits, ft: FinetuneConfig, seed: int, report: Report,
                 progress: bool, total_epochs: float, start_step: int = 0, curve: list[CurvePoint] | None = None,
                 shard: tuple[int, int] = (0, 1), wrap_ddp: bool = False):
        self.model, self.splits, self.ft, self.seed, self.report = model, splits, ft, seed, report
        self.rank, self.world = shard
        self.wrap_ddp = wrap_ddp
        # With several workers, one step consumes one batch per worker.
        self.steps_per_epoch = steps_per_epoch(splits, ft, self.world)
        # Steps of one pass over the training set (equal to steps_per_epoch when all of it is used);
        # a set smaller than one global batch yields one short batch per pass.
        self._drop_last = len(splits.train) >= ft.batch_size * self.world
        self._steps_per_pass = max(1, len(splits.train) // (ft.batch_size * self.world))
        if math.ceil(len(splits.train) / ft.batch_size) < self.world:
            raise ValueError(f"data.fraction must leave at least one batch per worker ({self.world}), "
                             f"but got {len(splits.train)} training images")
        self._task = task_of(model)  # the training loss and the evaluation (trainables.protocol.tasks)
        self.step = start_step
        self.curve: list[CurvePoint] = list(curve or [])
        self._stream = self._batches(start_step)
        self._bar = None
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=math.ceil(total_epochs * self.steps_per_epoch), desc="fine-tune", unit="step", leave=False)

    @property
    def num_workers(self) -> int:
        """Loader processes for every stream read from the splits (``data.num_workers``)."""
        return self.splits.num_workers

    def _batches(self, start_step: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Pass j over the training set is shuffled with seed (seed, j); a resumed run skips to
        ``start_step``. Passes, not epochs: with a fraction of the data an epoch spans several."""
        first_pass, skip = divmod(start_step, self._steps_per_pass)
        for j in itertools.count(first_pass):
            # Every worker shuffles alike and worker r reads (decodes) only batches r, r+W, ...
            yield from iterate_batches(
                self.splits.train, self.ft.batch_size, shuffle=True, seed=self.seed * _TRAIN_SEED_STRIDE + j,
                drop_last=self._drop_last, num_workers=self.num_workers, shard=(self.rank, self.world),
                skip=skip if j == first_pass else 0, device=self._device(),
            )

    def _device(self) -> torch.device:
        """Where the model's weights are, so where batches go (CUDA: pinned loader memory)."""
        return next(self.model.parameters()).device

    def skip_to(self, step: int) -> None:
        """Move the step counter (and the batch stream with it) to ``step``: steps taken
        elsewhere (scratch's pretraining) count in the budget and the curve."""
        self.step = step
        self._stream = self._batches(step)

    @property
    def epoch(self) -> float:
        """Epochs of fine-tuning so far (fractional)."""
        return self.step / self.steps_per_epoch

    @property
    def curve_on_subset(self) -> bool:
        """Whether curve evaluations read only the first ``eval_max_images`` validation images."""
        limit = self.ft.eval_max_images
        return limit is not None and limit < len(self.splits.val)

    def val_acc(self, full: bool = False) -> float:
        """Validation score in [0, 1] (the task's headline: top-1, mAP@0.5, mIoU); intermediate evaluations may use only the first
        ``eval_max_images`` validation images (a cheaper curve), ``full`` always uses all."""
        val = self.splits.val
        if not full and self.curve_on_subset:
            val = take(val, torch.arange(self.ft.eval_max_images), None)  # in-memory data stays in memory
        return self.evaluate(val)["score"]

    def evaluate(self, dataset: Dataset) -> dict[str, float]:
        """The task's evaluation on one split, in eval order: ``score`` (the headline: top-1,
        mAP@0.5 or mIoU) and the task's named metrics (``trainables.protocol.tasks``)."""
        batches = iterate_batches(dataset, self.ft.eval_batch_size, shuffle=False, num_workers=self.num_workers,
                                  device=self._device())
        return task_of(self.model).evaluate(self.model, batches, classes=self.splits.eval_classes)

    def adapt_bn(self, prune: PruneConfig, salt: int) -> None:
        """Adaptive BN after a pruning step (``prune.adapt_bn_batches`` > 0).

        Reads ``train_eval`` (training samples, evaluation transform): statistics of augmented
        crops would not match what the deployed model sees. Its own seeded stream keeps the
        fine-tuning batches the same with or without it; ``salt`` varies it per pruning step.
        """
        if prune.adapt_bn_batches > 0:
            stream = iterate_batches(
                self.splits.train_eval, prune.adapt_bn_batch_size, shuffle=True,
                seed=self.seed * _ADAPT_BN_SEED_STRIDE + _ADAPT_BN_SEED_OFFSET + salt, num_workers=self.num_workers,
                device=self._device(),
            )
            recalibrate_bn(self.model, itertools.islice(stream, prune.adapt_bn_batches))

    def emit(self, phase: str, val_acc: float, **extra: Any) -> None:
        """Append a point to the curve and report it (``extra`` is reported, not kept)."""
        point: CurvePoint = {"step": self.step, "epoch": round(self.epoch, 4), "val_acc": val_acc, "phase": phase}
        self.curve.append(point)
        # The headline score under its own name too (val_map50, val_miou): what MLflow shows a
        # detection or segmentation user beside the task-neutral val_acc.
        named = {} if self._task.score_name == "top1" else {f"val_{self._task.score_name}": val_acc}
        # Every report carries the current FLOPs, so a trial stopped early still has both objectives.
        self.report({**point, **named, "flops": count_flops(self.model), **extra})

    def stage_steps(self, epochs: float) -> int:
        """Optimiser steps of a stage of ``epochs``."""
        return round(epochs * self.steps_per_epoch)

    def stage_evals(self, n_steps: int) -> list[int]:
        """The steps (within the stage) at which a stage of ``n_steps`` evaluates."""
        every = None if self.ft.eval_every is None else max(1, round(self.ft.eval_every * self.steps_per_epoch))
        return stage_eval_steps(n_steps, self.ft.evals_per_stage, every)

    def finetune(self, epochs: float, phase: str, anneal: bool = False,
                 marks: dict[int, Callable[[], None]] | None = None, **extra: Any) -> float:
        """Train ``epochs`` (fractions allowed); returns the validation accuracy at the end.

        Evaluates at ``stage_evals`` (``evals_per_stage`` points, plus every ``eval_every``
        epochs if set; always at the end). ``anneal`` decays the learning rate to 0 along a
        cosine over this stage (used for the final fine-tuning, so a run ends at a settled
        optimum rather than a noisy SGD iterate).

        ``marks`` (step within the stage -> callback, steps in 1..n-1, no annealing): the stage
        also evaluates where a stage of each marked length would, and calls the callback after
        that step, so the run can record what the shorter stage would have ended with.
        Evaluation changes no weight and reads no training batch, so the steps are the same.
        """
        n_steps = self.stage_steps(epochs)
        evals = set(self.stage_evals(n_steps))
        marks = marks or {}
        if marks and (anneal or not all(1 <= m < n_steps for m in marks)):
            raise ValueError(f"marks must be steps in 1..{n_steps - 1} of a stage without annealing, but got "
                             f"{sorted(marks)} (anneal={anneal})")
        for m in marks:
            evals.update(self.stage_evals(m))
        opt, sched = self._optimizer(n_steps, anneal)
        device = next(self.model.parameters()).device
        net = self._network(device)
        self.model.train()
        for i in range(1, n_steps + 1):
            loss = self._train_step(net, opt, sched, device)
            if self._bar is not None:
                self._bar.update(1)
                if i % 20 == 1:  # .item() syncs a GPU: only now and then
                    self._bar.set_postfix_str(f"{phase} {extra.get('unit', '')} loss={loss.item():.3f}")
            if i in evals and i != n_steps:
                self.emit(phase, self.val_acc(), **extra)
            if i in marks:
                marks[i]()
        acc = self.val_acc()
        self.emit(phase, acc, **extra)
        return acc

    def train_steps(self, n_steps: int) -> None:
        """``n_steps`` SGD steps of the run's stream with a fresh optimizer and no evaluation (they
        count in ``step``; the curve is unchanged): greedy CAR's retraining between removals."""
        opt, sched = self._optimizer(n_steps, False)  # pruning replaced the parameters
        net = self._network(self._device())
        self.model.train()
        for _ in range(n_steps):
            self._train_step(net, opt, sched, self._device())
        self.model.eval()

    def _optimizer(self, n_steps: int, anneal: bool) -> tuple[torch.optim.Optimizer, Any]:
        # Pruning replaced the Parameter objects: a fresh optimizer each stage.
        ft = self.ft
        opt = torch.optim.SGD(self.model.parameters(), lr=ft.lr, momentum=ft.momentum, weight_decay=ft.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, n_steps)) if anneal else None
        return opt, sched

    def _network(self, device: torch.device) -> nn.Module:
        """The module to train through: the model, or a DDP wrapper of it."""
        if not self.wrap_ddp:
            return self.model
        # Re-wrapped every stage: pruning changed the parameters DDP would synchronise.
        return nn.parallel.DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda" else None)

    def _train_step(self, net: nn.Module, opt: torch.optim.Optimizer, sched: Any, device: torch.device) -> Tensor:
        """One SGD step on the next batch of the stream; returns the (undetached) loss."""
        x, y = next(self._stream)
        loss = self._task.loss(net, x.to(device, non_blocking=True), y.to(device, non_blocking=True))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        self.step += 1
        return loss

    def close(self) -> None:
        """Close the progress bar, if any."""
        if self._bar is not None:
            self._bar.close()
