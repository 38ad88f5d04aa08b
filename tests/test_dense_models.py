"""Detection and segmentation models: their forward contracts, and surgery on them
(pruned == masked for every unit, SegNet's declared coupling, unit parts, FrozenBatchNorm2d)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch_pruning as tp
from test_surgery import _masked_and_pruned, _random_keep, _randomise_bn
from torch import nn

from trainables.core.metrics import count_flops
from trainables.core.models import build_model, cut_head, head_of, list_models
from trainables.core.surgery import (
    dependency_graph,
    describe_units,
    mask_filters,
    prune_layer,
    select_units,
    unfreeze_batchnorm,
)

DENSE = {"small_frcnn": "detection", "vgg16_frcnn": "detection", "small_segnet": "segmentation",
         "vgg16_segnet": "segmentation"}
# Reduced inputs keep the VGG-16 models quick; everything here is size-agnostic.
SMALL_INPUT = {"small_frcnn": (1, 128, 128), "vgg16_frcnn": (3, 64, 64), "small_segnet": (1, 128, 128),
               "vgg16_segnet": (3, 64, 64)}
KWARGS = {"vgg16_frcnn": {"representation_size": 256}}


def _model(name: str, seed: int = 0, num_classes: int = 11) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model(name, num_classes=num_classes, **KWARGS.get(name, {}))
    model.input_shape = SMALL_INPUT[name]
    _randomise_bn(model, torch.Generator().manual_seed(seed))
    return model.eval()


def _padded_targets() -> torch.Tensor:
    """Three images: two objects, none (all padding), one; rows [label, x1, y1, x2, y2]."""
    y = torch.full((3, 2, 5), -1.0)
    y[0, 0] = torch.tensor([3, 10, 12, 50, 60])
    y[0, 1] = torch.tensor([7, 60, 40, 100, 90])
    y[2, 0] = torch.tensor([10, 30, 30, 70, 64])
    return y


# --- registry and forward contracts --------------------------------------------------------


@pytest.mark.parametrize("name", list(DENSE))
def test_registered_with_task_and_no_head(name):
    model = _model(name)
    assert name in list_models() and model.task == DENSE[name] and model.head_name is None
    assert model.model_name == name
    with pytest.raises(ValueError, match=rf"a {DENSE[name]} model \({name}\) has no nn.Linear classifier head"):
        head_of(model)
    with pytest.raises(ValueError, match="has no nn.Linear classifier head"):
        cut_head(model, [0, 1])
    pickle.loads(pickle.dumps(copy.deepcopy(model)))  # no closures over modules


@pytest.mark.parametrize("name,shape", [("small_segnet", (1, 128, 128)), ("small_segnet", (1, 90, 45)),
                                        ("vgg16_segnet", (3, 72, 96))])
def test_segnet_logits_shape(name, shape):
    model = _model(name, num_classes=5)
    with torch.no_grad():
        out = model(torch.randn(2, *shape))
    assert out.shape == (2, 5, *shape[1:]) and torch.isfinite(out).all()


@pytest.mark.parametrize("name,shape", [("small_frcnn", (1, 128, 128)), ("vgg16_frcnn", (3, 128, 128))])
def test_detector_training_step_with_padded_targets(name, shape):
    model = _model(name).train()
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(1))
    losses = model(x, _padded_targets())
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.backbone[0].weight.grad.abs().sum() > 0


def test_detector_needs_targets_in_training_and_valid_boxes():
    model = _model("small_frcnn").train()
    with pytest.raises(ValueError, match="needs targets"):
        model(torch.zeros(1, 1, 128, 128))
    bad = torch.tensor([[[1.0, 50, 10, 40, 30]]])  # x2 < x1
    with pytest.raises(ValueError, match=r"has no area"):
        model(torch.zeros(1, 1, 128, 128), bad)
    with pytest.raises(ValueError, match=r"must be \(B, M, 5\)"):
        model(torch.zeros(1, 1, 128, 128), torch.zeros(1, 4))


def test_detector_eval_and_flops():
    model = build_model("small_frcnn", num_classes=11).eval()
    with torch.no_grad():
        out = model(torch.zeros(2, *model.input_shape))
    assert len(out) == 2 and set(out[0]) == {"boxes", "labels", "scores"} and out[0]["boxes"].shape[1] == 4
    total = count_flops(model)
    backbone = count_flops(getattr(model, model.backbone_name), model.input_shape)
    assert 0 < backbone < total


# --- surgery: SegNet ----------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_segnet_pruned_equals_masked_every_unit(seed):
    model = _model("small_segnet", seed)
    gen = torch.Generator().manual_seed(100 + seed)
    units, keeps, masked, pruned, _ = _masked_and_pruned(model, gen)
    for u in units:
        assert all(pruned.get_submodule(c).out_channels == len(keeps[u.name]) for c in u.convs)
    x = torch.randn(2, 1, 128, 128, generator=gen)
    with torch.no_grad():
        ref, out = masked(x), pruned(x)
    assert (out - ref).abs().max() / ref.abs().max() < 1e-4


def test_segnet_coupling_is_needed_and_declared():
    model = _model("small_segnet")
    units = {u.name: u for u in describe_units(model)}
    # Every decoder conv whose output is unpooled with an encoder stage's indices follows it.
    assert units["encoder.0.1.conv"].convs == ("encoder.0.1.conv", "decoder.2.1.conv")
    assert units["encoder.1.1.conv"].convs == ("encoder.1.1.conv", "decoder.1.1.conv")
    assert units["encoder.1.1.conv"].bns == ("encoder.1.1.bn", "decoder.1.1.bn")
    assert units["encoder.2.1.conv"].convs == ("encoder.2.1.conv", "decoder.0.1.conv")
    assert units["encoder.3.1.conv"].convs == ("encoder.3.1.conv",)  # innermost: same tensor, no coupling
    assert not {"decoder.0.1.conv", "decoder.1.1.conv", "decoder.2.1.conv", "classifier"} & set(units)
    assert len(units) == 12  # 8 encoder + 7 decoder convs, 3 of them followers
    with pytest.raises(ValueError, match=r"keeps the filters of unit 'encoder.1.1.conv'"):
        prune_layer(model, "decoder.1.1.conv", [0])

    # Without the coupling: torch-pruning's own group for the leader leaves the decoder behind.
    alone = copy.deepcopy(model)
    graph = dependency_graph(alone)
    graph.get_pruning_group(alone.encoder[1][1].conv, tp.prune_conv_out_channels, idxs=[0, 5]).prune()
    assert alone.decoder[1][1].conv.out_channels == 16
    with pytest.raises(RuntimeError, match="Expected shape of indices"):
        alone(torch.randn(1, 1, 128, 128))

    prune_layer(model, "encoder.1.1.conv", [i for i in range(16) if i not in (0, 5)])
    assert model.encoder[1][1].conv.out_channels == model.decoder[1][1].conv.out_channels == 14
    assert model.decoder[2][0].conv.in_channels == 14
    assert model(torch.randn(1, 1, 128, 128)).shape == (1, 11, 128, 128)


def test_select_units_partitions_segnet():
    model = _model("small_segnet")
    units = describe_units(model)
    enc, dec = select_units(model, units, "encoder"), select_units(model, units, "decoder")
    assert select_units(model, units, "all") == units
    assert {u.name for u in enc} | {u.name for u in dec} == {u.name for u in units}
    assert not {u.name for u in enc} & {u.name for u in dec}
    assert all(u.name.startswith("encoder.") for u in enc) and all(u.name.startswith("decoder.") for u in dec)
    assert len(enc) == 8 and len(dec) == 4
    with pytest.raises(ValueError, match=r"^prune.units must be one of all, decoder, encoder for small_segnet, "
                                         r"but got 'x'$"):
        select_units(model, units, "x")


# --- surgery: Faster R-CNN ---------------------------------------------------------------


def test_detector_units_are_backbone_convs_and_last_reaches_the_heads():
    model = _model("small_frcnn")
    units = describe_units(model)
    backbone_convs = [f"backbone.{n}" for n, m in model.backbone.named_children() if isinstance(m, nn.Conv2d)]
    assert [u.name for u in units] == backbone_convs and all(u.convs == (u.name,) for u in units)
    assert select_units(model, units, "backbone") == units
    with pytest.raises(ValueError, match=r"one of all, backbone for small_frcnn, but got 'encoder'"):
        select_units(model, units, "encoder")

    last = units[-1]
    prune_layer(model, last.name, list(range(0, last.n_filters, 4)))
    k = len(range(0, last.n_filters, 4))
    assert model.rpn.head.conv[0][0].in_channels == k and model.rpn.head.conv[0][0].out_channels == 64
    assert model.roi_heads.box_head.fc6.in_features == k * 7 * 7
    assert model.rpn.head.cls_logits.out_channels == 9 and model.roi_heads.box_predictor.cls_score.out_features == 11


@pytest.mark.parametrize("seed", range(3))
def test_detector_pruned_equals_masked_every_unit(seed):
    model = _model("small_frcnn", seed)
    gen = torch.Generator().manual_seed(200 + seed)
    units, keeps, masked, pruned, _ = _masked_and_pruned(model, gen)
    x = torch.randn(2, 1, 128, 128, generator=gen)
    xy = torch.rand(5, 2, generator=gen) * 80
    boxes = torch.cat([xy, xy + 16 + torch.rand(5, 2, generator=gen) * 32], dim=1)  # (5, 4)
    with torch.no_grad():
        feats_ref, feats = masked.backbone(x), pruned.backbone(x)
        assert (feats - feats_ref[:, keeps[units[-1].name]]).abs().max() / feats_ref.abs().max() < 1e-4
        for ref, out in zip(masked.pruning_trace(x, boxes), pruned.pruning_trace(x, boxes), strict=True):
            assert out.shape == ref.shape
            assert (out - ref).abs().max() / ref.abs().max().clamp_min(1e-6) < 1e-4
        detections = pruned(x)
    assert len(detections) == 2 and all(d["boxes"].ndim == 2 and d["boxes"].shape[1] == 4 for d in detections)
    assert count_flops(pruned) < count_flops(model)


# --- VGG-16 versions ----------------------------------------------------------------------


def test_vgg16_unit_counts():
    det = _model("vgg16_frcnn")
    assert len(describe_units(det)) == 13
    seg = _model("vgg16_segnet")
    units = describe_units(seg)
    enc = select_units(seg, units, "encoder")
    # 13 encoder convs; 12 decoder convs (the classifier is the 13th), 4 following an encoder stage.
    assert len(enc) == 13 and len(units) == 13 + 12 - 4
    assert sum(len(u.convs) == 2 for u in enc) == 4


def test_vgg16_weights_load_by_index(tmp_path):
    from trainables.core.dense_models import _vgg16_backbone

    torch.manual_seed(3)
    features = _vgg16_backbone()
    path = tmp_path / "vgg16.pth"
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    det = build_model("vgg16_frcnn", num_classes=3, weights=str(path), representation_size=64)
    assert all(torch.equal(a, b) for a, b in zip(det.backbone.state_dict().values(),
                                                 features.state_dict().values(), strict=True))
    seg = build_model("vgg16_segnet", num_classes=3, weights=str(path))
    convs = [m for m in seg.encoder.modules() if isinstance(m, nn.Conv2d)]
    assert torch.equal(convs[-1].weight, features[28].weight) and torch.equal(convs[0].weight, features[0].weight)
    with pytest.raises(ValueError, match="not a torchvision VGG-16 state_dict"):
        torch.save({"x": torch.zeros(1)}, path)
        build_model("vgg16_segnet", weights=str(path))


@pytest.mark.slow
def test_vgg16_frcnn_full_size_eval_and_flops():
    model = build_model("vgg16_frcnn", num_classes=21).eval()
    with torch.no_grad():
        out = model(torch.zeros(1, *model.input_shape))
    assert out[0]["boxes"].shape[1] == 4 and model.roi_heads.box_head.fc6.in_features == 512 * 7 * 7
    assert count_flops(model.backbone, model.input_shape) < count_flops(model)


# --- FrozenBatchNorm2d ----------------------------------------------------------------------


def test_unfreeze_batchnorm_keeps_outputs_and_allows_pruning():
    import torchvision
    from torchvision.ops import FrozenBatchNorm2d

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = torchvision.models.resnet18(weights=None, norm_layer=FrozenBatchNorm2d, num_classes=10).eval()
    model.input_shape = (3, 64, 64)
    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            n = m.weight.numel()
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.copy_(torch.randn(n, generator=gen) * 0.1)
    x = torch.randn(2, 3, 64, 64, generator=gen)
    with torch.no_grad():
        before = model(x)
    with pytest.raises(ValueError, match=r"20 FrozenBatchNorm2d .*surgery.unfreeze_batchnorm\(model\)"):
        describe_units(model)

    assert unfreeze_batchnorm(model) == 20
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    with torch.no_grad():
        after = model(x)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)

    units = describe_units(model)
    unit = next(u for u in units if u.name == "layer2.0.conv2")  # a residual stream
    keep = _random_keep(unit.n_filters, gen)
    masked = copy.deepcopy(model)
    mask_filters(masked, unit, keep)
    prune_layer(model, unit.name, keep)
    with torch.no_grad():
        ref, out = masked(x), model(x)
    assert (out - ref).abs().max() / ref.abs().max() < 1e-4
