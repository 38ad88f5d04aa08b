"""Mittal et al.'s plasticity result at small scale, on the embedded default.

Base small CNN on Fashion-MNIST, 50% uniform layer-by-layer pruning, p and q from the
config, for several criteria and seeds. For each: the accuracy with every unit pruned and
no fine-tuning at all (the raw damage of the criterion), the mean per-unit damage during
the layer-by-layer protocol, the final validation and test accuracy (recovery) and the
FLOPs ratio.

    python bench/plasticity.py                       # random l1 apoz taylor car, seeds 0 1
    python bench/plasticity.py --criteria random l1 --seeds 0 --overrides prune.q=2

Prints a markdown table; ``--write`` also replaces its section in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import write_section  # noqa: E402  (one writer of RESULTS.md sections)
from data import iterate_batches  # noqa: E402
from trainables.cli.base_model import prepare  # noqa: E402
from trainables.cli.compose import configs_of, load_run_config  # noqa: E402
from trainables.core.metrics import evaluate  # noqa: E402
from trainables.protocol.stages import run_protocol  # noqa: E402

SECTION = "## Plasticity: damage and recovery per criterion (Mittal et al.)"


def one_criterion(base, splits, cfg, criterion: str, seed: int) -> dict:
    prune, finetune, measure, _ = configs_of(cfg)
    prune.criterion = criterion
    measure.latency = False
    # Raw damage: every unit pruned at once, no fine-tuning.
    raw = run_protocol(copy.deepcopy(base), splits, dataclasses.replace(prune, method="one_shot", q=0.0), finetune,
                       measure=measure, seed=seed)
    rec = run_protocol(copy.deepcopy(base), splits, prune, finetune, measure=measure, seed=seed)
    drops = [rec["base_val_acc"] - u["damage_val_acc"] for u in rec["units"]]
    return {
        "criterion": criterion, "seed": seed, "base_val": rec["base_val_acc"],
        "raw_damage_val": raw["final_val_acc"], "mean_unit_drop": statistics.mean(drops),
        "final_val": rec["final_val_acc"], "final_test": rec["final_test_acc"],
        "flops_ratio": rec["flops_after"] / rec["flops_before"], "wall_s": rec["wall_s"],
    }


def table(rows: list[dict], base_test: float) -> str:
    out = ["| criterion | seeds | no-finetune val acc (all units pruned) | mean per-unit drop | final val acc | final test acc | test vs base | FLOPs ratio |",
           "|---|---|---|---|---|---|---|---|"]
    for crit in dict.fromkeys(r["criterion"] for r in rows):
        rs = [r for r in rows if r["criterion"] == crit]
        m = lambda k, rs=rs: statistics.mean(r[k] for r in rs)  # noqa: E731
        out.append(
            f"| {crit} | {len(rs)} | {100 * m('raw_damage_val'):.2f} | {100 * m('mean_unit_drop'):.2f} pts | "
            f"{100 * m('final_val'):.2f} | {100 * m('final_test'):.2f} | {100 * (m('final_test') - base_test):+.2f} pts | {m('flops_ratio'):.3f} |"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--criteria", nargs="+", default=["random", "l1", "apoz", "taylor", "car"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--overrides", nargs="*", default=[], help="Hydra overrides, e.g. prune.q=2")
    ap.add_argument("--write", action="store_true", help="write the table into bench/RESULTS.md")
    ap.add_argument("--json", type=Path, help="also dump the raw rows here")
    args = ap.parse_args()

    cfg = load_run_config(["progress=false", *args.overrides])
    t0 = time.perf_counter()
    base, splits, _, meta = prepare(cfg)
    prune, finetune, _, _ = configs_of(cfg)
    test_batches = iterate_batches(splits.test, finetune.eval_batch_size, shuffle=False)
    base_test = evaluate(base, test_batches, classes=splits.eval_classes)["top1"]
    rows = []
    for seed in args.seeds:
        for crit in args.criteria:
            row = one_criterion(base, splits, cfg, crit, seed)
            rows.append(row)
            print(json.dumps(row), flush=True)
    text = table(rows, base_test)
    header = (
        f"Base small_cnn: val {100 * rows[0]['base_val']:.2f}%, test {100 * base_test:.2f}%. "
        f"50% uniform layer-by-layer, p={prune.p}, q={prune.q}, lr={finetune.lr}, scoring {prune.score_batches}x{prune.score_batch_size} images.\n"
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}. "
        f"Command: `python bench/plasticity.py {' '.join(sys.argv[1:])}` ({time.perf_counter() - t0:.0f}s, {time.strftime('%Y-%m-%d')}).\n"
    )
    print(header)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if args.write:
        write_section(SECTION, header + "\n" + text + "\n")


if __name__ == "__main__":
    main()
