"""Coverage of the model zoo: which units each CNN family offers, and whether they prune exactly.

For every torchvision classification family (its smallest member) and a sample of timm CNN
families: units found, convs reached by a unit / all convs, units refused, whether pruning
half the filters of the first, middle and last unit gives exactly what the original model
computes with those filters ignored downstream (``reference``), and the time to describe
the units and to prune the sample. Random weights, randomised BN statistics, small input.

    OMP_NUM_THREADS=1 python bench/zoo_coverage.py [--timm] [--only NAME ...]

``tests/test_zoo.py`` uses the same families, builders and reference.
"""

from __future__ import annotations

import argparse
import copy
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from trainables.core.surgery import (  # _units_from_graph: the reasons for every refused unit at once
    Unit,
    _units_from_graph,
    dependency_graph,
    describe_units,
    prune_layer,
    pruning_groups,
    round_to_groups,
)

# The smallest member (by parameters) of every torchvision classification family.
SMALLEST = {
    "alexnet": "alexnet", "convnext": "convnext_tiny", "densenet": "densenet121",
    "efficientnet": "efficientnet_b0", "efficientnet_v2": "efficientnet_v2_s", "googlenet": "googlenet",
    "inception_v3": "inception_v3", "maxvit": "maxvit_t", "mnasnet": "mnasnet0_5",
    "mobilenet_v2": "mobilenet_v2", "mobilenet_v3": "mobilenet_v3_small", "regnet_x": "regnet_x_400mf",
    "regnet_y": "regnet_y_400mf", "resnet": "resnet18", "resnext": "resnext50_32x4d",
    "shufflenet_v2": "shufflenet_v2_x0_5", "squeezenet": "squeezenet1_1", "swin": "swin_t",
    "swin_v2": "swin_v2_t", "vgg": "vgg11", "vit": "vit_b_16", "wide_resnet": "wide_resnet50_2",
}
TRANSFORMERS = {"maxvit", "swin", "swin_v2", "vit"}
# Units a CNN family refuses (by name, with the reason's start); every other conv is reached.
CNN_REFUSED = {
    "squeezenet": {"classifier.1": "unit 'classifier.1' makes channels of the model's output"},
    "shufflenet_v2": {"stage2.0.branch1.2": "unit 'stage2.0.branch1.2' passes through a view that reorders channels"},
}
# A small member of each timm CNN family the issue names (family -> timm model name).
TIMM_SAMPLE = {
    "ResNet-D": "resnet18d", "EfficientNet": "efficientnet_b0", "RegNetX": "regnetx_002",
    "RegNetY": "regnety_002", "ConvNeXt": "convnext_atto", "MobileNetV3": "mobilenetv3_small_050",
    "DenseNet": "densenet121", "CSPNet": "cspresnet50", "CSP-DarkNet": "cs3darknet_s", "DarkNet": "darknet17",
    "RepVGG": "repvgg_a0",
}
SIZES = {"inception_v3": 80, "maxvit_t": 224, "swin_t": 224, "swin_v2_t": 256, "vit_b_16": 224}  # else 64x64
_SIZE_WORDS = {"small", "large", "tiny", "base", "bn", "t", "s", "m", "b", "l", "h"}


def family(name: str) -> str:
    """torchvision's model name without its size: ``regnet_x_400mf`` -> ``regnet_x``,
    ``shufflenet_v2_x0_5`` -> ``shufflenet_v2``, ``vgg11_bn`` -> ``vgg``."""
    kept: list[str] = []
    for token in name.split("_"):
        if token in _SIZE_WORDS or re.fullmatch(r"[a-uw-z]?\d.*", token):
            break  # a size (b0, x0, 400mf, 32x4d, 2) ends the family; a version (v2) does not
        kept.append(token)
    if not re.fullmatch(r"v\d+", kept[-1]):
        kept[-1] = re.sub(r"\d+$", "", kept[-1])  # resnet18 -> resnet
    return "_".join(kept)


def randomise_bn(model: nn.Module, seed: int) -> None:
    """Non-trivial BN statistics and affine values, so that a missed BN channel shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.1)


def build(name: str, seed: int = 0) -> nn.Module:
    """torchvision's ``name`` with random weights (10 classes), randomised BN statistics, in
    eval mode, stamped with a small input shape."""
    torch.manual_seed(seed)
    # Inception's and GoogLeNet's own init draws from scipy's truncated normal: slow and not needed.
    extra = {"aux_logits": False, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
    model = torchvision.models.get_model(name, weights=None, num_classes=10, **extra)
    randomise_bn(model, seed + 1)
    size = SIZES.get(name, 64)
    model.input_shape = (3, size, size)
    return model.eval()


def build_timm(name: str, seed: int = 0) -> nn.Module:
    """timm's ``name`` as ``build`` makes torchvision's (timm imported only here)."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=10)
    randomise_bn(model, seed + 1)
    model.input_shape = (3, 64, 64)
    return model.eval()


def sample(units: list[Unit]) -> list[Unit]:
    """The first, middle and last unit: input side, inner, output side."""
    picked = [units[0], units[len(units) // 2], units[-1]]
    return list({u.name: u for u in picked}.values())


def half(unit: Unit, gen: torch.Generator) -> list[int]:
    """A random half of the unit's filters, rounded to its channel groups."""
    keep = torch.randperm(unit.n_filters, generator=gen)[: max(1, unit.n_filters // 2)].tolist()
    return round_to_groups(unit, keep)


def _channel_dim(module: nn.Module) -> int:
    # Linear and channels-last LayerNorm (ConvNeXt's blocks) hold channels last; LayerNorm2d
    # (torchvision's and timm's) permutes inside, so its input and output are (B, C, H, W).
    channels_last = isinstance(module, (nn.Linear, nn.LayerNorm)) and type(module).__name__ != "LayerNorm2d"
    return -1 if channels_last else 1


def _zeroing_hook(module: nn.Module, drop: list[int], keep: list[int]) -> Callable:
    dim = _channel_dim(module)

    def hook(mod: nn.Module, inputs: tuple, out: torch.Tensor) -> torch.Tensor:
        if isinstance(mod, nn.LayerNorm):  # normalise over the kept channels only
            x = inputs[0].movedim(dim, -1)
            kept = F.layer_norm(x[..., keep], (len(keep),), mod.weight[keep], mod.bias[keep], mod.eps)
            out = torch.zeros_like(x)
            out[..., keep] = kept
            return out.movedim(-1, dim)
        return out.index_fill(dim, torch.tensor(drop, device=out.device), 0)

    return hook


def reference(model: nn.Module, keeps: dict[Unit, list[int]]) -> nn.Module:
    """A copy of ``model`` in which every layer whose output channels hold a unit's filters (as
    torch-pruning's group numbers them in that layer) outputs zeros for the dropped ones, and
    LayerNorms normalise over the kept channels only: the original modules compute, with the
    dropped channels ignored downstream. Units' filters are disjoint, so their hooks compose."""
    ref = copy.deepcopy(model)
    own = set(ref.modules())
    graph = dependency_graph(ref)
    for unit, keep in keeps.items():
        drop = sorted(set(range(unit.n_filters)) - set(keep))
        for group in pruning_groups(ref, graph, unit, drop):
            for dep, idxs in group:
                module = dep.target.module
                if module in own and graph.is_out_channel_pruning_fn(dep.handler):
                    dropped = sorted(int(i) for i in idxs)
                    channels = module.normalized_shape[0] if isinstance(module, nn.LayerNorm) else 0
                    kept = sorted(set(range(channels)) - set(dropped))
                    module.register_forward_hook(_zeroing_hook(module, dropped, kept))
    return ref


def prune_and_compare(model: nn.Module, keeps: dict[Unit, list[int]], x: torch.Tensor) -> tuple[float, list[dict]]:
    """Prune ``model`` in place (each unit to its keep set, input side first); returns the
    largest difference from ``reference``'s output relative to its largest value, and
    ``prune_layer``'s records."""
    with torch.no_grad():
        expected = reference(model, keeps)(x)
    records = [prune_layer(model, unit.name, keep) for unit, keep in keeps.items()]
    with torch.no_grad():
        out = model(x)
    if out.shape != expected.shape:
        return float("inf"), records
    return float((out - expected).abs().max() / expected.abs().max().clamp_min(1e-6)), records


@dataclass
class Row:
    family: str
    model: str
    units: int = 0
    reached: int = 0
    convs: int = 0
    grouped: int = 0
    refused: str = ""
    verdict: str = ""
    describe_s: float = 0.0
    prune_s: float = 0.0


def cover(fam: str, name: str, builder: Callable[[str], nn.Module]) -> Row:
    """One row of the coverage table for the model ``name`` of family ``fam``."""
    model = builder(name)
    row = Row(fam, name, convs=sum(isinstance(m, nn.Conv2d) for m in model.modules()))
    start = time.perf_counter()
    try:
        units = describe_units(model)
    except ValueError as err:
        row.verdict, row.refused = "refused (whole model)", str(err).split(":")[0]
        return row
    except Exception as err:  # noqa: BLE001  (the table records any failure, model by model)
        row.verdict = f"FAILS to describe ({type(err).__name__}: {str(err)[:80]})"
        return row
    row.describe_s = time.perf_counter() - start
    row.units, row.reached = len(units), len({c for u in units for c in u.convs})
    row.grouped = sum(u.channel_groups > 1 for u in units)
    reasons = Counter(_short(name, why) for name, why in _units_from_graph(model, dependency_graph(model))[1].items()
                      if "keeps the filters" not in why)
    row.refused = "; ".join(f"{k}: {why}" for why, k in sorted(reasons.items()))
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, *model.input_shape, generator=gen)
    keeps = {u: half(u, gen) for u in sample(units)}
    start = time.perf_counter()
    try:
        error, _ = prune_and_compare(model, keeps, x)
    except Exception as err:  # noqa: BLE001  (the table records any failure, model by model)
        row.verdict = f"FAILS ({type(err).__name__}: {str(err)[:80]})"
        return row
    row.prune_s = time.perf_counter() - start  # includes the reference's forward: a few percent
    row.verdict = "exact" if error < 1e-4 else f"DIFFERS ({error:.1e})"
    return row


def _short(name: str, why: str) -> str:
    """A refusal without its unit's name and its conclusion, so that equal reasons count together."""
    why = why.replace(f"unit '{name}': ", "").replace(f"unit '{name}' ", "")
    for end in ("; pruning", ", which torch-pruning", ", so it is not", " (a split"):
        why = why.split(end)[0]
    return re.sub(r"'[^']*'", "'…'", why)


def table(rows: list[Row]) -> str:
    head = ("| family | model | units | convs reached / all | grouped units | exact (3 units, half) | "
            "describe s | prune 3 units s | refused units (count: why) |\n|---|---|---|---|---|---|---|---|---|\n")
    return head + "\n".join(
        f"| {r.family} | {r.model} | {r.units} | {r.reached} / {r.convs} | {r.grouped} | {r.verdict} | "
        f"{r.describe_s:.2f} | {r.prune_s:.2f} | {r.refused or '-'} |" for r in rows
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--timm", action="store_true", help="also the timm sample (needs timm installed)")
    parser.add_argument("--only", nargs="*", default=None, help="family names to run (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [cover(f, SMALLEST[f], build) for f in sorted(SMALLEST) if not args.only or f in args.only]
    print(table(rows), flush=True)
    if args.timm:
        import timm

        print(f"\ntimm {timm.__version__}\n")
        rows = [cover(f, n, build_timm) for f, n in TIMM_SAMPLE.items() if not args.only or f in args.only]
        print(table(rows), flush=True)


if __name__ == "__main__":
    main()
