"""Structured configs of one prune/fine-tune run; ``conf/`` holds their YAML defaults.

Every check here runs before any data is read or any model is trained, and raises a
one-line ``ValueError`` naming the key, the value and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trainables.criteria import list_criteria
from trainables.criteria.blended import check_blend_options
from trainables.schedules import list_schedules

__all__ = ["PruneConfig", "FinetuneConfig", "MeasureConfig", "PretrainConfig", "METHODS"]

METHODS = ("layer_by_layer", "one_shot", "iterative")


@dataclass
class PruneConfig:
    """What to prune and how (Mittal et al. 2019's protocol and its variants)."""

    method: str = "layer_by_layer"  # layer_by_layer | one_shot | iterative (global ranking)
    criterion: str = "l1"  # a registered criterion name
    criterion_options: dict = field(default_factory=dict)  # extra settings for the criterion
    schedule: str = "uniform"  # uniform | differential | per_layer
    ratio: float = 0.5  # uniform: share of filters removed from every unit, in [0, 1)
    ratio_low: float = 0.25  # differential: ratio of the unit nearest the input
    ratio_high: float = 0.75  # differential: ratio of the unit nearest the output
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

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"prune.method='{self.method}' is not one of: {', '.join(METHODS)}")
        if self.criterion not in list_criteria():
            raise ValueError(f"unknown criterion '{self.criterion}'; valid: {', '.join(list_criteria())}")
        if self.schedule not in list_schedules():
            raise ValueError(f"prune.schedule='{self.schedule}' is not one of: {', '.join(list_schedules())}")
        for key in ("ratio", "ratio_low", "ratio_high"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"prune.{key}={value!r} is outside [0, 1)")
        for key in ("p", "q"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"prune.{key}={value!r} must be a number of epochs >= 0")
        if self.target_flops_reduction is not None and not 0.0 < self.target_flops_reduction < 1.0:
            raise ValueError(f"prune.target_flops_reduction={self.target_flops_reduction!r} is outside (0, 1)")
        for key in ("round_to", "steps", "score_batches", "score_batch_size", "adapt_bn_batch_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"prune.{key}={value!r} must be an integer >= 1")
        if not isinstance(self.adapt_bn_batches, int) or self.adapt_bn_batches < 0:
            raise ValueError(f"prune.adapt_bn_batches={self.adapt_bn_batches!r} must be an integer >= 0")
        if self.criterion == "blended":
            check_blend_options(self.criterion_options)
        if self.criterion == "class_specific" and not self.target_classes:
            raise ValueError("prune.target_classes is empty; the class_specific criterion needs class names or ids")


@dataclass
class FinetuneConfig:
    """SGD fine-tuning after pruning."""

    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    eval_batch_size: int = 1000
    eval_every: float = 0.5  # epochs between points of the recovery curve (also at every stage end)
    anneal_final: bool = True  # cosine-decay the learning rate to 0 over the final q epochs
    eval_max_images: int | None = None  # intermediate evaluations on the first N val images (None: all)

    def validate(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"finetune.lr={self.lr!r} must be > 0")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"finetune.momentum={self.momentum!r} is outside [0, 1)")
        if self.weight_decay < 0:
            raise ValueError(f"finetune.weight_decay={self.weight_decay!r} must be >= 0")
        for key in ("batch_size", "eval_batch_size"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ValueError(f"finetune.{key}={getattr(self, key)!r} must be an integer >= 1")
        if not self.eval_every > 0:
            raise ValueError(f"finetune.eval_every={self.eval_every!r} must be > 0 epochs")


@dataclass
class MeasureConfig:
    """How latency is measured for the record (see ``trainables.metrics.measure_latency``)."""

    latency: bool = True
    batch_size: int = 64
    repeats: int = 5
    warmup: int = 2
    threads: int | None = None  # None: torch's current intra-op thread count


@dataclass
class PretrainConfig:
    """Training of the base model that every run and trial starts from."""

    epochs: int = 5
    lr: float = 0.1  # peak of a one-cycle schedule
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128

    def validate(self) -> None:
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"model.pretrain.epochs={self.epochs!r} must be an integer >= 1")
        if not self.lr > 0:
            raise ValueError(f"model.pretrain.lr={self.lr!r} must be > 0")
