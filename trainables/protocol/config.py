"""Structured configs of one prune/fine-tune run; ``conf/`` holds their YAML defaults.

Each config checks itself when it is constructed (``__post_init__``), so a config object
that exists is a valid one, whether it came from Hydra, the search or the Python API. A
bad value raises a one-line ``ValueError`` naming the key, the value and what is allowed,
e.g. ``prune.ratio must be in [0, 1), but got 7.0``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from numbers import Real
from typing import Any

# The registries (criteria, schedules) import torch: they are imported where a config is checked,
# so that importing this module (for METHODS, require) stays light for --help and key checks.

__all__ = ["METHODS", "FinetuneConfig", "MeasureConfig", "PretrainConfig", "PruneConfig", "require", "require_int"]

# control: no pruning, the base fine-tuned with layer_by_layer's budget; scratch: the pruned
# architecture re-initialised and trained with the whole prune + fine-tune budget; greedy_car:
# layer_by_layer's order, each unit pruned by greedy CAR (trainables.protocol.greedy_car), criterion unused.
METHODS = ("layer_by_layer", "one_shot", "iterative", "control", "scratch", "greedy_car")


def require(ok: bool, key: str, allowed: str, value: Any) -> None:
    """Raise the house's one-line error unless ``ok``: "<key> must be <allowed>, but got <value>"."""
    if not ok:
        raise ValueError(f"{key} must be {allowed}, but got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def require_int(key: str, value: Any, low: int) -> None:
    """``require`` for an integer setting (bools refused): "<key> must be an integer >= <low>, but got ..."."""
    require(_is_int(value) and value >= low, key, f"an integer >= {low}", value)


def _number_at_least(key: str, value: Any, low: float, strict: bool = False) -> None:
    ok = _is_number(value) and (value > low if strict else value >= low)
    require(ok, key, f"a number {'>' if strict else '>='} {low}", value)


def _one_of(key: str, value: Any, allowed: list[str] | tuple[str, ...]) -> None:
    require(value in allowed, key, f"one of {', '.join(allowed)}", value)


@dataclass(kw_only=True)
class PruneConfig:
    """What to prune and how (Mittal et al. 2019's protocol and its variants)."""

    method: str = "layer_by_layer"  # layer_by_layer | one_shot | iterative (global ranking) | control | scratch
    criterion: str = "l1"  # a registered criterion name
    criterion_options: dict = field(default_factory=dict)  # extra settings for the criterion
    schedule: str = "uniform"  # uniform | differential | differential_depth | *_inverted | per_layer | global
    ratio: float = 0.5  # uniform: share of filters removed from every unit, in [0, 1) (global: of all filters)
    global_min_keep: float = 0.1  # global: the least share of its filters any unit keeps, in (0, 1)
    ratio_low: float = 0.25  # differential: ratio of the units with fewest filters (_depth: the first unit)
    ratio_high: float = 0.75  # ... with most filters (_depth: the last); >= ratio_low unless *_inverted
    ratios: list[float] | None = None  # per_layer: one ratio per unit, input to output
    round_to: int = 1  # round kept filter counts to a multiple of this (8 helps real speed)
    target_flops_reduction: float | None = None  # e.g. 0.5: scale the schedule until FLOPs halve (+-2%)
    p: float = 0.2  # fine-tuning epochs after each unit (layer_by_layer) or step (iterative)
    q: float = 1.0  # fine-tuning epochs at the end
    steps: int = 4  # iterative: number of global pruning steps
    score_batches: int = 4  # scoring batches handed to data-driven criteria
    score_batch_size: int = 64
    adapt_bn_batches: int = 0  # after each pruning step, re-estimate BN statistics on N train batches (EagleEye)
    adapt_bn_batch_size: int = 128
    target_classes: list | None = None  # class names or ids for the class_specific criterion
    rescore_every: int = 1  # greedy_car: re-score the remaining filters after every r removals
    greedy_retrain_steps: int = 0  # greedy_car: SGD steps after every r removals (0: none; the paper retrains)
    units: str = "all"  # which units are pruned: all, or a part the model declares (SegNet: encoder | decoder)

    def __post_init__(self) -> None:
        from trainables.protocol.schedules import check_ramp, check_ratio, list_schedules

        # Values first, names of registered criteria last: the criteria registry imports torch
        # (seconds), the rest does not, so a value out of range is refused at once.
        _one_of("prune.method", self.method, METHODS)
        require(isinstance(self.criterion_options, dict), "criterion.options", "a mapping", self.criterion_options)
        _one_of("prune.schedule", self.schedule, list_schedules())
        for key in ("ratio", "ratio_low", "ratio_high"):
            check_ratio(f"prune.{key}", getattr(self, key))
        # Mittal et al. prune more where there are more filters; a ramp the other way is almost
        # always a swapped pair, so it needs the *_inverted schedule's name (rule in schedules).
        check_ramp(self.schedule, self.ratio_low, self.ratio_high)
        if self.ratios is not None:
            require(isinstance(self.ratios, (list, tuple)), "prune.ratios", "a list of ratios or null", self.ratios)
            for i, r in enumerate(self.ratios):
                check_ratio(f"prune.ratios[{i}]", r)
        require(self.schedule != "per_layer" or bool(self.ratios), "prune.ratios",
                "a list with one ratio per unit when prune.schedule=per_layer", self.ratios)
        self._check_global()
        for key in ("p", "q"):
            _number_at_least(f"prune.{key}", getattr(self, key), 0)
        target = self.target_flops_reduction
        require(target is None or (_is_number(target) and 0 < target < 1), "prune.target_flops_reduction",
                "null or in (0, 1)", target)
        for key in ("round_to", "steps", "score_batches", "score_batch_size", "adapt_bn_batch_size"):
            require_int(f"prune.{key}", getattr(self, key), 1)
        require_int("prune.adapt_bn_batches", self.adapt_bn_batches, 0)
        require_int("prune.rescore_every", self.rescore_every, 1)
        require_int("prune.greedy_retrain_steps", self.greedy_retrain_steps, 0)
        from trainables.criteria import list_criteria

        if self.criterion not in list_criteria():
            raise ValueError(f"unknown criterion '{self.criterion}'; valid: {', '.join(list_criteria())}")
        if self.criterion == "blended":
            from trainables.criteria.blended import check_blend_options

            check_blend_options(self.criterion_options)
        if self.criterion == "class_specific":
            require(bool(self.target_classes), "prune.target_classes",
                    "a non-empty list of class names or ids for criterion=class_specific", self.target_classes)

    def _check_global(self) -> None:
        """schedule=global ranks the criterion's scores: only methods that score filters with
        the criterion and take a per-unit plan can use it (rule in trainables.protocol.schedules)."""
        from trainables.protocol.schedules import GLOBAL, check_min_keep

        check_min_keep("prune.global_min_keep", self.global_min_keep)
        # A min_keep set without schedule=global is refused by trainables.cli.keycheck, which knows
        # the schedules a search may draw (a uniform trial of such a search is given it too).
        if self.schedule != GLOBAL:
            return
        require(self.method in ("layer_by_layer", "one_shot"), "prune.method",
                "layer_by_layer or one_shot with prune.schedule=global (control, scratch and greedy_car score no "
                "filters with the criterion; iterative ranks all units globally itself: use schedule=uniform)",
                self.method)
        if self.target_flops_reduction is None:
            require(self.ratio <= 1 - self.global_min_keep, "prune.ratio",
                    f"<= 1 - prune.global_min_keep = {1 - self.global_min_keep:g} with prune.schedule=global",
                    self.ratio)


@dataclass(kw_only=True)
class FinetuneConfig:
    """SGD fine-tuning after pruning."""

    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    eval_batch_size: int = 1000
    eval_every: float | None = None  # extra curve points every this many epochs (None: only evals_per_stage)
    evals_per_stage: int = 4  # evaluations in every fine-tuning stage of n steps: at round(n*i/k), i=1..k
    recovery_delta: float = 0.01  # "recovered" = within this (accuracy units) of the pre-prune accuracy
    # False: an epoch is train_size_full // batch steps whatever data.fraction is (fixed budget);
    # True: an epoch is one pass over the (fraction of the) training set, as before
    steps_follow_fraction: bool = False
    anneal_final: bool = True  # cosine-decay the learning rate to 0 over the final q epochs
    eval_max_images: int | None = None  # intermediate evaluations on the first N val images (None: all)

    def __post_init__(self) -> None:
        _number_at_least("finetune.lr", self.lr, 0, strict=True)
        require(_is_number(self.momentum) and 0 <= self.momentum < 1, "finetune.momentum", "in [0, 1)", self.momentum)
        _number_at_least("finetune.weight_decay", self.weight_decay, 0)
        require_int("data.batch_size", self.batch_size, 1)
        require_int("data.eval_batch_size", self.eval_batch_size, 1)
        if self.eval_every is not None:
            _number_at_least("finetune.eval_every", self.eval_every, 0, strict=True)
        require_int("finetune.evals_per_stage", self.evals_per_stage, 1)
        require(_is_number(self.recovery_delta) and 0 < self.recovery_delta < 1, "finetune.recovery_delta",
                "in (0, 1)", self.recovery_delta)
        require(isinstance(self.steps_follow_fraction, bool), "finetune.steps_follow_fraction", "true or false",
                self.steps_follow_fraction)
        require(isinstance(self.anneal_final, bool), "finetune.anneal_final", "true or false", self.anneal_final)
        if self.eval_max_images is not None:
            require_int("finetune.eval_max_images", self.eval_max_images, 1)


@dataclass(kw_only=True)
class MeasureConfig:
    """How latency is measured for the record (see ``trainables.core.metrics.measure_latency``)."""

    latency: bool = True
    batch_size: int = 64
    repeats: int = 5
    warmup: int = 2
    threads: int | None = None  # None: torch's current intra-op thread count

    def __post_init__(self) -> None:
        require(isinstance(self.latency, bool), "measure.latency", "true or false", self.latency)
        require_int("measure.batch_size", self.batch_size, 1)
        require_int("measure.repeats", self.repeats, 1)
        require_int("measure.warmup", self.warmup, 0)
        if self.threads is not None:
            require_int("measure.threads", self.threads, 1)


@dataclass(kw_only=True)
class PretrainConfig:
    """Training of the base model that every run and trial starts from."""

    epochs: int = 5  # 0: no training, the given model.weights as they are (compose checks they are given)
    lr: float = 0.1  # peak of a one-cycle schedule
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128

    def __post_init__(self) -> None:
        require_int("model.pretrain.epochs", self.epochs, 0)
        _number_at_least("model.pretrain.lr", self.lr, 0, strict=True)
        require(_is_number(self.momentum) and 0 <= self.momentum < 1, "model.pretrain.momentum", "in [0, 1)",
                self.momentum)
        _number_at_least("model.pretrain.weight_decay", self.weight_decay, 0)
        require_int("data.batch_size", self.batch_size, 1)
