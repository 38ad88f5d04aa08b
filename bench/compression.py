"""The compression table of issue 14: CAR filter pruning, then Deep Compression, over seeds.

    python bench/compression.py                          # the default (conf/compress.yaml), seeds 0 1 2
    python bench/compression.py --seeds 0 --write compress.sparsity=[0.6,0.85]

Each seed is one ``python -m trainables.compress`` process on the same cached base model
(``base_seed=0``): the seed changes the scoring batches, the fine-tuning order and dropout.
``--jobs`` runs that many seeds at once (one torch thread each); the table is read from the
runs' ``record.json`` files. Per stage the table
gives the median (and range) over seeds of the layers' bits, their ratio to the dense
float32 layers and the validation accuracy after the stage's fine-tuning. ``--write``
replaces this script's section of bench/RESULTS.md. Runs use one torch thread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import BenchRun  # noqa: E402
from trainables.compress import load_compress_config  # noqa: E402
from trainables.experiments.compression import STAGES  # noqa: E402

SECTION = "## Compression of the pruned layers: CAR + Deep Compression (issue 14)"


def _med(values: list[float], fmt: str) -> str:
    med = statistics.median(values)
    if len(values) == 1 or min(values) == max(values):
        return format(med, fmt)
    return f"{format(med, fmt)} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def table(records: list[dict]) -> str:
    names = [r["name"] for r in records[0]["layers"]]
    head = ("| stage | val acc % | " + " | ".join(f"{n} bits | {n} ratio" for n in names)
            + " | both bits | both ratio | both ratio with bias |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for s in STAGES:
        cells = []
        for i in range(len(names)):
            cells += [_med([r["layers"][i]["bits"][s] for r in records], ".0f"),
                      _med([r["layers"][i]["ratio"][s] for r in records], ".1f")]
        tot = [r["total"] for r in records]
        lines.append(f"| {s} | {_med([100 * r['val_acc'][s] for r in records], '.2f')} | " + " | ".join(cells)
                     + f" | {_med([t['bits'][s] for t in tot], '.0f')} | {_med([t['ratio'][s] for t in tot], '.1f')}"
                     + f" | {_med([t['ratio_with_bias'][s] for t in tot], '.1f')} |")
    return "\n".join(lines)


def per_seed(records: list[dict], seeds: list[int]) -> str:
    names = [r["name"] for r in records[0]["layers"]]
    lines = ["| seed | base val % | final val % | loss (points) | test % | " + " | ".join(f"{n} x" for n in names)
             + " | both x | wall s |", "|" + "---|" * (6 + len(names) + 1)]
    for seed, r in zip(seeds, records, strict=True):
        lines.append(f"| {seed} | {100 * r['val_acc']['base']:.2f} | {100 * r['val_acc']['huffman']:.2f} | "
                     f"{r['accuracy_loss_points']:.2f} | {100 * r['final_test_acc']:.2f} | "
                     + " | ".join(f"{layer['ratio']['huffman']:.1f}" for layer in r["layers"])
                     + f" | {r['total']['ratio']['huffman']:.1f} | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def run_seeds(seeds: list[int], overrides: list[str], jobs: int) -> list[dict]:
    """One ``trainables.compress`` process per seed, ``jobs`` at a time; their records in seed order."""
    fixed = [*overrides, "base_seed=0", "threads=1", "progress=false"]
    load_compress_config([*fixed, f"seed={seeds[0]}"])  # a bad override fails here, once, before any run
    pending, running, paths = list(seeds), {}, {}
    while pending or running:
        while pending and len(running) < max(1, jobs):
            seed = pending.pop(0)
            running[seed] = subprocess.Popen([sys.executable, "-m", "trainables.compress", *fixed, f"seed={seed}"],
                                             cwd=ROOT, stdout=subprocess.PIPE, text=True)
        time.sleep(2)
        for seed, proc in list(running.items()):
            if proc.poll() is None:
                continue
            out = proc.stdout.read().strip().splitlines()
            del running[seed]
            if proc.returncode != 0 or not out:
                raise RuntimeError(f"seed {seed}: trainables.compress exited with {proc.returncode}")
            paths[seed] = Path(out[-1])
            print(f"seed {seed}: {paths[seed]}", flush=True)
    return [json.loads(paths[s].read_text()) for s in seeds]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=1, help="seeds run at once (one torch thread each)")
    parser.add_argument("--write", action="store_true", help="replace this script's section of bench/RESULTS.md")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of conf/compress.yaml")
    args = parser.parse_args()
    run = BenchRun(SECTION)
    records = run_seeds(args.seeds, args.overrides, args.jobs)
    cfg = records[0]["config"]
    c = cfg["compress"]
    layers = ", ".join(f"`{row['name']}`" for row in records[0]["layers"])
    body = (
        f"Model `{cfg['model']['name']}` on `{cfg['data']['name']}` (base model: seed 0, cached), layers "
        f"{layers}; structural step `{records[0]['criterion']}`, "
        f"filter_ratio {c['filter_ratio']}, sparsity {c['sparsity']}, bits {c['bits']} "
        f"(2**bits - 1 centroids + the zero code), index_bits {c['index_bits']}; fine-tuning "
        f"{c['filter_epochs']} / {c['prune_epochs']} / {c['quant_epochs']} epochs after stages 1 / 2 / 3 "
        f"(lr {cfg['finetune']['lr']}, stage 3 lr {c['quant_lr']}). Seeds {', '.join(map(str, args.seeds))}: "
        "median (min-max). Bits count the conv weights as Deep Compression does (sparse entries with "
        "relative indices and fillers, 32-bit centroids, Huffman streams plus their tables; see "
        "`trainables/experiments/compression.py`); `with bias` adds 32 bits per kept filter's bias, which is not "
        "compressed. Ratios are to the dense float32 original layer; stage 4 (Huffman) is lossless, and its "
        "accuracy is measured on the model rebuilt from the decoded storage.\n\n"
        + table(records) + "\n\nPer seed (after stage 4):\n\n" + per_seed(records, args.seeds) + "\n"
    )
    run.finish(body, write=args.write)


if __name__ == "__main__":
    main()
