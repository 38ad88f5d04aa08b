"""Base-model training under faults, run for real through ``python -m trainables.pretrain``:

* killed (SIGKILL) once its checkpoint of epoch K is written, K = 1 and K = 5 of 6, then run
  again: it resumes, and its final weights are compared with an uninterrupted run's;
* its cache entry truncated to half, then run again: what it says, and whether the entry it
  trains again equals the first.

    python bench/base_resume.py                    # small_cnn, 6 epochs, 6,000 Fashion-MNIST images
    python bench/base_resume.py --train 60000      # the whole training set (slow on a laptop)

The data are the first ``--train`` training images of the real Fashion-MNIST (Debian's files,
copied to a temporary folder in the same IDX format) and its whole test set. Every run uses one
thread (``threads=1``), as the comparison needs one summation order. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.metadata
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from conftest import write_idx  # noqa: E402

from trainables.cli.base_model import _atomic_save, partial_checkpoint_path  # noqa: E402

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def _read_idx(path: Path) -> np.ndarray:
    raw = gzip.decompress(path.read_bytes())
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def subset_folder(source: Path, n_train: int, folder: Path) -> Path:
    """The first ``n_train`` training images of ``source`` and its whole test set, as IDX .gz files."""
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", None)):
        for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
            array = _read_idx(source / f"{prefix}-{kind}.gz")
            write_idx(folder / f"{prefix}-{kind}", array[:n] if n else array)
    return folder


class Pretrain:
    """The pretrain command line of one configuration, in cache folders of one's choosing."""

    def __init__(self, data: Path, epochs: int, val_size: int):
        self.epochs = epochs
        self.args = [f"data.root={data}", f"data.val_size={val_size}", f"model.pretrain.epochs={epochs}",
                     "progress=false", "threads=1", "model.name=small_cnn"]
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

    def cmd(self, cache: Path) -> list[str]:
        return [sys.executable, "-m", "trainables.pretrain", *self.args, f"cache_dir={cache}"]

    def run(self, cache: Path) -> tuple[subprocess.CompletedProcess, float]:
        t0 = time.perf_counter()
        done = subprocess.run(self.cmd(cache), cwd=ROOT, env=self.env, capture_output=True, text=True, check=False)
        return done, time.perf_counter() - t0

    def kill_after(self, cache: Path, epoch: int) -> tuple[int, float, dict]:
        """Start a run and SIGKILL it once its checkpoint holds ``epoch`` epochs; the epoch it held
        when killed (a later one if it went on meanwhile), the seconds it ran and that checkpoint."""
        t0 = time.perf_counter()
        proc = subprocess.Popen(self.cmd(cache), cwd=ROOT, env=self.env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        seen, held = None, 0
        try:
            while proc.poll() is None and held < epoch:
                found = list(cache.rglob("*.partial"))
                stat = found[0].stat() if found else None
                if stat is not None and (stat.st_ino, stat.st_mtime_ns) != seen:
                    seen = (stat.st_ino, stat.st_mtime_ns)
                    held = torch.load(found[0], weights_only=True)["epoch"]
                time.sleep(0.02)
            if proc.poll() is not None:
                raise SystemExit(f"the run ended before its epoch-{epoch} checkpoint could be caught")
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait()
        [partial] = cache.rglob("*.partial")
        return held, time.perf_counter() - t0, torch.load(partial, weights_only=True)


def _state(cache: Path) -> dict:
    [entry] = (cache / "base_models").glob("*.pt")
    return torch.load(entry, weights_only=True)


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=6000, help="training images taken from Fashion-MNIST")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--kill-after", type=int, nargs="+", default=[1, 5], help="epochs done when killed")
    args = ap.parse_args(argv)
    if not 1 <= args.train <= 60000:
        ap.error(f"--train must be in [1, 60000], but got {args.train}")
    if any(not 1 <= k < args.epochs for k in args.kill_after):
        ap.error(f"--kill-after must be in [1, --epochs={args.epochs}), but got {args.kill_after}")
    with tempfile.TemporaryDirectory(prefix="base_resume_") as tmp:
        work = Path(tmp)
        data = subset_folder(FMNIST, args.train, work / "data")
        bench = Pretrain(data, args.epochs, val_size=max(1, args.train // 6))
        rows = []
        whole, whole_s = bench.run(work / "whole")
        assert whole.returncode == 0, whole.stderr[-2000:]
        reference = _state(work / "whole")
        rows.append(f"| uninterrupted | - | - | {whole_s:.0f} | - | - | {reference['meta']['val_acc']:.4f} |")
        for k in args.kill_after:
            cache = work / f"killed{k}"
            held, killed_s, kept = bench.kill_after(cache, k)
            resumed, resumed_s = bench.run(cache)
            assert resumed.returncode == 0, resumed.stderr[-2000:]
            said = [line for line in resumed.stdout.splitlines() if line.startswith("resuming")]
            state = _state(cache)
            diff = _max_diff(state["state_dict"], reference["state_dict"])
            left = sorted("<entry>" + p.name[p.name.index(".pt"):] for p in (cache / "base_models").iterdir())
            rows.append(f"| killed after epoch {held} | {killed_s:.0f} | `{said[0].split(' (')[0] if said else 'no'}` | "
                        f"{resumed_s:.0f} | {diff:.3g} | {', '.join(left)} | {state['meta']['val_acc']:.4f} |")
        # The per-epoch cost of keeping the state: the last killed run's checkpoint written again
        # (median of 5) and its size.
        probe = partial_checkpoint_path(work / "probe.pt")
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            _atomic_save(kept, probe)
            times.append(time.perf_counter() - t0)
        size_mb = probe.stat().st_size / 1e6
        # A damaged cache entry: truncated to half, then the same command again.
        [entry] = (work / "whole" / "base_models").glob("*.pt")
        entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])
        again, again_s = bench.run(work / "whole")
        damaged = [line for line in again.stdout.splitlines() if " is damaged " in line]
        retrained = _max_diff(_state(work / "whole")["state_dict"], reference["state_dict"])
        aside = [p.name for p in (work / "whole" / "base_models").glob("*.damaged-*")]

    versions = ", ".join(f"{p} {importlib.metadata.version(p)}" for p in ("torch", "torchvision"))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}, {versions}")
    print(f"small_cnn, {args.train} Fashion-MNIST training images ({args.train // 6} held out for validation), "
          f"{args.epochs} epochs, batch 128, one thread\n")
    print("| run | killed after s | resumed run says | resumed run s | max abs weight diff vs uninterrupted "
          "| files left | val_acc |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\nper-epoch checkpoint (model, SGD momentum, LR schedule, RNG; {size_mb:.2f} MB):"
          f" {statistics.median(times) * 1000:.0f} ms to write (median of 5)")
    print(f"damaged entry (truncated to half): exit {again.returncode}, {again_s:.0f} s; it said: "
          f"`{damaged[0] if damaged else 'nothing'}`; moved aside as {aside}; retrained weights vs the first: "
          f"max abs diff {retrained:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
