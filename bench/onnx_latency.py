"""Do FLOPs savings become latency savings, in PyTorch and in ONNX Runtime? (CPU)

Each model (torchvision, random weights: they time like trained ones) is pruned uniformly by
L1 at 50% (every unit keeps its top half, as ``bench/latency.py`` prunes), both base and
pruned are exported to ONNX (``trainables.export``), and each is timed in

- PyTorch: ``measure_latency``'s deployment form (BN folded, conv + add + ReLU fused, channels_last),
- PyTorch eager: the model as it is, in eval mode,
- ONNX Runtime (CPU execution provider, its default graph optimisations),

all on one thread, interleaved round by round (every variant once per round, in turn), so a
shared machine's drift hits all alike. Reported per runtime: median latency (ms), the latency
ratio pruned / base (from the medians, and from the minima: the least disturbed samples)
beside the FLOPs ratio, and the share of the FLOPs saving that became a
latency saving: (1 - latency ratio) / (1 - FLOPs ratio), 1.0 = all of it.

    python bench/onnx_latency.py                        # resnet50, mobilenet_v3_large; batch 1 and 8
    python bench/onnx_latency.py --quick                # resnet18, mobilenet_v3_small at 64 px, batch 1
    python bench/onnx_latency.py --round-to 1 8          # also kept counts in multiples of 8, timed beside

Prints a markdown section for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.latency import prune_uniform  # noqa: E402
from bench.report import machine_header  # noqa: E402
from trainables.core.metrics import count_flops, deployment_form, measure_latency  # noqa: E402
from trainables.export import export_model, onnx_session, onnxruntime_available  # noqa: E402

RUNTIMES = ("pytorch", "pytorch_eager", "onnxruntime")
TRACE_SHAPE = (3, 64, 64)  # torch-pruning's graph of these models does not depend on the input size


def _timer(runtime: str, model: nn.Module, onnx_path: Path, batch: int, shape: tuple[int, ...],
           threads: int) -> Callable[[], float]:
    """A function that times one forward of ``batch`` images (ms) in ``runtime``."""
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0))
    if runtime == "onnxruntime":
        session = onnx_session(onnx_path, threads)
        feed = {session.get_inputs()[0].name: x.numpy()}

        def run_ort() -> float:
            t0 = time.perf_counter()
            session.run(None, feed)
            return 1e3 * (time.perf_counter() - t0)
        return run_ort
    # deploy=False: the deployment form is built once here, not at every sample
    net = deployment_form(model) if runtime == "pytorch" else copy.deepcopy(model).eval()
    last = runtime == "pytorch"

    def run_torch() -> float:
        return measure_latency(net, batch, input_shape=shape, threads=threads, warmup=0, repeats=1,
                               channels_last=last, deploy=False)["median_ms"]
    return run_torch


def bench_model(name: str, size: int, ratio: float, batches: list[int], args: argparse.Namespace,
                tmp: Path) -> list[dict]:
    """Rows of one model: per batch size, runtime and pruned variant (one per ``--round-to``),
    latency and FLOPs relative to the base timed beside it."""
    torch.manual_seed(0)
    base = getattr(torchvision.models, name)().eval()
    shape = (3, size, size)
    models = {0: base, **{r: prune_uniform(base, ratio, r, TRACE_SHAPE).eval() for r in args.round_to}}
    flops = {k: count_flops(m, shape) for k, m in models.items()}
    paths = {k: export_model(m, torch.randn(2, *shape), tmp / f"{name}-{k}.onnx", "onnx") for k, m in models.items()}
    rows = []
    for batch in batches:
        timers = {(k, rt): _timer(rt, m, paths[k], batch, shape, args.threads)
                  for k, m in models.items() for rt in RUNTIMES}
        for t in timers.values():  # warm-up: allocators, oneDNN primitive caches, ORT arenas
            for _ in range(args.warmup):
                t()
        samples: dict[tuple[int, str], list[float]] = {key: [] for key in timers}
        for _ in range(args.rounds * args.repeats):  # every variant once per turn: drift hits all alike
            for key, t in timers.items():
                samples[key].append(t())
        for r in args.round_to:
            fr = flops[r] / flops[0]
            for rt in RUNTIMES:
                b, p = statistics.median(samples[(0, rt)]), statistics.median(samples[(r, rt)])
                b_min, p_min = min(samples[(0, rt)]), min(samples[(r, rt)])
                rows.append({"model": name, "round_to": r, "size": size, "batch": batch, "runtime": rt,
                             "base_ms": b, "pruned_ms": p, "latency_ratio": p / b, "latency_ratio_min": p_min / b_min,
                             "flops_ratio": fr, "gflops_base": flops[0] / 1e9, "gflops_pruned": flops[r] / 1e9,
                             "realised": (1 - p / b) / (1 - fr), "n": len(samples[(0, rt)])})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | batch | runtime | base ms | pruned ms | latency ratio (medians) | (minima) | FLOPs ratio "
             "| FLOPs saving realised |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        rounded = f", round_to={r['round_to']}" if r["round_to"] > 1 else ""
        lines.append(f"| {r['model']} ({r['gflops_base']:.2f} -> {r['gflops_pruned']:.2f} GFLOPs{rounded}) | "
                     f"{r['batch']} | {r['runtime']} | {r['base_ms']:.1f} | {r['pruned_ms']:.1f} | "
                     f"{r['latency_ratio']:.3f} | {r['latency_ratio_min']:.3f} | {r['flops_ratio']:.3f} | "
                     f"{100 * r['realised']:.0f}% |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet50", "mobilenet_v3_large"])
    p.add_argument("--size", type=int, default=224, help="input height = width")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--round-to", nargs="+", type=int, default=[1],
                   help="one pruned variant per value: kept filters rounded to a multiple of it")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--repeats", type=int, default=3, help="samples per variant per round")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="resnet18 and mobilenet_v3_small at 64 px, batch 1, 3 rounds")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.size, args.batch_sizes, args.rounds, args.repeats = (
            ["resnet18", "mobilenet_v3_small"], 64, [1], 3, 2)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not onnxruntime_available():
        raise SystemExit('error: the onnx extra is needed: pip install -e ".[onnx]"')
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            rows += bench_model(name, args.size, args.ratio, args.batch_sizes, args, Path(tmp))
            print(table(rows), flush=True)
    import onnxruntime

    extra = (f"onnxruntime {onnxruntime.__version__}; {args.threads} thread(s); medians of {rows[0]['n']} samples "
             f"per cell ({args.rounds} x {args.repeats} turns, each variant once per turn); {int(100 * args.ratio)}% uniform L1.")
    print()
    print("## ONNX Runtime vs PyTorch: latency after 50% pruning (issue 21)\n")
    print(machine_header([sys.argv[0], *(argv if argv is not None else sys.argv[1:])], time.perf_counter() - t0, extra))
    print(table(rows))


if __name__ == "__main__":
    main()
