"""Detection and segmentation models (Mittal et al. 2019, "Recovering from Random Pruning"),
registered in the model registry with their pruning declarations.

- ``small_frcnn`` / ``vgg16_frcnn``: Faster R-CNN (Ren et al. 2015) from torchvision's building
  blocks, one feature level, no FPN. ``forward(images, targets=None)`` takes batched tensors:
  images (B, C, H, W), already normalised (no resize, no renormalisation: the images reach
  the backbone as they are); targets (B, M, 5), rows ``[label, x1, y1, x2, y2]`` in pixels,
  labels 1..K, padding rows all -1. Training mode returns torchvision's loss dict, eval mode
  its list of detections (``boxes``, ``labels``, ``scores`` per image).
- ``small_segnet`` / ``vgg16_segnet``: SegNet (Badrinarayanan et al. 2017): the encoder keeps
  its max-pooling indices and the decoder unpools with them; logits (B, num_classes, H, W).

``num_classes`` counts the background (class 0). Pruning declarations, read by
``trainables.core.surgery`` (plain data or methods, so models stay deep-copyable and picklable):
``pruning_trace`` (detector), ``pruning_ignored``, ``pruning_couplings`` (SegNet) and
``unit_parts``; see that module's docstring. torchvision is imported only when a detector is
built, so importing the registry stays cheap.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from torch import Tensor, nn

from trainables.core.model_registry import register_model

__all__ = ["FasterRCNNDetector", "SegNet", "padded_targets_to_dicts"]

# VGG-16's conv widths per stage (configuration D of Simonyan & Zisserman 2015).
_VGG16_STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


def padded_targets_to_dicts(targets: Tensor) -> list[dict[str, Tensor]]:
    """Padded targets (B, M, 5), rows ``[label, x1, y1, x2, y2]`` with -1 padding rows, as
    torchvision's list of ``{"boxes": (N, 4) float, "labels": (N,) int64}``, one per image
    (N = 0 for an image without objects)."""
    if targets.ndim != 3 or targets.shape[-1] != 5:
        raise ValueError(f"detection targets must be (B, M, 5) rows [label, x1, y1, x2, y2], "
                         f"but got shape {tuple(targets.shape)}")
    out = []
    for rows in targets:  # (M, 5)
        rows = rows[rows[:, 0] >= 0]  # padding rows have label -1
        boxes = rows[:, 1:].float()
        flat = (boxes[:, 2:] <= boxes[:, :2]).any(dim=1)
        if flat.any():
            raise ValueError(f"target box {boxes[flat][0].tolist()} has no area; boxes are [x1, y1, x2, y2] "
                             "in pixels with x1 < x2 and y1 < y2")
        out.append({"boxes": boxes, "labels": rows[:, 0].round().long()})
    return out


def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


def _small_backbone(in_channels: int, width: int) -> nn.Sequential:
    """Plain conv-BN-ReLU stack to output stride 8: w | w | 2w | 2w, 2w (receptive field 54 px,
    the size of the largest objects)."""
    w = width
    return nn.Sequential(
        *_conv_bn_relu(in_channels, w), nn.MaxPool2d(2),  # (B, w, H/2, W/2)
        *_conv_bn_relu(w, w), nn.MaxPool2d(2),  # (B, w, H/4, W/4)
        *_conv_bn_relu(w, 2 * w), nn.MaxPool2d(2),  # (B, 2w, H/8, W/8)
        *_conv_bn_relu(2 * w, 2 * w), *_conv_bn_relu(2 * w, 2 * w),
    )


def _vgg16_backbone() -> nn.Sequential:
    """VGG-16's convs up to conv5_3 and its ReLU, without the last max-pool (output stride 16),
    numbered as torchvision's ``vgg16().features`` so its weights load by index."""
    layers: list[nn.Module] = []
    c_in = 3
    for i, stage in enumerate(_VGG16_STAGES):
        if i:
            layers.append(nn.MaxPool2d(2))
        for c_out in stage:
            conv = nn.Conv2d(c_in, c_out, 3, padding=1)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
            layers += [conv, nn.ReLU(inplace=True)]
            c_in = c_out
    return nn.Sequential(*layers)


def _vgg16_state(path: str | Path) -> dict[str, Tensor]:
    """A torchvision VGG-16 state_dict (``features.N.*``, ``classifier.N.*``) read from ``path``."""
    try:
        state = torch.load(Path(path).expanduser(), map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as err:
        raise ValueError(f"weights {str(path)!r} is not a readable state_dict file ({err})") from None
    if not isinstance(state, dict) or "features.0.weight" not in state:
        raise ValueError(f"weights {str(path)!r} is not a torchvision VGG-16 state_dict (no 'features.0.weight'); "
                         "give the file of torchvision's vgg16 ImageNet weights, e.g. vgg16-397923af.pth")
    return state


@torch.no_grad()
def _load_vgg16_convs(convs: list[nn.Conv2d], state: dict[str, Tensor], path: str | Path) -> None:
    """Copy VGG-16's 13 conv weights and biases, in network order, into ``convs``."""
    keys = sorted({int(k.split(".")[1]) for k in state if k.startswith("features.") and k.endswith(".weight")})
    if len(keys) != len(convs):
        raise ValueError(f"weights {str(path)!r} hold {len(keys)} convs, but VGG-16 has {len(convs)}")
    for conv, k in zip(convs, keys, strict=True):
        conv.weight.copy_(state[f"features.{k}.weight"])
        if conv.bias is not None:
            conv.bias.copy_(state[f"features.{k}.bias"])


class FasterRCNNDetector(nn.Module):
    """Faster R-CNN on batched tensors, built from torchvision's RPN and RoI heads.

    Children: ``backbone`` (a conv stack returning one feature map), ``rpn`` (anchors, RPN head,
    proposal selection) and ``roi_heads`` (RoIAlign 7x7, ``box_head.fc6``/``fc7``, box
    predictor). Unlike torchvision's ``FasterRCNN`` there is no transform: images are neither
    resized nor renormalised, and the boxes come back in input pixels.

    Pruning: only backbone convs are units; the last one's filters are the input channels of
    ``rpn.head.conv`` and, through RoIAlign and the flatten, of ``roi_heads.box_head.fc6``.
    torchvision detaches the proposals, so the eval forward never reaches the RPN head in
    autograd; ``pruning_trace`` is the path torch-pruning traces instead.
    """

    def __init__(self, backbone: nn.Module, out_channels: int, num_classes: int, *,
                 anchor_sizes: tuple[int, ...], aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0),
                 representation_size: int = 1024, rpn_top_n_train: tuple[int, int] = (2000, 2000),
                 rpn_top_n_test: tuple[int, int] = (1000, 1000), rpn_batch_size_per_image: int = 256,
                 box_batch_size_per_image: int = 512, detections_per_img: int = 100):
        super().__init__()
        from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
        from torchvision.models.detection.roi_heads import RoIHeads
        from torchvision.models.detection.rpn import AnchorGenerator, RegionProposalNetwork, RPNHead
        from torchvision.ops import MultiScaleRoIAlign

        if num_classes < 2:
            raise ValueError(f"num_classes counts the background, so a detector needs at least 2, but got {num_classes}")
        anchors = AnchorGenerator(sizes=(tuple(anchor_sizes),), aspect_ratios=(tuple(aspect_ratios),))
        self.backbone = backbone
        # Defaults below are torchvision's FasterRCNN ones (Ren et al.'s IoU thresholds).
        self.rpn = RegionProposalNetwork(
            anchors, RPNHead(out_channels, anchors.num_anchors_per_location()[0]),
            fg_iou_thresh=0.7, bg_iou_thresh=0.3, batch_size_per_image=rpn_batch_size_per_image,
            positive_fraction=0.5,
            pre_nms_top_n={"training": rpn_top_n_train[0], "testing": rpn_top_n_test[0]},
            post_nms_top_n={"training": rpn_top_n_train[1], "testing": rpn_top_n_test[1]},
            nms_thresh=0.7,
        )
        pool = MultiScaleRoIAlign(["0"], output_size=7, sampling_ratio=2)
        self.roi_heads = RoIHeads(
            pool, TwoMLPHead(out_channels * 7 * 7, representation_size),
            FastRCNNPredictor(representation_size, num_classes),
            fg_iou_thresh=0.5, bg_iou_thresh=0.5, batch_size_per_image=box_batch_size_per_image,
            positive_fraction=0.25, bbox_reg_weights=None, score_thresh=0.05, nms_thresh=0.5,
            detections_per_img=detections_per_img,
        )
        self.backbone_name = "backbone"  # what latency and FLOP reports time alone
        # Read by trainables.core.surgery: the heads keep their outputs; units are backbone convs.
        self.pruning_ignored = ("rpn", "roi_heads")
        self.unit_parts = {"backbone": "backbone"}

    def forward(self, images: Tensor, targets: Tensor | None = None):
        """Losses (training mode, ``targets`` required) or detections (eval mode).

        images: (B, C, H, W); targets: (B, M, 5) rows ``[label, x1, y1, x2, y2]``, -1 rows pad.
        """
        from torchvision.models.detection.image_list import ImageList

        if self.training and targets is None:
            raise ValueError("a detector in training mode needs targets (B, M, 5) to compute its losses; "
                             "call model.eval() to detect")
        sizes = [(int(images.shape[-2]), int(images.shape[-1]))] * images.shape[0]
        batch = ImageList(images, sizes)
        boxes = padded_targets_to_dicts(targets) if self.training else None
        features = OrderedDict([("0", self.backbone(images))])  # (B, C', H/s, W/s)
        proposals, rpn_losses = self.rpn(batch, features, boxes)
        detections, box_losses = self.roi_heads(features, proposals, sizes, boxes)
        return {**rpn_losses, **box_losses} if self.training else detections

    def pruning_trace(self, images: Tensor, boxes: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Every prunable path of the detector, without proposal selection or NMS (so nothing is
        detached): backbone -> RPN head, and backbone -> RoIAlign on fixed ``boxes`` (N, 4) in
        pixels (by default the central half and the whole image) -> box head -> predictor.

        Returns (objectness (B, A, h, w), RPN deltas (B, 4A, h, w), class logits (B*N, K),
        box deltas (B*N, 4K)): what surgery traces and what the pruned == masked tests compare.
        """
        h, w = images.shape[-2:]
        if boxes is None:
            boxes = torch.tensor([[w / 4, h / 4, 3 * w / 4, 3 * h / 4], [0, 0, w, h]],
                                 device=images.device, dtype=images.dtype)
        features = self.backbone(images)  # (B, C', H/s, W/s)
        objectness, deltas = self.rpn.head([features])
        pooled = self.roi_heads.box_roi_pool({"0": features}, [boxes] * images.shape[0],
                                             [(int(h), int(w))] * images.shape[0])  # (B*N, C', 7, 7)
        logits, box_deltas = self.roi_heads.box_predictor(self.roi_heads.box_head(pooled))
        return objectness[0], deltas[0], logits, box_deltas


@register_model("small_frcnn", input_shape=(1, 128, 128), head=None, task="detection")
def _small_frcnn(num_classes: int = 11, width: int = 32, in_channels: int = 1) -> nn.Module:
    """Small Faster R-CNN for 128x128 grey scenes with 24-48 px objects (embedded scenes):
    5-conv backbone to stride 8, anchors of 16/32/48 px, a 128-wide box head, and 300/100
    proposals before/after NMS at test time so a CPU eval stays quick."""
    return FasterRCNNDetector(
        _small_backbone(in_channels, width), 2 * width, num_classes, anchor_sizes=(16, 32, 48),
        representation_size=128, rpn_top_n_train=(600, 300), rpn_top_n_test=(300, 100),
        rpn_batch_size_per_image=128, box_batch_size_per_image=128, detections_per_img=50,
    )


@register_model("vgg16_frcnn", input_shape=(3, 512, 512), head=None, task="detection")
def _vgg16_frcnn(num_classes: int = 21, weights: str | None = None, representation_size: int = 4096) -> nn.Module:
    """Faster R-CNN with VGG-16 up to conv5_3 (Ren et al. 2015): anchors 128/256/512 px,
    fc6/fc7 of 4096, 6000/300 proposals at test time. ``weights``: a torchvision VGG-16 ImageNet
    state_dict file (e.g. vgg16-397923af.pth) for the convs, and fc6/fc7 when 4096 wide."""
    model = FasterRCNNDetector(
        _vgg16_backbone(), 512, num_classes, anchor_sizes=(128, 256, 512),
        representation_size=representation_size, rpn_top_n_train=(12000, 2000), rpn_top_n_test=(6000, 300),
    )
    if weights is not None:
        state = _vgg16_state(weights)
        _load_vgg16_convs([m for m in model.backbone if isinstance(m, nn.Conv2d)], state, weights)
        head = model.roi_heads.box_head
        fc6 = state.get("classifier.0.weight")
        if fc6 is not None and tuple(fc6.shape) == tuple(head.fc6.weight.shape):
            with torch.no_grad():
                for fc, k in ((head.fc6, 0), (head.fc7, 3)):
                    fc.weight.copy_(state[f"classifier.{k}.weight"])
                    fc.bias.copy_(state[f"classifier.{k}.bias"])
    return model


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(OrderedDict(conv=nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                                     bn=nn.BatchNorm2d(c_out), relu=nn.ReLU(inplace=True)))


class SegNet(nn.Module):
    """SegNet (Badrinarayanan et al. 2017): a conv-BN-ReLU encoder that max-pools with indices,
    and a mirrored decoder that unpools with those indices before its convs.

    ``encoder.i`` is stage i (``encoder.i.j.conv``/``.bn``); ``decoder.j`` runs j-th, mirroring
    encoder stage n-1-j: it unpools with that stage's indices, keeps its width, and its last conv
    narrows to the width of the stage before (whose indices unpool next). The last decoder
    stage has one conv fewer: its place is taken by ``classifier``, a 3x3 conv to
    ``num_classes`` (as the reference Caffe model's conv1_1_D), never pruned.

    Coupling: the decoder conv whose output is unpooled with encoder stage s's indices must keep
    the same filters as that stage's last conv (channel c is unpooled with the positions of
    encoder channel c); torch-pruning cannot see this (the indices carry no gradient), so it is
    declared in ``pruning_couplings``. The innermost stage needs none: the first decoder stage
    unpools the encoder's own pooled output.
    """

    def __init__(self, num_classes: int, widths: tuple[int, ...], depths: tuple[int, ...], in_channels: int = 1):
        super().__init__()
        if len(widths) != len(depths) or not widths or min(depths) < 1:
            raise ValueError(f"SegNet needs one width and one depth (>= 1) per stage, but got widths={widths}, "
                             f"depths={depths}")
        n = len(widths)
        stages, c_in = [], in_channels
        for w, d in zip(widths, depths, strict=True):
            stages.append(nn.Sequential(*(_block(c_in if j == 0 else w, w) for j in range(d))))
            c_in = w
        self.encoder = nn.ModuleList(stages)
        stages = []
        for s in reversed(range(n)):
            w, d = widths[s], depths[s]
            outs = [w] * (d - 1) + ([widths[s - 1]] if s else [])  # stage 0: the classifier is its last conv
            stages.append(nn.Sequential(*(_block(w, c) for c in outs)))
        self.decoder = nn.ModuleList(stages)
        self.classifier = nn.Conv2d(widths[0], num_classes, 3, padding=1)
        self.pool = nn.MaxPool2d(2, 2, return_indices=True)
        self.unpool = nn.MaxUnpool2d(2, 2)
        # Read by trainables.core.surgery.
        self.pruning_ignored = ("classifier",)
        self.unit_parts = {"encoder": "encoder", "decoder": "decoder"}
        # Decoder stage j's output is unpooled with encoder stage n-2-j's indices.
        self.pruning_couplings = {
            f"encoder.{n - 2 - j}.{depths[n - 2 - j] - 1}.conv": (f"decoder.{j}.{depths[n - 1 - j] - 1}.conv",)
            for j in range(n - 1)
        }

    def forward(self, x: Tensor) -> Tensor:
        sizes, indices = [], []
        for stage in self.encoder:
            x = stage(x)
            sizes.append(x.shape[-2:])
            x, idx = self.pool(x)  # (B, w, H/2, W/2), floor for odd sizes
            indices.append(idx)
        for j, stage in enumerate(self.decoder):
            s = len(self.encoder) - 1 - j
            x = stage(self.unpool(x, indices[s], output_size=sizes[s]))
        return self.classifier(x)  # (B, num_classes, H, W)


@register_model("small_segnet", input_shape=(1, 128, 128), head=None, task="segmentation")
def _small_segnet(num_classes: int = 11, width: int = 8, in_channels: int = 1) -> nn.Module:
    """Small SegNet for 128x128 grey scenes: 4 stages of w/2w/4w/8w, 2 convs each. Four
    stages, not three: naming a 48 px item's class needs a receptive field wider than the item
    (three stages segmented foreground from background at 98% but named the class of 10% of
    the foreground pixels after 2 epochs); the fourth stage runs at 16x16 and costs little."""
    return SegNet(num_classes, (width, 2 * width, 4 * width, 8 * width), (2, 2, 2, 2), in_channels)


@register_model("vgg16_segnet", input_shape=(3, 360, 480), head=None, task="segmentation")
def _vgg16_segnet(num_classes: int = 12, weights: str | None = None) -> nn.Module:
    """SegNet with VGG-16's 13 convs (with BN) as the encoder (CamVid size, 360x480).
    ``weights``: a torchvision VGG-16 ImageNet state_dict file for the encoder convs."""
    model = SegNet(num_classes, tuple(s[0] for s in _VGG16_STAGES), tuple(len(s) for s in _VGG16_STAGES), 3)
    if weights is not None:  # VGG-16's conv biases are left out: ours feed a BN and have none
        convs = [m for m in model.encoder.modules() if isinstance(m, nn.Conv2d)]
        _load_vgg16_convs(convs, _vgg16_state(weights), weights)
    return model
