"""The task registry: losses, metrics against independent computations, and the checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trainables.protocol.tasks import (
    IGNORE_INDEX,
    TASKS,
    check_criterion,
    check_pairing,
    detection_targets,
    get_task,
    scores_from_confusion,
    task_of,
)


class _FixedDetector(nn.Module):
    """Returns given detections in eval mode (the metric's input, nothing learned)."""

    task = "detection"

    def __init__(self, preds):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.preds = preds
        self.calls = 0

    def forward(self, x, targets=None):
        out = self.preds[self.calls : self.calls + len(x)]
        self.calls += len(x)
        return out


class _FixedSegmenter(nn.Module):
    task = "segmentation"

    def __init__(self, logits):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.logits = logits

    def forward(self, x):
        return self.logits[: len(x)]


def test_registry_names_the_three_tasks_and_outside_models_are_classifiers():
    assert TASKS.names() == ["classification", "detection", "segmentation"]
    assert task_of(nn.Linear(2, 2)).name == "classification"
    with pytest.raises(ValueError, match="unknown task 'depth'; valid: classification, detection, segmentation"):
        get_task("depth")


def test_detection_targets_drop_padding_and_keep_images_without_objects():
    y = torch.full((2, 3, 5), -1.0)
    y[0, 0] = torch.tensor([3, 1, 2, 10, 12])
    y[0, 1] = torch.tensor([1, 5, 5, 9, 9])
    out = detection_targets(y)
    assert out[0]["labels"].tolist() == [3, 1] and out[0]["boxes"].tolist() == [[1, 2, 10, 12], [5, 5, 9, 9]]
    assert out[1]["boxes"].shape == (0, 4) and out[1]["labels"].dtype == torch.int64
    with pytest.raises(ValueError, match=r"\(B, M, 5\)"):
        detection_targets(torch.zeros(2, 5))


def test_detection_map_perfect_half_and_empty():
    truth = torch.full((2, 2, 5), -1.0)
    truth[0, 0] = torch.tensor([1, 10, 10, 40, 40])
    truth[1, 0] = torch.tensor([2, 50, 50, 90, 90])
    boxes = [truth[0, :1, 1:], truth[1, :1, 1:]]
    perfect = [{"boxes": b.clone(), "scores": torch.tensor([0.9]), "labels": truth[i, :1, 0].long()}
               for i, b in enumerate(boxes)]
    ev = get_task("detection").evaluate
    res = ev(_FixedDetector(perfect), [(torch.zeros(2, 1, 8, 8), truth)])
    assert res["score"] == pytest.approx(1.0) and res["map50"] == pytest.approx(1.0) and res["n"] == 2
    # The second image's box predicted with the wrong class: class 2 is never found (AP 0), class 1 perfect.
    wrong = [perfect[0], {**perfect[1], "labels": torch.tensor([1])}]
    res = ev(_FixedDetector(wrong), [(torch.zeros(2, 1, 8, 8), truth)])
    assert 0.3 < res["map50"] < 0.7
    # A box shifted to IoU ~0.6 counts at 0.5 but not at 0.75.
    shifted = [{**perfect[0], "boxes": torch.tensor([[16.0, 10.0, 46.0, 40.0]])}, perfect[1]]
    res = ev(_FixedDetector(shifted), [(torch.zeros(2, 1, 8, 8), truth)])
    assert res["map50"] == pytest.approx(1.0) and res["map75"] < 1.0
    with pytest.raises(ValueError, match="no image"):
        ev(_FixedDetector(perfect), [])


def test_segmentation_scores_match_torchmetrics_and_hand_counts():
    from torchmetrics.functional.classification import multiclass_jaccard_index

    g = torch.Generator().manual_seed(0)
    k = 4
    y = torch.randint(0, k, (3, 16, 16), generator=g)
    y[0, :2] = IGNORE_INDEX  # ignored pixels count nowhere
    logits = torch.randn(3, k, 16, 16, generator=g)
    logits[:, 0] += 1.0
    res = get_task("segmentation").evaluate(_FixedSegmenter(logits), [(torch.zeros(3, 1, 16, 16), y)])
    pred = logits.argmax(1)
    expected = multiclass_jaccard_index(pred, y, num_classes=k, ignore_index=IGNORE_INDEX, average="macro")
    assert res["miou"] == pytest.approx(float(expected), abs=1e-6) and res["score"] == res["miou"]
    keep = y != IGNORE_INDEX
    assert res["pixel_acc"] == pytest.approx(float((pred[keep] == y[keep]).float().mean()))
    # Class-average accuracy by hand: per truth class, share of its pixels predicted right.
    per_class = [float((pred[keep & (y == c)] == c).float().mean()) for c in range(k)]
    assert res["class_acc"] == pytest.approx(sum(per_class) / k)


def test_confusion_scores_skip_absent_classes():
    c = torch.tensor([[5, 1, 0], [2, 2, 0], [0, 0, 0]])  # class 2: no truth, no prediction
    s = scores_from_confusion(c)
    assert s["miou"] == pytest.approx((5 / 8 + 2 / 5) / 2)
    assert s["pixel_acc"] == pytest.approx(7 / 10)
    assert s["class_acc"] == pytest.approx((5 / 6 + 2 / 4) / 2)


def test_losses_are_differentiable_and_ignore_the_ignore_index():
    seg = get_task("segmentation")
    conv = nn.Conv2d(1, 3, 1)
    x = torch.randn(2, 1, 4, 4)
    y = torch.full((2, 4, 4), IGNORE_INDEX)
    y[0, 0, 0] = 1
    loss = seg.loss(conv, x, y)
    loss.backward()
    assert torch.isfinite(loss) and conv.weight.grad is not None
    only = nn.functional.cross_entropy(conv(x)[0, :, 0, 0][None], torch.tensor([1]))
    assert loss.item() == pytest.approx(only.item(), rel=1e-5)


def test_pairing_and_criterion_checks_are_one_line():
    with pytest.raises(ValueError, match=r"^model.name=small_cnn is a classification model but data.name=fmnist_detection "
                                         r"is a detection data set; pick a detection model"):
        check_pairing("small_cnn", "classification", "fmnist_detection", "detection")
    check_pairing("small_frcnn", "detection", "fmnist_detection", "detection")
    with pytest.raises(ValueError, match=r"criterion.name=taylor does not apply to detection.*valid for detection: random, l1"):
        check_criterion(get_task("detection"), "taylor")
    check_criterion(get_task("segmentation"), "taylor")
    check_criterion(get_task("classification"), "car")
    with pytest.raises(ValueError, match="criterion.name=car does not apply to segmentation"):
        check_criterion(get_task("segmentation"), "car")


def test_segmentation_training_loss_is_median_frequency_balanced():
    from trainables.protocol.tasks import median_frequency_weights

    y = torch.zeros(1, 4, 10, dtype=torch.uint8)  # 40 pixels: 30 background, 8 of class 1, 2 of class 2
    y[0, 0, :8] = 1
    y[0, 1, :2] = 2
    y[0, 3, :] = IGNORE_INDEX  # left out of the counts: 30 - 10 = 20 background pixels counted
    w = median_frequency_weights(y.long(), 4)
    # frequencies 20/30, 8/30, 2/30; median 8/30; class 3 absent -> 0
    assert w.tolist() == pytest.approx([8 / 20, 1.0, 4.0, 0.0])
    logits = torch.randn(1, 4, 4, 10)
    loss = get_task("segmentation").loss(lambda x: logits, torch.zeros(1), y)
    manual = nn.functional.cross_entropy(logits, y.long(), weight=w.float(), ignore_index=IGNORE_INDEX)
    assert loss.item() == pytest.approx(manual.item(), rel=1e-6)
    assert loss.item() != pytest.approx(nn.functional.cross_entropy(logits, y.long(), ignore_index=IGNORE_INDEX).item())
