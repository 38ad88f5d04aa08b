"""The ImageNet-style data path: JPEG images decoded and fed per second, on CPU.

Generates (once, seeded, cached) a class-folder data set of 224x224 JPEGs, loads it with
``data.get_data("image_folder")`` and reads its training split through ``data.iterate_batches``
with the ImageNet training transform (random resized crop, flip, normalise), as fine-tuning does:

1. one process, ``num_workers`` = 0, 1, 2 loader processes: images/s over one whole epoch,
   worker start-up included, and the time to the first batch (what a new loader costs);
2. two data-parallel CPU ranks (``torch.multiprocessing`` + gloo, an all-reduce per step so the
   ranks move in lockstep as DDP does): each rank decoding only its half of every epoch
   (``shard=(rank, 2)``), side by side with the old way, every rank decoding the whole epoch and
   keeping batches rank, rank + 2, ... of it.

    python bench/data_path.py                      # 3000 images over 10 classes, 3 repeats
    python bench/data_path.py --quick              # 256 images, 1 repeat: a smoke test
    python bench/data_path.py --images 3000 --repeats 3 --write

Variants are interleaved within each repeat, so slow drift on a shared machine hits all alike;
medians are reported, with the 1-minute load average before and after. ``--write`` replaces
this script's section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import machine_header, write_section  # noqa: E402  (bench/ is on sys.path)
from data import get_data, iterate_batches  # noqa: E402

SECTION = "## Data path: ImageNet-style folders, loader workers and per-rank sharding"
SIDE, N_CLASSES, VAL_PER_CLASS = 224, 10, 4
IMAGENET_TRAIN = 1_281_167  # images in ImageNet-1k's training set


# --- the generated image folder ------------------------------------------------------------


def make_folder(n_images: int, seed: int, cache: Path) -> Path:
    """``train/<class>/*.jpg`` (n_images) and ``val/<class>/*.jpg``: smooth seeded colour fields
    plus grain, so the JPEGs are about photo-sized (tens of kB) rather than incompressible noise."""
    from PIL import Image

    root = cache / f"image_folder_{n_images}x{SIDE}_seed{seed}"
    done = root / "COMPLETE"
    if done.exists():
        return root
    rng = np.random.default_rng(seed)
    for split, count in (("train", n_images), ("val", VAL_PER_CLASS * N_CLASSES)):
        for i in range(count):
            c = i % N_CLASSES
            folder = root / split / f"class_{c:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            coarse = rng.integers(0, 256, size=(7, 7, 3), dtype=np.uint8)
            smooth = np.asarray(Image.fromarray(coarse).resize((SIDE, SIDE), Image.BICUBIC), dtype=np.int16)
            grain = rng.integers(-12, 13, size=(SIDE, SIDE, 3), dtype=np.int16)
            pixels = np.clip(smooth + grain, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{split}_{i:05d}.jpg", quality=90)
    done.write_text("ok\n")
    return root


# --- one process, num_workers loader processes -----------------------------------------------


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (loader workers are joined at the
    end of an epoch): unlike wall time, barely moved by other jobs on a shared machine."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def time_epoch(batches) -> tuple[float, float, int, float]:
    """(seconds to the first batch, seconds for the whole epoch, images, CPU seconds) of one
    batch iterator."""
    t0, c0 = time.perf_counter(), cpu_seconds()
    first, n = None, 0
    for x, _ in batches:
        if first is None:
            first = time.perf_counter() - t0
        n += len(x)
    return first or 0.0, time.perf_counter() - t0, n, cpu_seconds() - c0


def bench_workers(root: Path, workers: list[int], batch_size: int, repeats: int) -> dict[int, list[tuple]]:
    splits = get_data("image_folder", root, val_size=0, seed=0)
    samples: dict[int, list[tuple]] = {w: [] for w in workers}
    for rep in range(repeats):
        for w in workers:  # interleaved: each repeat times every worker count once
            batches = iterate_batches(
                splits.train, batch_size, shuffle=True, seed=rep, drop_last=True, num_workers=w
            )
            samples[w].append(time_epoch(batches))
            _, t, n, cpu = samples[w][-1]
            print(f"  repeat {rep} num_workers={w}: {n / t:.0f} images/s, {1000 * cpu / n:.1f} CPU ms/image", flush=True)
    return samples


# --- two data-parallel ranks -----------------------------------------------------------------


def _rank_main(rank: int, world: int, port: int, root: str, batch_size: int, repeats: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    splits = get_data("image_folder", root, val_size=0, seed=0)
    token = torch.zeros(1)

    def epoch(mode: str, seed: int) -> tuple[float, int, float]:
        if mode == "sharded":  # this rank reads and decodes only its batches
            batches = iterate_batches(
                splits.train, batch_size, shuffle=True, seed=seed, drop_last=True, shard=(rank, world)
            )
        else:  # before: the whole epoch decoded on every rank, batches rank, rank + world, ... kept
            full = iterate_batches(splits.train, batch_size, shuffle=True, seed=seed, drop_last=True)
            steps = len(splits.train) // (batch_size * world)
            batches = itertools.islice(full, rank, steps * world, world)
        dist.barrier()
        t0, c0 = time.perf_counter(), cpu_seconds()
        n = 0
        for x, _ in batches:
            dist.all_reduce(token)  # DDP's gradient sync keeps the ranks in step; this stands in for it
            n += len(x)
        cpu = cpu_seconds() - c0
        dist.barrier()
        return time.perf_counter() - t0, n, cpu

    rows = []
    for rep in range(repeats):
        for mode in ("sharded", "every_rank_decodes_all"):
            rows.append((mode, rep, *epoch(mode, seed=100 + rep)))
    torch.save(rows, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def bench_ddp(root: Path, batch_size: int, repeats: int, tmp: Path, world: int = 2) -> dict[str, list[tuple]]:
    """Per epoch: (images fed per second to all ranks together, each epoch's wall being the
    slower rank's; CPU ms per image fed, all ranks)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp.mkdir(parents=True, exist_ok=True)
    mp.spawn(_rank_main, args=(world, port, str(root), batch_size, repeats, str(tmp)), nprocs=world, join=True)
    per_rank = [torch.load(tmp / f"rank{r}.pt") for r in range(world)]
    out: dict[str, list[tuple]] = {}
    for rows in zip(*per_rank, strict=True):
        mode = rows[0][0]
        wall, fed, cpu = max(r[2] for r in rows), sum(r[3] for r in rows), sum(r[4] for r in rows)
        out.setdefault(mode, []).append((fed / wall, 1000 * cpu / fed))
    return out


# --- report ----------------------------------------------------------------------------------


def _runs(xs: list[float], fmt: str = "{:.0f}") -> str:
    return ", ".join(fmt.format(x) for x in xs)


def render(args, root: Path, workers: dict[int, list[tuple]], ddp: dict[str, list[tuple]], loads, seconds) -> str:
    size_kb = sum(p.stat().st_size for p in (root / "train").rglob("*.jpg")) / args.images / 1024
    lines = [
        machine_header(
            sys.argv, seconds,
            f"1-minute load average {loads[0]:.2f} before, {loads[1]:.2f} after (2 cores shared with other jobs).",
        ),
        f"Data: {args.images} generated {SIDE}x{SIDE} JPEGs (mean {size_kb:.0f} kB) in {N_CLASSES} classes, "
        f"`image_folder` training split, ImageNet training transform, batch {args.batch_size}, "
        f"one torch thread per process, {args.repeats} interleaved repeats (medians). CPU ms per image "
        "counts the loader processes too; on a shared machine it moves far less than wall time.",
        "",
        "### One process, `data.num_workers` loader processes",
        "",
        "| num_workers | images/s | vs 0 | CPU ms per image | time to first batch (s) | runs (images/s) |",
        "|---|---|---|---|---|---|",
    ]
    medians = {w: statistics.median([n / t for _, t, n, _ in runs]) for w, runs in workers.items()}
    for w, runs in workers.items():
        rates = [n / t for _, t, n, _ in runs]
        ratio = f"{medians[w] / medians[0]:.2f}x" if 0 in medians else "-"
        cpu = statistics.median([1000 * c / n for _, _, n, c in runs])
        first = statistics.median([f for f, _, _, _ in runs])
        lines.append(f"| {w} | {medians[w]:.0f} | {ratio} | {cpu:.1f} | {first:.2f} | {_runs(rates)} |")
    if 0 in workers and len(workers) > 1:
        w_max = max(workers)
        start = statistics.median([f for f, _, _, _ in workers[w_max]]) - statistics.median(
            [f for f, _, _, _ in workers[0]]
        )
        epoch = statistics.median([t for _, t, _, _ in workers[w_max]])
        lines += [
            "",
            f"Loader processes add throughput only where cores are free; their CPU cost per image is "
            f"higher (batches are pickled between processes). Starting {w_max} workers delays the first "
            f"batch by {start:.1f} s, once per epoch ({100 * start / epoch:.0f}% of this {args.images}-image "
            f"epoch; an ImageNet epoch is {IMAGENET_TRAIN // args.images}x longer), which is why the per-epoch "
            "loaders do not keep "
            "persistent workers.",
        ]
    if ddp:
        lines += [
            "",
            "### Two data-parallel CPU ranks (gloo), `num_workers=0` in each",
            "",
            "| each rank decodes | images fed/s, both ranks | CPU ms per image fed | runs (images/s) |",
            "|---|---|---|---|",
        ]
        summary = {}
        for mode, label in (("sharded", "only its half (`shard=(rank, 2)`)"),
                            ("every_rank_decodes_all", "the whole epoch, keeps half (before)")):
            rates, cpus = [r for r, _ in ddp[mode]], [c for _, c in ddp[mode]]
            summary[mode] = statistics.median(rates), statistics.median(cpus)
            lines.append(f"| {label} | {summary[mode][0]:.0f} | {summary[mode][1]:.1f} | {_runs(rates)} |")
        (new, new_cpu), (old, old_cpu) = summary["sharded"], summary["every_rank_decodes_all"]
        lines += ["", f"Sharding before decoding: {new / old:.2f}x the images fed per second with 2 ranks, "
                      f"{old_cpu / new_cpu:.2f}x less CPU per image fed."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-ddp", action="store_true", help="skip the two-rank comparison")
    parser.add_argument("--quick", action="store_true", help="256 images, 1 repeat")
    parser.add_argument("--cache", default=os.environ.get("PRUNESEARCH_CACHE", "~/.cache/prunesearch"))
    parser.add_argument("--write", action="store_true", help="replace this section of bench/RESULTS.md")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.repeats = 256, 1
    for key in ("images", "batch_size", "repeats"):
        if getattr(args, key) < 1:
            parser.exit(2, f"error: --{key.replace('_', '-')} must be an integer >= 1, but got {getattr(args, key)}\n")
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    cache = Path(args.cache).expanduser() / "bench_data_path"
    root = make_folder(args.images, args.seed, cache)
    print(f"image folder: {root} ({time.perf_counter() - t0:.0f} s)", flush=True)
    load_before = os.getloadavg()[0]
    workers = bench_workers(root, args.workers, args.batch_size, args.repeats)
    ddp = {} if args.no_ddp else bench_ddp(root, args.batch_size, args.repeats, cache / "ddp_rows")
    load_after = os.getloadavg()[0]
    text = render(args, root, workers, ddp, (load_before, load_after), time.perf_counter() - t0)
    print(text)
    if args.write:
        write_section(SECTION, text)


if __name__ == "__main__":
    main()
