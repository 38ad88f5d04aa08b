"""Greedy CAR: ``greedy_car_order`` against the naive greedy loop, same data, same order.

The naive loop (``greedy_car_order_naive``) masks a copy of the model per remaining filter
and evaluates every scoring image, at every step: O(n^2) full evaluations per unit. The fast
one caches what is upstream of the unit, screens each ablation from the next conv's output on
(with error bounds, near-ties decided exactly), batches (candidate, image) rows, and evaluates
a candidate only while it could still be the best (see ``trainables.protocol.greedy_car``). Both
orders must be identical (asserted every repeat); the script times them side by side,
interleaved (fast, naive, fast, naive, ...), and reports medians, the ratio of the medians,
and the 1-minute load average before and after each case (the machine is shared).

    python bench/greedy_car.py                 # first and deeper, 256 images, 8 steps, 3 repeats, 1 thread
    python bench/greedy_car.py --base project --cases first colour --floor   # the bases users prune
    python bench/greedy_car.py --cases first --images 512 --steps 16 --repeats 1   # the planning setting
    python bench/greedy_car.py --quick         # tiny: a few seconds
    python bench/greedy_car.py --write         # replace the whole section of bench/RESULTS.md (its notes too)

Cases: "first": small_cnn width 32 (its first layer has 32 filters), unit ``features.0``;
"deeper": the default small_cnn (width 16), unit ``features.11`` (64 filters, 32->64
channels at 7x7); "colour": small_alexnet (the colour study's model) on Coloured
Fashion-MNIST, its first layer (64 5x5 filters). The base model is trained ``--train-steps``
seeded Adam steps (``--base quick``) or as the project trains its bases (``--base project``:
the model's conf/model/<name>.yaml pretraining, cached); the speedup depends on it, since a
candidate is ruled out by the images it gets wrong, so a model with fewer errors needs fewer
(candidate, image) rows (the table gives the base's wrong predictions on the scoring
images). Scored on the first ``--images`` validation images, batches of 64. ``--floor`` also
counts the rows the fast path evaluates against the fewest any exact method could, in all and
per kind of candidate (step winners, losers with more wrong predictions than the winner, and
losers with as many, which their loss sums decide).
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

from bench.report import BenchRun  # noqa: E402  (bench/ is on sys.path)
from trainables import build_model, describe_units  # noqa: E402
from trainables.protocol.greedy_car import greedy_car_order, greedy_car_order_naive  # noqa: E402

SECTION = "## Greedy CAR: incremental vs naive greedy loop"
HEADER = ["| model | base | base wrong | unit (filters) | images | greedy steps | repeats | naive s (median) "
          "| fast s (median) | speedup | per repeat | load before / after | same order |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
CASES = {"first": ("small_cnn", 32, "features.0"), "deeper": ("small_cnn", 16, "features.11"),
         "colour": ("small_alexnet", 64, "features.0")}  # model, width, unit
KINDS = ("step winners", "losers with more wrong than the winner", "losers with as many wrong (loss decides)")
DATA = {"small_cnn": "fashion_mnist", "small_alexnet": "coloured_fashion_mnist"}


def _trained(name: str, width: int, steps: int, seed: int, splits) -> nn.Module:
    from data import iterate_batches

    torch.manual_seed(seed)
    model = build_model(name, width=width)
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


def _project_base(name: str, width: int, seed: int, splits, data: str) -> tuple[nn.Module, str]:
    """The base model as the project trains its bases: ``trainables.cli.base_model`` with the
    model's ``conf/model/<name>.yaml`` pretraining (small_cnn: 6 epochs SGD, one-cycle peak
    lr 0.1), cached like theirs; and a few words on it for the table."""
    import yaml

    from trainables.cli.base_model import get_base_model
    from trainables.protocol.config import PretrainConfig

    pretrain = PretrainConfig(**yaml.safe_load((ROOT / "conf" / "model" / f"{name}.yaml").read_text())["pretrain"])
    cache = os.environ.get("PRUNESEARCH_CACHE", "~/.cache/prunesearch")
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)  # training is not timed
    try:
        model, path, meta = get_base_model(name, {"width": width}, 10, lambda: splits, {"name": data, "seed": seed},
                                           pretrain, cache, seed=seed, progress=False, log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)
    print(f"{name} width {width}: base model {path} (val_acc {meta.get('val_acc', float('nan')):.4f})", flush=True)
    return model.eval(), f"project's, {pretrain.epochs} epochs"


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


def rows_evaluated(model: nn.Module, unit: str, batches: list, steps: int) -> tuple[int, list[dict[int, int]]]:
    """(candidate, image) rows the fast path evaluates (any evaluator, calibration included),
    and per greedy step, per candidate (unit index), the images it was evaluated on."""
    from trainables.protocol import greedy_car

    count, rows, run = [0], greedy_car._Race._rows, greedy_car._Scoring.run
    per_step: list[dict[int, int]] = []

    def counted(self, ev, base, cands, idx, chunk=None):
        count[0] += len(idx)
        return rows(self, ev, base, cands, idx, chunk)

    def recorded(self, need):
        out = run(self, need)
        per_step.append(dict(zip(self.cands, self.seen, strict=True)))
        return out

    greedy_car._Race._rows, greedy_car._Scoring.run = counted, recorded
    try:
        greedy_car_order(model, unit, batches, n_remove=steps)
    finally:
        greedy_car._Race._rows, greedy_car._Scoring.run = rows, run
    return count[0], per_step


@torch.no_grad()
def fewest_rows(model: nn.Module, unit: str, batches: list,
                order: list[int]) -> tuple[int, int, list[dict[int, tuple[str, int]]]]:
    """(rows, pairs, per step): the fewest (candidate, image) rows any exact method that
    evaluates rows one by one needs to prove each step's winner of ``order``, knowing every
    outcome in advance; all candidate x image pairs; and per greedy step, per candidate, its
    kind (one of ``KINDS``) and its share of that floor. The winner needs every image (an
    image left out could be wrong); a loser needs a certificate that its (wrong, loss) key is
    above the winner's: one more wrong image than the winner has, or as many wrong images
    plus the highest losses among its right ones until its loss sum passes the winner's."""
    from trainables.protocol.greedy_car import ablated_outcome

    u = next(v for v in describe_units(model) if v.name == unit)
    removed: list[int] = []
    rows = pairs = 0
    per_step: list[dict[int, tuple[str, int]]] = []
    for winner in order:
        cands = [j for j in range(u.n_filters) if j not in removed]
        keys = {}
        for j in cands:
            wrong, loss = ablated_outcome(model, u, [i for i in cands if i != j], batches)
            keys[j] = (wrong, loss.double())
        n = len(keys[winner][0])
        w_best, l_best = int(keys[winner][0].sum()), float(keys[winner][1].sum())
        step = {winner: (KINDS[0], n)}
        pairs += n * len(cands)
        for j in cands:
            if j == winner:
                continue
            wrong, loss = keys[j]
            n_wrong = int(wrong.sum())
            need = [w_best + 1] if n_wrong > w_best else []
            if n_wrong >= w_best:
                held = float(loss[wrong].sort(descending=True).values[:w_best].sum())
                more = torch.cumsum(loss[~wrong].sort(descending=True).values, 0) + held
                over = (more > l_best).nonzero()
                if held > l_best:
                    need.append(w_best)
                elif len(over):
                    need.append(w_best + int(over[0]) + 1)
            step[j] = (KINDS[1] if n_wrong > w_best else KINDS[2], min(need, default=n))
        rows += sum(r for _, r in step.values())
        per_step.append(step)
        removed.append(winner)
    return rows, pairs, per_step


def floor_table(done: int, evaluated: list[dict[int, int]], least: list[dict[int, tuple[str, int]]]) -> list[str]:
    """Markdown rows: per kind of candidate, how many, the rows the fast path evaluated on
    them and the floor's; the rest of ``done`` (calibration, the first network's losses,
    exact re-evaluations of screened rows) on a line of its own."""
    out = ["  | candidates (all steps) | count | rows evaluated | fewest possible |", "  |---|---|---|---|"]
    counted = 0
    for kind in KINDS:
        mine = [(evaluated[s][j], r) for s, step in enumerate(least) for j, (k, r) in step.items() if k == kind]
        counted += sum(e for e, _ in mine)
        out.append(f"  | {kind} | {len(mine)} | {sum(e for e, _ in mine)} | {sum(r for _, r in mine)} |")
    out.append(f"  | calibration, the first network's losses, exact re-evaluations | | {done - counted} | 0 |")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=256, help="scoring (validation) images, both methods")
    ap.add_argument("--steps", type=int, default=8, help="greedy removals per unit")
    ap.add_argument("--base", choices=["quick", "project"], default="quick",
                    help="quick: --train-steps seeded Adam steps; project: trained as the project trains its base "
                         "models (conf/model/<model>.yaml, cached)")
    ap.add_argument("--train-steps", type=int, default=200, help="seeded Adam steps of the quick base model")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per method and case (medians reported)")
    ap.add_argument("--cases", nargs="+", choices=sorted(CASES), default=["first", "deeper"])
    ap.add_argument("--floor", action="store_true",
                    help="also count the rows the fast path evaluates and the fewest an exact method could, "
                         "per kind of candidate")
    ap.add_argument("--quick", action="store_true", help="64 images, 3 steps, 50 training steps, 1 repeat")
    ap.add_argument("--write", action="store_true",
                    help="replace the whole section of bench/RESULTS.md, its hand-written notes included")
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
    run = BenchRun(SECTION)
    rows, notes = list(HEADER), []
    for case in args.cases:
        name, width, unit = CASES[case]
        splits = get_data(DATA[name], seed=args.seed)
        x, y = splits.val.images[: args.images], splits.val.targets[: args.images]  # (N, C, 28, 28), (N,)
        batches = [(x[i : i + 64], y[i : i + 64]) for i in range(0, len(y), 64)]
        if args.base == "project":
            model, trained = _project_base(name, width, args.seed, splits, DATA[name])
        else:
            model, trained = _trained(name, width, args.train_steps, args.seed, splits), f"{args.train_steps} Adam steps"
        with torch.no_grad():
            wrong = sum(int((model(xb).argmax(1) != yb).sum()) for xb, yb in batches)
        n = next(u.n_filters for u in describe_units(model) if u.name == unit)
        steps = min(args.steps, n - 1)
        load = os.getloadavg()[0]
        naive_s, fast_s, order = run_case(model, unit, batches, steps, args.repeats)
        naive, fast = statistics.median(naive_s), statistics.median(fast_s)
        ratios = "/".join(f"{a / b:.1f}" for a, b in zip(naive_s, fast_s, strict=True))
        rows.append(f"| {name} width {width} | {trained} | {wrong}/{len(y)} | {unit} ({n}) | {len(y)} | {steps} | "
                    f"{args.repeats} | {naive:.1f} | "
                    f"{fast:.2f} | {naive / fast:.1f}x | {ratios} | {load:.1f} / {os.getloadavg()[0]:.1f} | yes |")
        notes.append(f"- {name} width {width} `{unit}`: removal order {order}.")
        if args.floor:
            done, evaluated = rows_evaluated(model, unit, batches, steps)
            least, pairs, kinds = fewest_rows(model, unit, batches, order)
            notes.append(f"  Rows evaluated: {done} of {pairs} candidate x image pairs ({done / pairs:.1%}, "
                         f"calibration and the current network's losses included); the fewest any exact row-by-row "
                         f"method could evaluate, knowing every outcome in advance: {least} ({least / pairs:.1%}).")
            notes += ["", *floor_table(done, evaluated, kinds), ""]
        print(rows[-1], flush=True)
    extra = (f"{torch.get_num_threads()} thread(s); per case {args.repeats} run(s) per method, interleaved, fast "
             "first; speedup = median naive / median fast; load = 1-minute load average before / after the case.")
    run.finish("\n".join(rows) + "\n\n" + "\n".join(notes), extra=extra, write=args.write)


if __name__ == "__main__":
    main()
