"""Greedy CAR: ``greedy_car_order`` against the naive greedy loop, same data, same order.

The naive loop (``greedy_car_order_naive``) masks a copy of the model per remaining filter
and evaluates every scoring image, at every step: O(n^2) full evaluations per unit. The fast
one caches what is upstream of the unit, screens each ablation from the next conv's output on
(with error bounds, near-ties decided exactly), batches (candidate, image) rows, and evaluates
a candidate only while it could still be the best (see ``trainables.greedy_car``). Both
orders must be identical (asserted every repeat); the script times them side by side,
interleaved (fast, naive, fast, naive, ...), and reports medians, the ratio of the medians,
and the 1-minute load average before and after each case (the machine is shared).

    python bench/greedy_car.py                 # both cases, 256 images, 8 steps, 3 repeats, 1 thread
    python bench/greedy_car.py --cases first --images 512 --steps 16 --repeats 1   # the planning setting
    python bench/greedy_car.py --quick         # tiny: a few seconds
    python bench/greedy_car.py --write         # also replace this section of bench/RESULTS.md

Cases: "first": small_cnn width 32 (its first layer has 32 filters), unit ``features.0``;
"deeper": the default small_cnn (width 16), unit ``features.11`` (64 filters, 32->64
channels at 7x7); each trained ``--train-steps`` seeded Adam steps on Fashion-MNIST and
scored on the first ``--images`` validation images, batches of 64.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from latency import machine_header, write_section  # noqa: E402  (bench/ is on sys.path)

from trainables import build_model, describe_units  # noqa: E402
from trainables.greedy_car import greedy_car_order, greedy_car_order_naive  # noqa: E402

SECTION = "## Greedy CAR: incremental vs naive greedy loop"
HEADER = ["| model | unit (filters) | images | greedy steps | repeats | naive s (median) | fast s (median) | speedup "
          "| per repeat | load before / after | same order |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
CASES = {"first": (32, "features.0"), "deeper": (16, "features.11")}  # small_cnn width, unit


def _trained(width: int, steps: int, seed: int, splits) -> nn.Module:
    from data import iterate_batches

    torch.manual_seed(seed)
    model = build_model("small_cnn", width=width)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    done = 0
    for epoch in range(100):
        for x, y in iterate_batches(splits.train, 128, shuffle=True, seed=seed + epoch):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            done += 1
            if done == steps:
                return model.eval()
    return model.eval()


def run_case(model: nn.Module, unit: str, batches: list, steps: int,
             repeats: int) -> tuple[list[float], list[float], list[int]]:
    """Seconds of each repeat, naive and fast, interleaved (fast first), and the order."""
    naive_s, fast_s = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fast = greedy_car_order(model, unit, batches, n_remove=steps)
        fast_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        naive = greedy_car_order_naive(model, unit, batches, n_remove=steps)
        naive_s.append(time.perf_counter() - t0)
        assert fast == naive, f"{unit}: fast order {fast} differs from the naive order {naive}"
    return naive_s, fast_s, fast


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=256, help="scoring (validation) images, both methods")
    ap.add_argument("--steps", type=int, default=8, help="greedy removals per unit")
    ap.add_argument("--train-steps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per method and case (medians reported)")
    ap.add_argument("--cases", nargs="+", choices=sorted(CASES), default=["first", "deeper"])
    ap.add_argument("--quick", action="store_true", help="64 images, 3 steps, 50 training steps, 1 repeat")
    ap.add_argument("--write", action="store_true", help="replace this section of bench/RESULTS.md")
    args = ap.parse_args(argv)
    if args.quick:
        args.images, args.steps, args.train_steps, args.repeats = 64, 3, 50, 1
    if min(args.images, args.steps, args.train_steps, args.threads, args.repeats) < 1:
        ap.error("--images, --steps, --train-steps, --threads and --repeats must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    from data import get_data

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    splits = get_data("fashion_mnist", seed=args.seed)
    x, y = splits.val.images[: args.images], splits.val.targets[: args.images]  # (N, 1, 28, 28), (N,)
    batches = [(x[i : i + 64], y[i : i + 64]) for i in range(0, len(y), 64)]
    rows, notes = list(HEADER), []
    for case in args.cases:
        width, unit = CASES[case]
        model = _trained(width, args.train_steps, args.seed, splits)
        n = next(u.n_filters for u in describe_units(model) if u.name == unit)
        steps = min(args.steps, n - 1)
        load = os.getloadavg()[0]
        naive_s, fast_s, order = run_case(model, unit, batches, steps, args.repeats)
        naive, fast = statistics.median(naive_s), statistics.median(fast_s)
        ratios = "/".join(f"{a / b:.1f}" for a, b in zip(naive_s, fast_s, strict=True))
        rows.append(f"| small_cnn width {width} | {unit} ({n}) | {len(y)} | {steps} | {args.repeats} | {naive:.1f} | "
                    f"{fast:.2f} | {naive / fast:.1f}x | {ratios} | {load:.1f} / {os.getloadavg()[0]:.1f} | yes |")
        notes.append(f"- small_cnn width {width} `{unit}`: removal order {order}.")
        print(rows[-1], flush=True)
    extra = (f"{torch.get_num_threads()} thread(s); per case {args.repeats} run(s) per method, interleaved, fast "
             "first; speedup = median naive / median fast; load = 1-minute load average before / after the case.")
    header = machine_header(sys.argv, time.perf_counter() - t0, extra=extra)
    body = header + "\n" + "\n".join(rows) + "\n\n" + "\n".join(notes) + "\n"
    print(body)
    if args.write:
        write_section(SECTION, body)


if __name__ == "__main__":
    main()
