"""What a model from outside the project costs before training starts, on CPU.

``model=torchvision|timm|custom`` resolves a qualified name (importing the source, checking the
name), then ``check_model_fits`` builds the model once and runs one forward pass on two blank
images of the data's shape: the probe that refuses a model that does not take the data. This
script times the three steps per model and input size (medians of ``--repeats``, one torch
thread), so the overhead can be weighed against a base model's training.

    python bench/sources_probe.py                       # 5 models, 32 and 224 px, 3 repeats
    python bench/sources_probe.py --models torchvision:resnet50 --sizes 224 --repeats 5
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

DEFAULT_MODELS = ["custom:examples.tiny_custom:net", "torchvision:mobilenet_v3_small", "torchvision:efficientnet_b0",
                  "torchvision:resnet50", "timm:resnet18d"]


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(name: str, size: int, repeats: int) -> dict:
    from trainables.core.models import MODELS, build_model, check_model_fits

    channels = 1 if name.startswith("custom:examples") else 3
    shape = (channels, size, size)
    resolve = _time(lambda: MODELS.get(name))  # first lookup: import + name check (kept afterwards)
    builds, probes = [], []
    for _ in range(repeats):
        builds.append(_time(lambda: build_model(name, num_classes=10)))
        probes.append(_time(lambda: check_model_fits(name, {}, shape, 10, data_name="bench")))
    return {"model": name, "size": size, "resolve_s": resolve, "build_s": statistics.median(builds),
            "probe_s": statistics.median(probes)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--sizes", nargs="+", type=int, default=[32, 224])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    # The repository root, as `python -m` from there would have it: examples/ is not installed.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, one thread; probe = build + one forward pass on 2 blank images")
    print(f"{'model':<34} {'size':>4} {'resolve s':>9} {'build s':>8} {'probe s':>8}")
    for name in args.models:
        if name.startswith("timm:") and importlib.util.find_spec("timm") is None:
            print(f"{name:<34} (timm not installed: pip install -e '.[timm]')")
            continue
        for size in args.sizes:
            row = measure(name, size, args.repeats)
            print(f"{row['model']:<34} {size:>4} {row['resolve_s']:>9.3f} {row['build_s']:>8.3f} {row['probe_s']:>8.3f}")


if __name__ == "__main__":
    main()
