"""Registry of model builders.

Every builder returns an ``nn.Module`` with an ``input_shape`` attribute ``(C, H, W)``
so that graph tracing (torch-pruning), FLOP counting and latency measurement know the
input size without being told, a ``head_name`` attribute naming its output ``nn.Linear``
(what ``cut_head`` cuts; None for detectors and segmenters, which have none) and a ``task``
attribute (``classification``, ``detection`` or ``segmentation``). ``num_classes`` sets the
width of the output layer. The dense-prediction builders live in ``trainables.core.dense_models``
and are registered when the ``trainables`` package is imported (which any import of this module does first).

Models from outside the project come through *sources* beside the registry, by qualified name:
``torchvision:<name>`` (any torchvision classification model), ``timm:<name>`` (any timm model;
the optional ``timm`` extra) and ``custom:<module>:<callable>`` (a user's factory returning an
``nn.Module``). ``MODELS.get`` and ``build_model`` answer them with the same kind of builder as a
registered name, stamped the same way, so the protocol, the cache, the search and Ray workers
see no difference; ``qualified_model_name`` turns a config's ``model.source`` / ``model.name`` /
``model.factory`` into such a name and ``check_model_fits`` probes one against the data.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from data import import_factory, takes_keyword
from trainables.core.model_registry import MODELS, register_model
from trainables.core.sources import MODEL_SOURCES, check_input_shape, qualified_model_name, require

__all__ = [
    "MODELS", "MODEL_SOURCES", "build_model", "check_input_shape", "check_model_fits", "cut_head", "head_of", "input_shape_of", "list_models",
    "qualified_model_name", "register_model",
]

def build_model(name: str, num_classes: int = 10, **kwargs) -> nn.Module:
    """Build the registered model ``name`` with a ``num_classes``-way head."""
    return MODELS.get(name)(num_classes=num_classes, **kwargs)


def list_models() -> list[str]:
    return MODELS.names()


def input_shape_of(model: nn.Module) -> tuple[int, int, int]:
    """The ``(C, H, W)`` input of ``model``: its ``input_shape`` stamp, else 224x224 images.

    Models from this registry carry the stamp; for an outside torchvision model we assume
    ImageNet-size input with the first conv's channel count.
    """
    shape = getattr(model, "input_shape", None)
    if shape is not None:
        return tuple(shape)
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first is None:
        raise ValueError("model has no Conv2d and no `input_shape` attribute; set model.input_shape = (C, H, W)")
    return (first.in_channels, 224, 224)


def head_of(model: nn.Module) -> tuple[str, nn.Linear]:
    """The output layer of ``model``: its ``head_name`` stamp, else its last ``nn.Linear``."""
    task = getattr(model, "task", "classification")
    if task != "classification":
        raise ValueError(f"a {task} model ({getattr(model, 'model_name', type(model).__name__)}) has no "
                         "nn.Linear classifier head to cut; class subsets apply to classification models only")
    name = getattr(model, "head_name", None)
    if name is None:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError("model has no nn.Linear head and no `head_name` attribute; set model.head_name")
        name = linears[-1]
    head = model.get_submodule(name)
    if not isinstance(head, nn.Linear):
        raise ValueError(f"the head {name!r} of the model is a {type(head).__name__}, not an nn.Linear")
    return name, head


@torch.no_grad()
def cut_head(model: nn.Module, class_ids: list[int]) -> nn.Module:
    """Cut the output layer of ``model`` in place to the rows ``class_ids``; returns ``model``.

    Output ``j`` of the cut model is output ``class_ids[j]`` of the original one, bit for bit
    (the same rows of weight and bias), so labels remapped 0..k-1 in the order of
    ``class_ids`` (``data.get_data(classes=..., remap_labels=True)``) match it. The head
    becomes a new, smaller ``nn.Linear``: FLOPs and params count only the kept rows. The
    caller's weights are copied, never shared, so a cached base model stays as it was.
    """
    name, head = head_of(model)
    ids = list(class_ids)
    if not ids or len(set(ids)) != len(ids) or not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < head.out_features for i in ids):
        raise ValueError(f"class_ids must be distinct ids in [0, {head.out_features}) of the head {name!r}, "
                         f"but got {ids!r}")
    rows = torch.tensor(ids, dtype=torch.long, device=head.weight.device)
    cut = nn.Linear(head.in_features, len(ids), bias=head.bias is not None,
                    device=head.weight.device, dtype=head.weight.dtype)
    cut.weight.copy_(head.weight[rows])  # (k, in_features)
    if head.bias is not None:
        cut.bias.copy_(head.bias[rows])
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, cut)
    return model


def _conv_bn(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    """VGG-style CNN for 28x28 grey images (the embedded Fashion-MNIST default).

    Five 3x3 conv+BN+ReLU layers in three stages (w | 2w, 2w | 4w, 4w; w=16 gives about
    11 MFLOPs per image), max-pooling after each stage, then a flatten straight into the
    linear head, so that pruning the last conv also shrinks the head's input (the flatten
    coupling torch-pruning must follow). Pooling early keeps a CPU epoch short.
    """

    def __init__(self, num_classes: int = 10, width: int = 16, in_channels: int = 1):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            *_conv_bn(in_channels, w), nn.MaxPool2d(2),  # (B, w, 14, 14)
            *_conv_bn(w, 2 * w), *_conv_bn(2 * w, 2 * w), nn.MaxPool2d(2),  # (B, 2w, 7, 7)
            *_conv_bn(2 * w, 4 * w), *_conv_bn(4 * w, 4 * w), nn.MaxPool2d(2),  # (B, 4w, 3, 3)
        )
        self.dropout = nn.Dropout(0.2)
        self.classifier = nn.Linear(4 * w * 3 * 3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.features(x), 1)
        return self.classifier(self.dropout(x))


@register_model("small_cnn", input_shape=(1, 28, 28))
def _small_cnn(num_classes: int = 10, width: int = 16) -> nn.Module:
    """Small VGG-style CNN for 28x28 inputs (Fashion-MNIST default)."""
    return SmallCNN(num_classes=num_classes, width=width)


def _vgg_cifar_features(cfg: list, batch_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    c_in = 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers.append(nn.Conv2d(c_in, v, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(v))
            layers.append(nn.ReLU(inplace=True))
            c_in = v
    return nn.Sequential(*layers)


_VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class VGGCifar(nn.Module):
    """VGG-16 with BN for 32x32 inputs, single linear head (as in Li et al. 2017's CIFAR VGG)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = _vgg_cifar_features(_VGG16_CFG, batch_norm=True)  # (B, 512, 1, 1)
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


@register_model("vgg16_bn_cifar", input_shape=(3, 32, 32))
def _vgg16_bn_cifar(num_classes: int = 10) -> nn.Module:
    """VGG-16-BN for CIFAR-size (32x32) images."""
    return VGGCifar(num_classes)


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            # Option-B (1x1 conv) shortcut: the zero-padding option-A shortcut of He et al.
            # has no module torch-pruning could follow, so a pruned stage would break it.
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNetCifar(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs (He et al. 2016, CIFAR variant), stages of 16/32/64."""

    def __init__(self, depth: int = 56, num_classes: int = 10):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"resnet_cifar depth={depth} is not 6n+2 (e.g. 20, 32, 56, 110)")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        stages, c_in = [], 16
        for c_out, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(_BasicBlock(c_in, c_out, stride if i == 0 else 1))
                c_in = c_out
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))  # (B, 16, 32, 32)
        x = self.layer3(self.layer2(self.layer1(x)))  # (B, 64, 8, 8)
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register_model("resnet56_cifar", input_shape=(3, 32, 32), head="fc")
def _resnet56_cifar(num_classes: int = 10) -> nn.Module:
    """ResNet-56 for CIFAR-size images (option-B shortcuts)."""
    return ResNetCifar(56, num_classes)


@register_model("resnet20_cifar", input_shape=(3, 32, 32), head="fc")
def _resnet20_cifar(num_classes: int = 10) -> nn.Module:
    """ResNet-20 for CIFAR-size images (a quick residual model for tests)."""
    return ResNetCifar(20, num_classes)


def _torchvision(name: str):
    def builder(num_classes: int = 1000, weights: str | None = None) -> nn.Module:
        import torchvision

        # weights=None never downloads; a named weight set is fetched by torchvision only if
        # it is absent from the local cache (TORCH_HOME), which tests never ask for.
        return torchvision.models.get_model(name, weights=weights, num_classes=num_classes)

    builder.__doc__ = f"torchvision {name} (ImageNet size, 224x224)."
    return builder


# The output layers of torchvision's classifiers (VGG/AlexNet: the last of `classifier`).
_TORCHVISION_HEADS = {"vgg16": "classifier.6", "vgg16_bn": "classifier.6", "resnet18": "fc", "resnet50": "fc",
                      "alexnet": "classifier.6"}
for _name, _head in _TORCHVISION_HEADS.items():
    register_model(_name, input_shape=(3, 224, 224), head=_head)(_torchvision(_name))


class SmallAlexNet(nn.Module):
    """AlexNet-style CNN for 28x28 colour images (Coloured Fashion-MNIST, the colour study).

    Like AlexNet (Krizhevsky et al. 2012): a large-kernel strided first conv, then 3x3 convs,
    ReLU without batch norm (so a filter's weights are its own, and l1 means what it says), max
    pooling, and a dropout MLP head. 64 first-layer 5x5 filters: enough to count colour filters
    among them. About 20 MFLOPs per image, short enough to train on a CPU in minutes.
    """

    def __init__(self, num_classes: int = 10, width: int = 64, in_channels: int = 3):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 5, stride=2, padding=2), nn.ReLU(inplace=True),  # (B, w, 14, 14)
            nn.MaxPool2d(2),  # (B, w, 7, 7)
            nn.Conv2d(w, 3 * w // 2, 3, padding=1), nn.ReLU(inplace=True),  # (B, 1.5w, 7, 7)
            nn.Conv2d(3 * w // 2, 3 * w // 2, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(3 * w // 2, w, 3, padding=1), nn.ReLU(inplace=True),  # (B, w, 7, 7)
            nn.MaxPool2d(2),  # (B, w, 3, 3)
        )
        self.fc = nn.Sequential(nn.Dropout(0.3), nn.Linear(w * 3 * 3, 4 * w), nn.ReLU(inplace=True), nn.Dropout(0.3))
        self.classifier = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.features(x), 1)  # (B, 9w)
        return self.classifier(self.fc(x))


@register_model("small_alexnet", input_shape=(3, 28, 28))
def _small_alexnet(num_classes: int = 10, width: int = 64) -> nn.Module:
    """Small AlexNet-style CNN for 28x28 colour inputs (Coloured Fashion-MNIST)."""
    return SmallAlexNet(num_classes=num_classes, width=width)



# ---------------------------------------------------------------- models from outside the project

# Most outside classifiers are ImageNet models; the data's shape replaces this once it is known.
_IMAGENET_SHAPE = (3, 224, 224)
# Both train with auxiliary heads by default and then return a tuple in training mode, which
# no loss of this project reads; the main head alone is what gets pruned and deployed.
_AUX_LOGITS = ("googlenet", "inception_v3")


def _close(wrong: str, names: Sequence[str]) -> str:
    close = difflib.get_close_matches(wrong, names, n=3, cutoff=0.6)
    return f"did you mean {', '.join(close)}?" if close else ""


def _source_builder(qualified: str, source: str, make: Callable[[int, dict], Any],
                    input_shape: tuple[int, int, int] | None) -> Callable[..., nn.Module]:
    """A builder like ``register_model``'s: ``build(num_classes, **kwargs)`` returns the model
    stamped with ``input_shape``, ``head_name``, ``task`` and ``model_name``."""

    def build(num_classes: int = 10, **kwargs) -> nn.Module:
        if "num_classes" in kwargs:
            raise ValueError(f"model.kwargs.num_classes must be left out (the data sets the head's width), "
                             f"but got {kwargs['num_classes']!r}")
        model = make(num_classes, dict(kwargs))
        if not isinstance(model, nn.Module):
            key = "model.factory" if source == "custom" else "model.name"
            raise ValueError(f"{key}={qualified.partition(':')[2]} must return an nn.Module, but it returned a "
                             f"{type(model).__name__}")
        _stamp(model, qualified, num_classes, input_shape)
        return model

    build.__doc__ = f"{qualified}: a {source} model (input shape from the data or model.input_shape)."
    build.input_shape = input_shape
    build.task = "classification"
    build.source = source
    return build


def _stamp(model: nn.Module, qualified: str, num_classes: int, input_shape: tuple[int, int, int] | None) -> None:
    """What the registry's builders stamp, found on an outside model: its head is the last
    ``nn.Linear`` that is ``num_classes`` wide (None when the output layer is a conv, as in
    SqueezeNet); its input shape is its own stamp, the source's, or the first conv's channels
    at 224x224 (the data's shape replaces it in ``prepare`` and in every trial)."""
    if getattr(model, "head_name", None) is None:
        heads = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]
        model.head_name = heads[-1] if heads else None
    if getattr(model, "input_shape", None) is None:
        first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        if input_shape is not None:
            model.input_shape = tuple(input_shape)
        elif first is not None:
            model.input_shape = (first.in_channels, 224, 224)
    model.task = "classification"
    model.model_name = qualified


def _resolve_torchvision(name: str) -> Callable[..., nn.Module]:
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)  # classification models only
    if name not in names:
        listed = _close(name, names) or f"valid: {', '.join(names)}"
        raise ValueError("model.name must be a torchvision classification model (torchvision.models.list_models("
                         f"module=torchvision.models)), but got {name!r}; {listed}")

    def make(num_classes: int, kwargs: dict) -> nn.Module:
        if name in _AUX_LOGITS:
            kwargs.setdefault("aux_logits", False)
        # weights=None (the default) never downloads; kwargs.weights=DEFAULT reads torchvision's
        # weights from the local torch cache (TORCH_HOME) and needs the 1000-class head.
        return torchvision.models.get_model(name, num_classes=num_classes, **kwargs)

    return _source_builder(f"torchvision:{name}", "torchvision", make, _IMAGENET_SHAPE)


def _resolve_timm(name: str) -> Callable[..., nn.Module]:
    try:
        import timm
    except ImportError:
        raise ValueError(f"model=timm needs the timm package (pip install -e '.[timm]'), but it is not installed "
                         f"(model.name={name!r})") from None
    if not timm.is_model(name):
        names = timm.list_models()
        listed = _close(name, names) or "see timm.list_models()"
        raise ValueError(f"model.name must be a timm model (one of timm.list_models()'s {len(names)}), but got "
                         f"{name!r}; {listed}")

    def make(num_classes: int, kwargs: dict) -> nn.Module:
        # Random initialisation never touches the network; hub weights come as model.weights=<file>.
        model = timm.create_model(name, **{"pretrained": False, **kwargs, "num_classes": num_classes})
        size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
        first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        if size is not None and first is not None:
            model.input_shape = (first.in_channels, *tuple(size)[1:])
        return model

    return _source_builder(f"timm:{name}", "timm", make, _IMAGENET_SHAPE)


def _resolve_custom(spec: str) -> Callable[..., nn.Module]:
    factory = import_factory(spec, "model.factory")
    takes_classes = takes_keyword(factory, "num_classes")

    def make(num_classes: int, kwargs: dict) -> nn.Module:
        # A factory without num_classes must already be as wide as the data: check_model_fits probes it.
        return factory(**kwargs, **({"num_classes": num_classes} if takes_classes else {}))

    shape = getattr(factory, "input_shape", None)
    return _source_builder(f"custom:{spec}", "custom", make, tuple(shape) if shape is not None else None)


MODELS.add_source("torchvision", _resolve_torchvision)
MODELS.add_source("timm", _resolve_timm)
MODELS.add_source("custom", _resolve_custom)


def check_model_fits(name: str, kwargs: dict, data_shape: Sequence[int], num_classes: int, *,
                     data_name: str, declared: Sequence[int] | None = None) -> None:
    """Refuse, before any training, a model that does not take the data's images.

    A registered model must take the data's channel count (its size follows the data). A
    declared ``model.input_shape`` must be the data's (C, H, W). A model from a source is then
    built once (seeded, on the CPU) and run on two blank images of the data's shape: it must
    answer with ``(2, num_classes)`` logits. Every refusal is one line naming the key.
    """
    data_shape = tuple(int(v) for v in data_shape)
    builder = MODELS.get(name)
    if declared is not None:
        shape = check_input_shape(list(declared))
        if shape != data_shape:
            fix = "the channels differ" if shape[0] != data_shape[0] else "the image sizes differ: set data.size"
            raise ValueError(f"model.input_shape must be the (C, H, W) of data.name={data_name}'s images, "
                             f"{list(data_shape)} ({fix}), but got {list(shape)}")
    if getattr(builder, "source", None) is None:
        registered = builder.input_shape
        if registered[0] != data_shape[0]:
            raise ValueError(f"model.name={name} takes {registered[0]}-channel images but data.name={data_name} "
                             f"has {data_shape[0]} channels; pick a model and a data set that agree")
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = builder(num_classes=num_classes, **kwargs).eval()
    key = "model.factory" if builder.source == "custom" else "model.name"
    what = name.partition(":")[2]
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *data_shape))  # (2, C, H, W) -> (2, num_classes)
    except Exception as err:  # whatever the model's forward raises, the cause is the input it got
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"{key}={what} must take data.name={data_name}'s images {list(data_shape)} (C, H, W), "
                         f"but its forward pass failed: {type(err).__name__}: {reason} (set data.size, or "
                         "model.kwargs for the model's input channels)") from None
    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    require(shape == (2, num_classes), f"{key}={what}'s output for 2 images",
             f"(2, {num_classes}) logits for the {num_classes} classes of data.name={data_name}"
             + (" (let the factory take num_classes)" if builder.source == "custom" else ""), shape)


# The dense-prediction builders register themselves into MODELS; importing them here keeps the
# registry whole for whoever imports this module (trainables/__init__ no longer imports eagerly).
from trainables.core import dense_models  # noqa: E402,F401
