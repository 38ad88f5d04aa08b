"""Latency vs FLOPs after uniform filter pruning, on CPU.

Every unit of the model keeps its top-L1 filters (25% and 50% pruned by default), with and
without rounding the kept count to a multiple of 8. For each pruned model and batch size
we report the FLOPs ratio (pruned / base, per image), the measured latency ratio (pruned /
base, on ``deployment_form``) and latency ratio / FLOPs ratio: 1.0 means the pruned model
is as fast as its FLOPs promise, above 1 means FLOPs overstate the saving.

    python bench/latency.py                                   # vgg16 resnet50 small_cnn, batch 8 and 64
    python bench/latency.py --quick                           # small_cnn, seconds
    python bench/latency.py --models resnet50 --batch-sizes 8 --repeats 5 --write

All models of one batch size are timed interleaved (base, pruned, ..., base, pruned, ...)
through ``measure_latency(deploy=False)`` on deployment forms built once, so slow drift on a
shared machine hits every variant alike. Each sample also records how many cores other
processes kept busy meanwhile ("foreign load", from /proc/stat), and ratios are given from
the medians and from the minima (the least disturbed samples). ``--write`` replaces this
script's section of bench/RESULTS.md. Pruned models are never trained: random weights time
the same as trained ones.
"""

from __future__ import annotations

import copy
import importlib.metadata
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from trainables import build_model, describe_units, get_criterion, prune_layer  # noqa: E402
from trainables.metrics import count_flops  # noqa: E402
from trainables.schedules import kept_count  # noqa: E402

SECTION = "## Latency vs FLOPs after pruning"
# Tracing small inputs keeps torch-pruning's graph building fast; the ImageNet models end in
# adaptive pooling, so their dependency graph does not depend on the input size.
TRACE_SHAPES = {"vgg16": (3, 64, 64), "vgg16_bn": (3, 64, 64), "resnet50": (3, 64, 64), "resnet18": (3, 64, 64)}


# --- machine description and RESULTS.md (also used by car_speed.py) -------------------------


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        line = next(ln for ln in out.splitlines() if ln.startswith("Model name:"))
        return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or platform.machine()


def machine_header(argv: list[str], seconds: float, extra: str = "") -> str:
    """Machine, versions, exact command and date: what a reader needs to redo the numbers."""
    versions = ", ".join(
        f"{pkg} {importlib.metadata.version(pkg)}" for pkg in ("torch", "torchvision", "torch-pruning")
    )
    return (
        f"Machine: {cpu_model()}, {os.cpu_count()} cores, torch intra-op threads {torch.get_num_threads()}; {versions}.\n"
        f"Command: `python {' '.join(Path(argv[0]).parts[-2:])} {' '.join(argv[1:])}`".rstrip()
        + f" ({seconds:.0f} s, {time.strftime('%Y-%m-%d %H:%M')}). {extra}\n"
    )


def write_section(title: str, body: str) -> None:
    """Replace (or append) the section ``title`` of bench/RESULTS.md, leaving the others alone."""
    path = ROOT / "bench" / "RESULTS.md"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    start = text.find(title)
    if start == -1:
        text = text.rstrip() + f"\n\n{title}\n\n{body}"
    else:
        end = text.find("\n## ", start + len(title))
        text = text[:start] + f"{title}\n\n{body}" + (text[end:] if end != -1 else "")
    path.write_text(text)


# --- pruning ----------------------------------------------------------------------------


@dataclass
class Variant:
    """One model to time: the base or a uniformly pruned copy."""

    label: str  # e.g. "50% r8"
    ratio: float
    round_to: int
    widths: tuple[int, ...]  # kept filters per unit, network order
    model: nn.Module | None = None
    flops: int = 0
    same_as: str | None = None  # label of an earlier variant with identical widths (not re-timed)
    times: dict[int, list[float]] = field(default_factory=dict)  # batch size -> samples (ms)


def prune_uniform(base: nn.Module, ratio: float, round_to: int, trace_shape: tuple[int, ...] | None) -> nn.Module:
    """A copy of ``base`` with every unit pruned to ``kept_count(n, ratio, round_to)`` top-L1 filters.

    Units are pruned in network order and scored just before their own pruning, so a unit's
    L1 norms see its inputs already pruned (Li et al.'s greedy variant).
    """
    model = copy.deepcopy(base)
    example = (torch.zeros(1, *trace_shape),) if trace_shape else None
    l1 = get_criterion("l1")
    for unit in describe_units(model, example):
        k = kept_count(unit.n_filters, ratio, round_to)
        if k < unit.n_filters:
            keep = l1(model, unit).topk(k).indices.tolist()
            prune_layer(model, unit.name, keep, example)
    return model


def make_variants(name: str, ratios: list[float], round_tos: list[int]) -> list[Variant]:
    torch.manual_seed(0)
    base = build_model(name, num_classes=1000 if name in TRACE_SHAPES else 10).eval()
    trace = TRACE_SHAPES.get(name)
    units = describe_units(base, (torch.zeros(1, *trace),) if trace else None)
    variants = [Variant("base", 0.0, 1, tuple(u.n_filters for u in units), base, count_flops(base))]
    for ratio in ratios:
        for r in round_tos:
            widths = tuple(kept_count(u.n_filters, ratio, r) for u in units)
            v = Variant(f"{round(100 * ratio)}%" + (f" r{r}" if r > 1 else ""), ratio, r, widths)
            twin = next((w for w in variants if w.widths == widths), None)
            if twin is not None:
                v.same_as, v.model, v.flops = twin.label, twin.model, twin.flops
            else:
                v.model = prune_uniform(base, ratio, r, trace)
                v.flops = count_flops(v.model)
            variants.append(v)
    return variants
