"""FLOPs-target planning: the analytical FLOPs model against the old copy-and-prune bisection.

``plan_ratios`` with ``prune.target_flops_reduction`` scales the schedule by a bisection. The
old planner (kept below as ``old_plan_ratios``, for this comparison only) deep-copied the
model and pruned every unit with ``prune_layer`` at each bisection step, then ran
``count_flops``; the new one evaluates a ``FlopsModel`` built once per plan. For each model
this script reports the median wall time of a whole plan (new; old where affordable, else
one old bisection step and the number of steps the old plan would take), the number of
bisection steps (FLOPs evaluations), and the FLOPs error of the plan: the analytical FLOPs
against ``count_flops`` of the model physically pruned with the planned ratios.

    python bench/flops_planning.py                      # resnet50 and small_cnn, 3 repeats
    python bench/flops_planning.py --quick              # small_cnn only, 1 repeat (seconds)
    python bench/flops_planning.py --old-full --write   # also time ResNet-50's whole old plan; write RESULTS.md

``--write`` replaces this script's section of bench/RESULTS.md (the other sections stay).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


from bench.report import BenchRun  # noqa: E402
from trainables import build_model, count_flops, describe_units, prune_layer  # noqa: E402
from trainables.core.surgery import Unit  # noqa: E402
from trainables.protocol.config import PruneConfig  # noqa: E402
from trainables.protocol.planning import _MAX_UNIT_RATIO, FlopsModel, _bisect_scale, plan_ratios  # noqa: E402
from trainables.protocol.schedules import kept_count, make_ratios  # noqa: E402

SECTION = "## FLOPs-target planning: analytical FLOPs model vs copy-and-prune bisection"
PRUNE = dict(schedule="differential_depth", ratio_low=0.1, ratio_high=0.5, target_flops_reduction=0.5)


# --- the old planner, as it was in trainables/protocol/planning.py before the FLOPs model -------------


def old_flops_with_ratios(model: nn.Module, units: list[Unit], ratios: Sequence[float], round_to: int) -> int:
    """FLOPs of ``model`` with ``ratios`` applied; structure only, so the first filters are kept."""
    probe = copy.deepcopy(model)
    for u, r in zip(units, ratios, strict=True):
        prune_layer(probe, u.name, list(range(kept_count(u.n_filters, r, round_to))))
    return count_flops(probe)


def old_bisect_scale(reduction: Callable[[float], float], target: float, cap: float, round_to: int) -> float:
    """The old bisection, verbatim (it returned the last midpoint, whichever side of a jump)."""
    if reduction(cap) < target - 0.02:
        raise ValueError(f"prune.target_flops_reduction={target} is out of reach: at most {reduction(cap):.3f}")
    lo, hi = 0.0, cap
    for _ in range(30):
        mid = (lo + hi) / 2
        got = reduction(mid)
        if abs(got - target) <= 0.005:
            break
        lo, hi = (mid, hi) if got < target else (lo, mid)
    if abs(reduction(mid) - target) > 0.02:
        raise ValueError(f"prune.target_flops_reduction={target} cannot be met within 2% with round_to={round_to}")
    return mid


def _shape(units: list[Unit], prune: PruneConfig) -> list[float]:
    ratios = make_ratios(prune.schedule, [u.n_filters for u in units], ratio=prune.ratio, ratio_low=prune.ratio_low,
                         ratio_high=prune.ratio_high, ratios=prune.ratios)
    return ratios if max(ratios) > 0 else [1.0] * len(units)


def old_plan_ratios(model: nn.Module, units: list[Unit], prune: PruneConfig, steps: list | None = None) -> list[float]:
    """The old ``plan_ratios`` for a FLOPs target; appends each FLOPs evaluation's time to ``steps``."""
    shape = _shape(units, prune)
    base = count_flops(model)

    def reduction(scale: float) -> float:
        t0 = time.perf_counter()
        got = 1.0 - old_flops_with_ratios(model, units, [s * scale for s in shape], prune.round_to) / base
        if steps is not None:
            steps.append(time.perf_counter() - t0)
        return got

    scale = old_bisect_scale(reduction, prune.target_flops_reduction, _MAX_UNIT_RATIO / max(shape), prune.round_to)
    return [s * scale for s in shape]


# --- measurements ------------------------------------------------------------------------


def new_steps(flops: FlopsModel, units: list[Unit], prune: PruneConfig) -> tuple[int, float]:
    """FLOPs evaluations of the new bisection, and the mean time of one (seconds)."""
    shape, calls = _shape(units, prune), []

    def reduction(scale: float) -> float:
        t0 = time.perf_counter()
        got = 1.0 - flops.flops_with_ratios([s * scale for s in shape], prune.round_to) / flops.base
        calls.append(time.perf_counter() - t0)
        return got

    _bisect_scale(reduction, prune.target_flops_reduction, _MAX_UNIT_RATIO / max(shape), prune.round_to)
    return len(calls), statistics.mean(calls)


def old_steps_count(flops: FlopsModel, units: list[Unit], prune: PruneConfig) -> tuple[int, bool]:
    """FLOPs evaluations the old bisection makes, and whether it finds a plan: it sees the same
    (exact) FLOPs, so replaying it on the FLOPs model counts its steps without paying for them."""
    shape, calls = _shape(units, prune), []

    def reduction(scale: float) -> float:
        calls.append(1)
        return 1.0 - flops.flops_with_ratios([s * scale for s in shape], prune.round_to) / flops.base

    try:
        old_bisect_scale(reduction, prune.target_flops_reduction, _MAX_UNIT_RATIO / max(shape), prune.round_to)
    except ValueError:  # it stopped on the far side of a jump the target falls in
        return len(calls), False
    return len(calls), True


def pruned_flops(model: nn.Module, units: list[Unit], ratios: Sequence[float], round_to: int) -> int:
    return old_flops_with_ratios(model, units, ratios, round_to)


def bench_model(name: str, repeats: int, old_full: bool) -> list[dict]:
    model = build_model(name)
    units = describe_units(model)
    base = count_flops(model)
    rows = []
    for round_to in (1, 8):
        prune = PruneConfig(round_to=round_to, **PRUNE)
        walls, builds = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            ratios = plan_ratios(model, units, prune)
            walls.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            flops = FlopsModel(model, units)
            builds.append(time.perf_counter() - t0)
        n_new, step_s = new_steps(flops, units, prune)
        predicted = flops.flops_with_ratios(ratios, round_to)
        actual = pruned_flops(model, units, ratios, round_to)
        old_steps, old_ok = old_steps_count(flops, units, prune)
        row = dict(model=name, round_to=round_to, units=len(units), new_s=statistics.median(walls),
                   build_s=statistics.median(builds), new_steps=n_new, new_step_s=step_s,
                   old_steps=old_steps if old_ok else f"{old_steps}, then refused", predicted=predicted,
                   actual=actual, rel_err=abs(predicted - actual) / actual, reduction=1 - actual / base)
        if round_to == 1 and old_ok:
            row.update(_old(model, units, prune, repeats, old_full or len(units) < 10, ratios))
        rows.append(row)
        print(row, flush=True)
    return rows


def _old(model: nn.Module, units: list[Unit], prune: PruneConfig, repeats: int, full: bool, new: list) -> dict:
    """The old planner: whole plans (median wall), or only its FLOPs evaluations (median)."""
    if full:
        walls, steps = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            ratios = old_plan_ratios(model, units, prune, steps)
            walls.append(time.perf_counter() - t0)
        return dict(old_s=statistics.median(walls), old_step_s=statistics.median(steps), old_full=True,
                    same_plan=ratios == new)
    shape = _shape(units, prune)
    steps = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        old_flops_with_ratios(model, units, [0.5 * s for s in shape], prune.round_to)
        steps.append(time.perf_counter() - t0)
    return dict(old_s=None, old_step_s=statistics.median(steps), old_full=False, same_plan=None)


def table(rows: list[dict]) -> str:
    lines = [
        "| model | round_to | units | new plan, s (median) | of which FlopsModel build, s | new steps "
        "| one new step, us | old plan, s | one old step, s | old steps | plan speed-up | same plan as old "
        "| analytical FLOPs | count_flops (pruned) | rel. error | reduction reached |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        old_s, step = r.get("old_s"), r.get("old_step_s")
        est = old_s if old_s is not None else (step * r["old_steps"] if step is not None else None)  # type: ignore[operator]
        old_txt = "-" if est is None else (f"{old_s:.2f}" if old_s is not None else f"~{est:.0f} (steps x step)")
        speed = "-" if est is None else f"{est / r['new_s']:.0f}x"
        same = {None: "-", True: "yes", False: "no"}[r.get("same_plan")]
        lines.append(
            f"| {r['model']} | {r['round_to']} | {r['units']} | {r['new_s']:.3f} | {r['build_s']:.3f} "
            f"| {r['new_steps']} | {r['new_step_s'] * 1e6:.0f} | {old_txt} | {'-' if step is None else f'{step:.2f}'} "
            f"| {r['old_steps']} | {speed} | {same} | {r['predicted']} | {r['actual']} "
            f"| {r['rel_err']:.1e} | {r['reduction']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["resnet50", "small_cnn"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--old-full", action="store_true", help="time whole old plans on big models too (minutes)")
    ap.add_argument("--quick", action="store_true", help="small_cnn, 1 repeat")
    ap.add_argument("--write", action="store_true", help="replace this script's section of bench/RESULTS.md")
    args = ap.parse_args()
    if args.quick:
        args.models, args.repeats = ["small_cnn"], 1
    run = BenchRun(SECTION)
    # The first FlopCounterMode of a process imports torch._dynamo (seconds); count_flops pays it
    # too. Timed once here, so that the medians below are steady-state planning.
    cold_model = build_model("small_cnn")
    tc = time.perf_counter()
    FlopsModel(cold_model, describe_units(cold_model))
    cold_s = time.perf_counter() - tc
    rows = [row for name in args.models for row in bench_model(name, args.repeats, args.old_full)]
    body = (
        f"Target: `{PRUNE}`, input = each model's own shape (ResNet-50: 3x224x224, small_cnn: 1x28x28), "
        f"{args.repeats} repeats, medians. First FlopsModel of the process (torch._dynamo import, paid once by "
        f"any FlopCounterMode user): {cold_s:.2f} s, not in the medians.\n\n"
        + table(rows)
    )
    run.finish(body, write=args.write)


if __name__ == "__main__":
    main()
