"""What differs between tasks: the training loss, the evaluation, and the criteria that apply.

A task is a registry entry, not a fork of the protocol: the Finetuner, the base-model
training, the protocol, the search and the study all call ``task_of(model)`` and use its
``loss`` and ``evaluate``. A model says which task it solves with its ``task`` stamp (set by
``trainables.core.models.register_model``; an outside model without one is a classifier), and a
data set with ``DataSplits.task``; ``check_pairing`` refuses a mismatch before any work.

Batches are ``(x, y)`` tensors for every task, so loaders, sharding and caching stay shared:

* classification: ``y`` (B,) label ids; headline score top-1 accuracy.
* detection: ``y`` (B, M, 5) rows ``[label, x1, y1, x2, y2]`` (labels 1..K, padding rows -1);
  the model takes ``model(x, y)`` in training mode (returns torchvision's loss dict) and
  ``model(x)`` in eval mode (a list of detections). Headline score mAP@0.5 (VOC's measure);
  COCO's mAP@[.5:.95] is reported beside it. Both come from torchmetrics'
  ``MeanAveragePrecision`` with the pycocotools backend, not a hand-written AP.
* segmentation: ``y`` (B, H, W) class per pixel, integer (uint8 in memory is fine: the loss and the
  metric widen it), 0 background, 255 ignored; trained with SegNet's median-frequency class
  balancing (per batch); the model returns
  (B, K, H, W) logits. Headline score mIoU over the classes present in the ground truth or
  the predictions; global pixel accuracy and class-average accuracy beside it, all from one
  confusion matrix (torchmetrics' ``MulticlassConfusionMatrix``).

Every ``evaluate`` returns a dict with ``score`` (the headline, in [0, 1]), the task's named
metrics and ``n`` (images scored). Records and reports keep the key ``val_acc`` for the
headline validation score of any task (top-1, mAP@0.5 or mIoU), so the protocol, ASHA, the
Pareto front and the study read one name; ``score_name`` says which it is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data import Registry
from trainables.core.metrics import evaluate as evaluate_classifier

__all__ = ["IGNORE_INDEX", "TASKS", "Task", "check_pairing", "detection_targets", "get_task",
           "median_frequency_weights", "task_of"]

IGNORE_INDEX = 255  # segmentation pixels that are neither scored nor trained on (VOC's object boundaries)

Batches = Iterable[tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class Task:
    """One task: how to train on a batch, how to score a model, which criteria make sense."""

    name: str
    score_name: str  # what the headline score is: top1 | map50 | miou
    loss: Callable[[nn.Module, Tensor, Tensor], Tensor]  # (model in train mode, x, y) -> scalar loss
    evaluate: Callable[..., dict]  # (model, batches, classes=None) -> {"score", <named metrics>, "n"}
    # Criteria that can score this task's filters (None: all). Forward-only criteria apply to
    # every task; gradient criteria need a per-image loss of the logits; car and class_specific
    # read class predictions.
    criteria: tuple[str, ...] | None = None
    # The loss of the model's output against y for gradient criteria (None: not available).
    logits_loss: Callable[[Tensor, Tensor], Tensor] | None = F.cross_entropy
    # Images per batch where an evaluation has no configured size (base training, the front):
    # small images classify cheaply in big batches; dense tasks keep full-size maps per image.
    eval_batch_size: int = 1000


TASKS: Registry[Task] = Registry("task")

# Criteria that need nothing but the weights or a forward pass through the network.
FORWARD_ONLY = ("random", "l1", "l2", "fpgm", "bn_gamma", "mean_activation", "apoz", "entropy", "scaled_entropy",
                "hrank", "blended")


def get_task(name: str) -> Task:
    return TASKS.get(name)


def task_of(model: nn.Module) -> Task:
    """The task ``model`` solves: its ``task`` stamp, else classification."""
    return TASKS.get(getattr(model, "task", "classification"))


def check_pairing(model_name: str, model_task: str, data_name: str, data_task: str) -> None:
    """One line when a model of one task meets a data set of another (before any work)."""
    if model_task != data_task:
        raise ValueError(
            f"model.name={model_name} is a {model_task} model but data.name={data_name} is a {data_task} data set; "
            f"pick a {data_task} model or a {model_task} data set (or task=<name> to set both)"
        )


def check_criterion(task: Task, criterion: str) -> None:
    """One line when ``criterion`` cannot score filters of ``task``'s models."""
    if task.criteria is not None and criterion not in task.criteria:
        raise ValueError(
            f"criterion.name={criterion} does not apply to {task.name} (it needs class logits); "
            f"valid for {task.name}: {', '.join(task.criteria)}"
        )


# --- classification -------------------------------------------------------------------


def _classification_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(model(x), y)


def _evaluate_classification(model: nn.Module, batches: Batches, classes: Sequence[int] | None = None) -> dict:
    out = evaluate_classifier(model, batches, classes=classes)
    return {**out, "score": out["top1"]}


TASKS.register("classification", Task("classification", "top1", _classification_loss, _evaluate_classification))


# --- detection ------------------------------------------------------------------------


def detection_targets(y: Tensor) -> list[dict[str, Tensor]]:
    """Padded (B, M, 5) targets -> torchvision's list of ``{"boxes", "labels"}``, padding dropped."""
    if y.ndim != 3 or y.shape[-1] != 5:
        raise ValueError(f"detection targets must be (B, M, 5) rows [label, x1, y1, x2, y2], but got {tuple(y.shape)}")
    out = []
    for rows in y:
        rows = rows[rows[:, 0] >= 0]
        out.append({"boxes": rows[:, 1:].float(), "labels": rows[:, 0].long()})
    return out


def _detection_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    losses = model(x, y)
    return sum(losses.values())


@torch.no_grad()
def _evaluate_detection(model: nn.Module, batches: Batches, classes: Sequence[int] | None = None) -> dict:
    from torchmetrics.detection import MeanAveragePrecision

    metric = MeanAveragePrecision(iou_type="bbox", backend="pycocotools")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    n = 0
    try:
        for x, y in batches:
            preds = model(x.to(device))
            metric.update([{k: v.detach().cpu() for k, v in p.items()} for p in preds], detection_targets(y.cpu()))
            n += len(x)
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("evaluate: no image to score (empty batches)")
    result = metric.compute()
    map50, map_all = float(result["map_50"]), float(result["map"])
    # pycocotools says -1 when no ground truth box was seen at all; a model cannot score there.
    return {"score": max(map50, 0.0), "map50": map50, "map": map_all, "map75": float(result["map_75"]), "n": n}


TASKS.register("detection", Task("detection", "map50", _detection_loss, _evaluate_detection,
                                 criteria=FORWARD_ONLY, logits_loss=None, eval_batch_size=32))


# --- segmentation ---------------------------------------------------------------------


def median_frequency_weights(y: Tensor, num_classes: int) -> Tensor:
    """SegNet's class balancing (Badrinarayanan et al., after Eigen & Fergus): class c's loss
    weight is median(freq) / freq(c) over the classes present, 0 for absent ones, with pixel
    frequencies counted in ``y`` (ignored pixels left out). The paper counts over the training
    set; here over each batch, so the task needs no statistics of its data set."""
    counts = torch.bincount(y[y != IGNORE_INDEX].flatten(), minlength=num_classes).double()
    present = counts > 0
    weights = torch.zeros(num_classes, dtype=torch.float64, device=y.device)
    if present.any():
        freq = counts[present] / counts.sum()
        weights[present] = freq.median() / freq
    return weights


def _segmentation_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    # Class-balanced: most pixels are background, and without balancing a small SegNet sits on
    # the all-background plateau for epochs (val mIoU 0.11 after 3 epochs on the embedded scenes;
    # 0.25 after 150 steps with it). Evaluation and the gradient criteria use the plain pixel loss.
    logits, y = model(x), y.long()
    weights = median_frequency_weights(y, logits.shape[1]).to(logits.dtype)
    return F.cross_entropy(logits, y, weight=weights, ignore_index=IGNORE_INDEX)


def _segmentation_logits_loss(logits: Tensor, y: Tensor, reduction: str = "mean") -> Tensor:
    return F.cross_entropy(logits, y.long(), ignore_index=IGNORE_INDEX, reduction=reduction)


def scores_from_confusion(confusion: Tensor) -> dict:
    """mIoU, global pixel accuracy and class-average accuracy of a (K, K) confusion matrix
    (rows: truth, columns: prediction). Classes absent from both truth and prediction do not
    count in the mIoU; classes absent from the truth do not count in the class average."""
    c = confusion.double()
    tp, truth, pred = c.diag(), c.sum(1), c.sum(0)
    union = truth + pred - tp
    seen = union > 0
    present = truth > 0
    total = c.sum()
    return {
        "miou": float((tp[seen] / union[seen]).mean()) if seen.any() else 0.0,
        "pixel_acc": float(tp.sum() / total) if total > 0 else 0.0,
        "class_acc": float((tp[present] / truth[present]).mean()) if present.any() else 0.0,
    }


@torch.no_grad()
def _evaluate_segmentation(model: nn.Module, batches: Batches, classes: Sequence[int] | None = None) -> dict:
    from torchmetrics.classification import MulticlassConfusionMatrix

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    metric, n, loss_sum, pixels = None, 0, 0.0, 0
    try:
        for x, y in batches:
            logits = model(x.to(device))
            y = y.to(device).long()
            if metric is None:
                metric = MulticlassConfusionMatrix(num_classes=logits.shape[1], ignore_index=IGNORE_INDEX).to(device)
            metric.update(logits.argmax(1), y)
            loss_sum += float(_segmentation_logits_loss(logits, y, reduction="sum"))
            pixels += int((y != IGNORE_INDEX).sum())
            n += len(x)
    finally:
        model.train(was_training)
    if metric is None:
        raise ValueError("evaluate: no image to score (empty batches)")
    scores = scores_from_confusion(metric.compute().cpu())
    return {"score": scores["miou"], **scores, "loss": loss_sum / max(pixels, 1), "n": n}


TASKS.register("segmentation", Task(
    "segmentation", "miou", _segmentation_loss, _evaluate_segmentation,
    criteria=(*FORWARD_ONLY, "sensitivity", "taylor"), logits_loss=_segmentation_logits_loss, eval_batch_size=64,
))
