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

import argparse
import copy
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import machine_header, write_section  # noqa: E402
from trainables import build_model, describe_units, get_criterion, prune_layer  # noqa: E402
from trainables.core.metrics import count_flops, deployment_form, measure_latency  # noqa: E402
from trainables.protocol.schedules import kept_count  # noqa: E402

SECTION = "## Latency vs FLOPs after pruning"
# Tracing small inputs keeps torch-pruning's graph building fast; the ImageNet models end in
# adaptive pooling, so their dependency graph does not depend on the input size.
TRACE_SHAPES = {"vgg16": (3, 64, 64), "vgg16_bn": (3, 64, 64), "resnet50": (3, 64, 64), "resnet18": (3, 64, 64)}


# The machine description and RESULTS.md writer live in bench/report.py (every benchmark uses them).


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


# --- timing -------------------------------------------------------------------------------

FORMS = {
    "eager": "the pruned model as torch-pruning leaves it: eval mode, NCHW, BN unfolded",
    "deploy": "deployment_form: BN folded, conv+ReLU / conv+add+ReLU fused (oneDNN post-ops), channels_last",
    "deploy-nchw": "deployment_form(channels_last=False), base model only: the layout check",
    "compile": "torch.compile(BN-folded channels_last model, inductor, freezing=True, dynamic=False)",
}
CHANNELS_LAST = {"eager": False, "deploy": True, "deploy-nchw": False, "compile": True}


def build_form(model: nn.Module, form: str) -> nn.Module:
    if form == "eager":
        return model
    if form == "compile":
        # Inductor fuses conv + ReLU / add itself; deployment_form's hand-fused convs would
        # only cut its graph at every conv (and hit dynamo's recompile limit), so it compiles
        # the BN-folded channels_last model instead. Compiled lazily at the first (warm-up)
        # call of each batch size.
        from torch.fx.experimental.optimization import fuse

        folded = fuse(copy.deepcopy(model).eval()).to(memory_format=torch.channels_last)
        return torch.compile(folded, dynamic=False, options={"freezing": True})
    return deployment_form(model, channels_last=CHANNELS_LAST[form])


def _cpu_seconds() -> tuple[float, float]:
    """(CPU seconds all processes have used, CPU seconds this process has used), since boot."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:9]]
    busy = sum(ticks) - ticks[3] - ticks[4]  # minus idle and iowait
    return busy / os.sysconf("SC_CLK_TCK"), sum(os.times()[:2])


def sample(net: nn.Module, batch: int, threads: int, channels_last: bool, shape) -> tuple[float, float]:
    """One timed forward (ms) and the cores other processes kept busy meanwhile."""
    all0, own0 = _cpu_seconds()
    t0 = time.perf_counter()
    ms = measure_latency(net, batch, input_shape=shape, threads=threads, warmup=0, repeats=1,
                         channels_last=channels_last, deploy=False)["median_ms"]
    wall = time.perf_counter() - t0
    all1, own1 = _cpu_seconds()
    return ms, max(0.0, ((all1 - all0) - (own1 - own0)) / wall)


@dataclass
class Block:
    """The samples of one model at one batch size: (variant label, form) -> times in ms."""

    batch: int
    times: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    foreign: list[float] = field(default_factory=list)  # cores busy elsewhere, per sample


def time_block(variants: list[Variant], nets: dict, batch: int, args: argparse.Namespace, shape) -> Block:
    """Interleaved rounds over every (variant, form); warm-up rounds are not recorded."""
    block = Block(batch)
    keys = list(nets)
    for rnd in range(args.warmup + args.repeats):
        order = keys if rnd % 2 == 0 else keys[::-1]  # alternate, so no variant always runs first
        for key in order:
            ms, foreign = sample(nets[key], batch, args.threads, CHANNELS_LAST[key[1]], shape)
            if rnd >= args.warmup:
                block.times.setdefault(key, []).append(ms)
                block.foreign.append(foreign)
    return block


# --- report -------------------------------------------------------------------------------


def block_rows(name: str, variants: list[Variant], block: Block, forms: list[str]) -> list[str]:
    base = variants[0]
    rows = []
    for form in forms:
        if (base.label, form) not in block.times:
            continue
        b_med, b_min = statistics.median(block.times[base.label, form]), min(block.times[base.label, form])
        for v in variants:
            ts = block.times.get((v.same_as or v.label, form))
            if ts is None:
                continue
            fr = v.flops / base.flops
            lr, lr_min = statistics.median(ts) / b_med, min(ts) / b_min
            pruned = v.label + (f" (= {v.same_as}: same widths)" if v.same_as else "")
            rows.append(
                f"| {name} | {block.batch} | {form} | {pruned} | {v.flops / 1e9:.3f} | {fr:.3f} | "
                f"{statistics.median(ts):.1f} | {lr:.3f} | **{lr / fr:.3f}** | {lr_min / fr:.3f} |"
            )
    return rows


TABLE_HEADER = [
    "| model | batch | form | pruned | GFLOPs/img | FLOPs ratio | latency ms (median) | latency ratio | latency/FLOPs ratio | same, from minima |",
    "|---|---|---|---|---|---|---|---|---|---|",
]


def layout_rows(name: str, block: Block) -> list[str]:
    nchw, cl = block.times.get(("base", "deploy-nchw")), block.times.get(("base", "deploy"))
    if not nchw or not cl:
        return []
    a, b = statistics.median(nchw), statistics.median(cl)
    verdict = "helps" if a / b > 1.05 else ("hurts" if a / b < 0.95 else "no difference")
    return [f"| {name} | {block.batch} | {a:.1f} | {b:.1f} | {a / b:.2f}x | {verdict} |"]


def widths_note(name: str, variants: list[Variant]) -> str:
    parts = [f"{v.label}: {_compact(v.widths)}" for v in variants if v.same_as is None]
    return f"- {name} kept filters per unit: " + "; ".join(parts)


def _compact(widths: tuple[int, ...]) -> str:
    """'64x2, 128x2' for runs of equal widths."""
    out, i = [], 0
    while i < len(widths):
        j = i
        while j < len(widths) and widths[j] == widths[i]:
            j += 1
        out.append(f"{widths[i]}" + (f"x{j - i}" if j - i > 1 else ""))
        i = j
    return ", ".join(out)


# --- entry point ------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["vgg16", "resnet50", "small_cnn"])
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[8, 64])
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.25, 0.5], help="share of filters pruned per unit")
    ap.add_argument("--round-to", nargs="+", type=int, default=[1, 8], help="kept counts rounded to these multiples")
    ap.add_argument("--forms", nargs="+", default=["eager", "deploy"], choices=["eager", "deploy", "compile"])
    ap.add_argument("--compile", action="store_true", help="also time torch.compile(deployment_form) (slow to build)")
    ap.add_argument("--no-layout-check", action="store_true", help="skip timing the base model in NCHW")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds (each times every model once)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    ap.add_argument("--quick", action="store_true", help="small_cnn, batch 8, 50%% only, 3 repeats (seconds)")
    ap.add_argument("--write", action="store_true", help="replace this section of bench/RESULTS.md")
    args = ap.parse_args(argv)
    if args.quick:
        args.models, args.batch_sizes, args.ratios, args.repeats = ["small_cnn"], [8], [0.5], 3
    if args.compile and "compile" not in args.forms:
        args.forms.append("compile")
    if min(args.batch_sizes) < 1 or args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        ap.error(f"--batch-sizes {args.batch_sizes}, --repeats {args.repeats}, --threads {args.threads} must be >= 1, --warmup {args.warmup} >= 0")
    return args


def run_model(name: str, args: argparse.Namespace) -> tuple[list[Variant], list[Block]]:
    t0 = time.perf_counter()
    variants = make_variants(name, args.ratios, args.round_to)
    print(f"{name}: pruned {len(variants) - 1} variants in {time.perf_counter() - t0:.0f} s", flush=True)
    forms = list(args.forms) + ([] if args.no_layout_check else ["deploy-nchw"])
    nets = {
        (v.label, form): build_form(v.model, form)
        for form in forms
        for v in variants
        if v.same_as is None and (form != "deploy-nchw" or v.label == "base")
    }
    shape = variants[0].model.input_shape
    blocks = []
    for batch in args.batch_sizes:
        t0 = time.perf_counter()
        blocks.append(time_block(variants, nets, batch, args, shape))
        print(f"{name} batch {batch}: timed in {time.perf_counter() - t0:.0f} s", flush=True)
    return variants, blocks


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    t0 = time.perf_counter()
    rows, layout, notes = list(TABLE_HEADER), [], []
    for name in args.models:
        variants, blocks = run_model(name, args)
        for block in blocks:
            rows += block_rows(name, variants, block, args.forms)
            layout += layout_rows(name, block)
            notes.append(f"- {name} batch {block.batch}: other processes kept a median "
                         f"{statistics.median(block.foreign):.2f} cores (max {max(block.foreign):.2f}) busy while timing")
        notes.append(widths_note(name, variants))
        print("\n".join(rows), flush=True)
    header = machine_header(
        sys.argv, time.perf_counter() - t0,
        extra=f"{args.threads} threads, {args.warmup} warm-up + {args.repeats} timed interleaved rounds; "
              "forms: " + "; ".join(f"`{f}` = {FORMS[f]}" for f in args.forms) + ".",
    )
    body = header + "\n" + "\n".join(rows) + "\n"
    if layout:
        body += ("\nchannels_last check (base model, deployment_form, median ms):\n\n"
                 "| model | batch | NCHW | channels_last | speedup | verdict |\n|---|---|---|---|---|---|\n"
                 + "\n".join(layout) + "\n")
    body += "\n" + "\n".join(notes) + "\n"
    print(body)
    if args.write:
        write_section(SECTION, body)


if __name__ == "__main__":
    main()
