"""CAR scoring time: the batched ablation (``get_criterion("car")``) against the naive loop.

The naive reference (``car_naive``) copies the model, masks one filter and evaluates every
scoring batch, once per filter. The fast criterion expands the batch at the unit instead:
the layers before the unit run once and ``car_max_batch // batch_size`` ablations share
each later forward. Both must give identical scores; this script asserts it and times them,
interleaved (naive, fast, fast, ..., repeated), and reports medians.

    python bench/car_speed.py                      # vgg16_bn_cifar and small_cnn, 3 repeats
    python bench/car_speed.py --quick              # small_cnn, tiny data, 1 repeat (seconds)
    python bench/car_speed.py --models small_cnn --max-batch 1024 4096 --repeats 5 --write

Data: small_cnn is scored on the first Fashion-MNIST validation images after a short
seeded training (an untrained net has nothing to lose); vgg16_bn_cifar on random images
labelled with the model's own predictions, so that every flipped prediction counts (with
random labels an untrained VGG flips no correct prediction and CAR is all zeros), after
recalibrating its BN statistics on those images.
``--write`` replaces this script's section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import BenchRun  # noqa: E402  (bench/ is on sys.path)
from trainables import ScoringContext, Unit, build_model, describe_units, get_criterion  # noqa: E402
from trainables.criteria.car import car, car_naive  # noqa: E402

SECTION = "## CAR: batched ablation vs naive loop"
Batches = list[tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class Setup:
    """One benchmark case: a model, the unit to score, and its scoring data."""

    model: nn.Module
    unit: Unit
    batches: Batches
    data: str  # what the scoring images are, for the table


def first_unit_with(model: nn.Module, n_filters: int, name: str | None = None) -> Unit:
    """The unit called ``name``, else the first unit (network order) with ``n_filters`` filters."""
    units = describe_units(model)
    for u in units:
        if (name is None and u.n_filters == n_filters) or u.name == name:
            return u
    valid = ", ".join(f"{u.name} ({u.n_filters})" for u in units)
    raise ValueError(f"no unit {name or f'with {n_filters} filters'}; units (filters): {valid}")


def _train_briefly(model: nn.Module, train_set, steps: int, seed: int) -> None:
    """A few hundred Adam steps, seeded, so the net has accuracy to lose when a filter goes."""
    from data import iterate_batches

    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    done, epoch = 0, 0
    while done < steps:
        for x, y in iterate_batches(train_set, 128, shuffle=True, seed=seed + epoch):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            done += 1
            if done == steps:
                break
        epoch += 1
    model.eval()


def setup_small_cnn(n_batches: int, batch_size: int, train_steps: int, unit: str | None, seed: int) -> Setup:
    from data import get_data

    splits = get_data("fashion_mnist", seed=seed)
    torch.manual_seed(seed)
    model = build_model("small_cnn", num_classes=splits.num_classes)
    if train_steps:
        _train_briefly(model, splits.train, train_steps, seed)
    n = n_batches * batch_size
    images, labels = splits.val.images[:n], splits.val.targets[:n]  # (n, 1, 28, 28), (n,)
    batches = [(images[i : i + batch_size], labels[i : i + batch_size]) for i in range(0, n, batch_size)]
    data = f"first {n} Fashion-MNIST val images, net trained {train_steps} Adam steps"
    return Setup(model.eval(), first_unit_with(model, 64, unit), batches, data)


@torch.no_grad()
def setup_vgg_cifar(n_batches: int, batch_size: int, unit: str | None, seed: int) -> Setup:
    torch.manual_seed(seed)
    model = build_model("vgg16_bn_cifar")
    gen = torch.Generator().manual_seed(seed)
    images = [torch.randn(batch_size, *model.input_shape, generator=gen) for _ in range(n_batches)]  # (B, 3, 32, 32)
    # Fresh BN statistics (mean 0, var 1) leave an untrained VGG's activations to grow or die
    # layer after layer, so every image gets the same class and no ablation flips one.
    # Recalibrating BN on the scoring images normalises them as in a trained net.
    model.train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the calibration batches
    for x in images:
        model(x)
    model.eval()
    batches = [(x, model(x).argmax(dim=1)) for x in images]  # labels = own predictions: base accuracy 100%
    data = (f"{n_batches}x{batch_size} random images, BN statistics calibrated on them, "
            "labels = the model's own predictions (random init)")
    return Setup(model, first_unit_with(model, 64, unit or "features.3"), batches, data)


def _timed(fn, *args) -> tuple[float, Tensor]:
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def time_methods(s: Setup, max_batches: list[int], repeats: int) -> tuple[dict[str, list[float]], Tensor]:
    """Seconds per full scoring of the unit, per method, over interleaved repeats, and the scores.

    Every run's scores are checked against the first naive run (float32, as the registered
    criterion returns them), and the raw ``car`` function's double scores must equal
    ``car_naive``'s exactly (both count flipped predictions in integers and divide once).
    """
    ctxs = {"naive": ScoringContext(batches=s.batches)}
    ctxs.update({f"fast {mb}": ScoringContext(batches=s.batches, car_max_batch=mb) for mb in max_batches})
    times: dict[str, list[float]] = {name: [] for name in ctxs}
    reference = None
    for rep in range(repeats):
        order = list(ctxs) if rep % 2 == 0 else list(reversed(ctxs))  # alternate to spread drift
        for name in order:
            fn = car_naive if name == "naive" else get_criterion("car")
            seconds, scores = _timed(fn, s.model, s.unit, ctxs[name])
            if reference is None:  # the first run of all is naive (rep 0 runs in order)
                reference = scores.double()
            assert torch.equal(scores.double(), reference.float().double()), f"{name}: scores differ from car_naive"
            times[name].append(seconds)
    for mb in max_batches:  # the exact check, on the double scores before the criterion's cast
        raw = car(s.model, s.unit, ctxs[f"fast {mb}"]).double()
        assert torch.equal(raw, reference), f"car (car_max_batch={mb}) differs from car_naive: {raw} vs {reference}"
    return times, reference


def table_rows(model_name: str, s: Setup, times: dict[str, list[float]], n_scored: int) -> list[str]:
    naive = statistics.median(times["naive"])
    b = len(s.batches[0][1])
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        chunk = "1 (copy per filter)" if name == "naive" else str(min(s.unit.n_filters, max(1, int(name.split()[1]) // b)))
        method = "car_naive" if name == "naive" else f"car, car_max_batch={name.split()[1]}"
        rows.append(
            f"| {model_name} | {s.unit.name} ({s.unit.n_filters}) | {n_scored} | {method} | {chunk} | "
            f"{med:.2f} | {min(ts):.2f} | {naive / med:.2f}x |"
        )
    return rows


HEADER = [
    "| model | unit (filters) | images | method | ablations per forward | median s | min s | speedup (median) |",
    "|---|---|---|---|---|---|---|---|",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["vgg16_bn_cifar", "small_cnn"], choices=["vgg16_bn_cifar", "small_cnn"])
    ap.add_argument("--max-batch", nargs="+", type=int, default=[256, 1024, 4096],
                    help="car_max_batch values: the largest expanded batch (filters x images) per forward")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", type=int, default=None, help="scoring batches (default: 4 small_cnn, 2 vgg16_bn_cifar)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--train-steps", type=int, default=200, help="Adam steps on Fashion-MNIST before scoring small_cnn")
    ap.add_argument("--unit", default=None,
                    help="unit to score (default: features.3 for vgg16_bn_cifar, the first 64-filter unit for small_cnn)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all cores)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="small_cnn, 2x32 images, 1 repeat, no training")
    ap.add_argument("--write", action="store_true", help="replace this section of bench/RESULTS.md")
    args = ap.parse_args(argv)
    if args.quick:
        args.models, args.max_batch, args.repeats = ["small_cnn"], [1024], 1
        args.batches, args.batch_size, args.train_steps = 2, 32, 0
    if args.repeats < 1 or args.batch_size < 1 or (args.batches is not None and args.batches < 1):
        ap.error(f"--repeats={args.repeats}, --batches={args.batches} and --batch-size={args.batch_size} must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    run = BenchRun(SECTION)
    rows, notes = list(HEADER), []
    for name in args.models:
        if name == "small_cnn":
            s = setup_small_cnn(args.batches or 4, args.batch_size, args.train_steps, args.unit, args.seed)
        else:
            s = setup_vgg_cifar(args.batches or 2, args.batch_size, args.unit, args.seed)
        times, scores = time_methods(s, args.max_batch, args.repeats)
        n_scored = sum(len(y) for _, y in s.batches)
        rows += table_rows(name, s, times, n_scored)
        # The score is (accuracy drop + atan(loss increase)/pi) / n: its rounded count is the accuracy drop.
        drops = torch.round(scores.double() * n_scored)
        notes.append(f"- {name}: {s.data}; {int((drops != 0).sum())}/{s.unit.n_filters} filters have a nonzero "
                     "accuracy drop, "
                     f"max {float(scores.max()):.4f}. Scores identical to car_naive in every run (asserted).")
        print("\n".join(rows), flush=True)
    run.finish("\n".join(rows) + "\n\n" + "\n".join(notes),
               extra=f"{torch.get_num_threads()} threads, {args.repeats} interleaved repeats per method.", write=args.write)


if __name__ == "__main__":
    main()
