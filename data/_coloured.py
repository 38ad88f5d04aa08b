"""Coloured Fashion-MNIST: each grey item tinted with a hue on a dark background of another.

Fashion-MNIST is greyscale, so a network trained on it can have no colour filters; this set
gives its first layer colour to use, or to ignore. Each image ``g`` (ink share in [0, 1]) becomes
``rgb = background * (1 - g) + foreground * g`` with

* foreground: hue ``h``, saturation in [0.7, 1], value in [0.75, 1];
* background: any hue, saturation in [0.3, 1], value in [0, 0.3] (dark).

The option ``colour`` says where ``h`` comes from:

* ``random`` (the default): uniform in [0, 1), drawn independently of the label, so colour
  carries no label information and a colour filter can only be a by-product;
* ``label`` (the control): inside the label's own band, ``h = (label + 0.1 + 0.8 u) / 10``,
  so the hue alone names the class and colour filters are useful.

Both variants draw the same random numbers (seeded by split, not by ``data.seed``), so an
image differs between them only in its foreground hue. Train images come from Fashion-MNIST's
train split and test images from its test split. Pixels are normalised per channel with the
mean and standard deviation of the (whole) coloured train split of the variant.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from . import _fashion_mnist as fmnist
from ._datasets import InMemoryDataset, keep_classes, normalise
from ._spec import DATASETS, DatasetNotFoundError, DatasetSpec, Parts

COLOURS = ("random", "label")  # values of the `colour` option; the first is the default
# Seeds of the colour draws per split: fixed, so every run sees the same images.
_SPLIT_SEEDS = {"train": 20_240_901, "test": 20_240_902}
_CHUNK = 8192  # images coloured at once: bounds the float32 scratch memory to ~80 MB


def _locate(root: Path | None, download: bool) -> Path:
    try:
        return fmnist._locate(root, download)  # noqa: SLF001  (same package)
    except DatasetNotFoundError as err:  # same files, but say which data set wanted them
        raise DatasetNotFoundError(f"coloured_fashion_mnist needs Fashion-MNIST: {err}") from None


def hues(labels: np.ndarray, u: np.ndarray, colour: str) -> np.ndarray:
    """Foreground hue in [0, 1) per image from uniform draws ``u`` (see the module docstring)."""
    if colour == "random":
        return u
    return (labels.astype(np.float64) + 0.1 + 0.8 * u) / 10.0


def colourise(grey: np.ndarray, labels: np.ndarray, colour: str, seed: int) -> np.ndarray:
    """(N, 28, 28) uint8 grey images -> (N, 3, 28, 28) uint8 coloured ones, seeded by ``seed``."""
    from matplotlib.colors import hsv_to_rgb  # vectorised HSV -> RGB

    n = len(grey)
    rng = np.random.default_rng(seed)
    # All draws up front, in one fixed order, so both variants share every number but the hue.
    u = rng.random(n)
    fg_hsv = np.stack([hues(labels, u, colour), rng.uniform(0.7, 1.0, n), rng.uniform(0.75, 1.0, n)], axis=1)
    bg_hsv = np.stack([rng.random(n), rng.uniform(0.3, 1.0, n), rng.uniform(0.0, 0.3, n)], axis=1)
    fg = hsv_to_rgb(fg_hsv).astype(np.float32)  # (N, 3)
    bg = hsv_to_rgb(bg_hsv).astype(np.float32)
    out = np.empty((n, 3, *grey.shape[1:]), dtype=np.uint8)
    for s in range(0, n, _CHUNK):
        g = grey[s : s + _CHUNK, None].astype(np.float32) / 255.0  # (B, 1, H, W)
        f, b = fg[s : s + _CHUNK, :, None, None], bg[s : s + _CHUNK, :, None, None]  # (B, 3, 1, 1)
        out[s : s + _CHUNK] = np.rint((b + (f - b) * g) * 255.0)
    return out


def _raw_split(folder: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    images = fmnist.read_idx(fmnist._file(folder, fmnist._FILES[f"{prefix}_images"]))  # (N, 28, 28) uint8
    labels = fmnist.read_idx(fmnist._file(folder, fmnist._FILES[f"{prefix}_labels"]))  # (N,) uint8
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{folder}: {prefix} images {images.shape} do not match labels {labels.shape}")
    return images, labels


@functools.lru_cache(maxsize=2)
def _coloured(folder: str, stamp: tuple[float, ...], colour: str) -> dict:
    """Both splits coloured (uint8) and the train split's channel statistics, kept in memory:
    colouring all 70,000 images takes seconds, and the report reads each variant several times.
    ``stamp`` (the files' mtimes) makes a rewritten folder a new entry."""
    out: dict = {}
    for split in ("train", "test"):
        images, labels = _raw_split(Path(folder), split)
        out[split] = (torch.from_numpy(colourise(images, labels, colour, _SPLIT_SEEDS[split])),
                      torch.from_numpy(labels.astype(np.int64)))
    # Statistics of the whole train split, before any class subset, so a subset's pixels are unchanged.
    x = out["train"][0]  # (N, 3, 28, 28) uint8
    total = torch.zeros(3, dtype=torch.float64)
    squares = torch.zeros(3, dtype=torch.float64)
    for s in range(0, len(x), _CHUNK):  # chunked: a float copy of the whole split would be 0.5 GB
        chunk = x[s : s + _CHUNK].to(torch.float64).div_(255)
        total += chunk.sum(dim=(0, 2, 3))
        squares += chunk.square().sum(dim=(0, 2, 3))
    count = x.numel() // 3
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(1e-12).sqrt()
    out["mean"], out["std"] = tuple(mean.tolist()), tuple(std.tolist())
    return out


def _cached(folder: Path, colour: str) -> dict:
    files = [fmnist._file(folder, stem) for stem in fmnist._FILES.values()]
    return _coloured(str(folder), tuple(f.stat().st_mtime for f in files), colour)


def channel_stats(root: str | Path | None = None, colour: str = COLOURS[0]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per RGB channel that ``get_data("coloured_fashion_mnist", root, options={"colour":
    colour})`` normalised its pixels (in [0, 1]) with: what undoing the normalisation needs
    (a greyscale version of an image, say). Cheap after ``get_data`` in the same process."""
    if colour not in COLOURS:
        raise ValueError(f"data.colour must be one of {', '.join(COLOURS)}, but got {colour!r}")
    data = _cached(_locate(None if root is None else Path(root).expanduser(), False), colour)
    return data["mean"], data["std"]


def _load(folder: Path, class_ids: Sequence[int] | None, colour: str = COLOURS[0]) -> Parts:
    if colour not in COLOURS:
        raise ValueError(f"data.colour must be one of {', '.join(COLOURS)}, but got {colour!r}")
    data = _cached(folder, colour)
    ids = None if class_ids is None else list(class_ids)
    parts = {split: keep_classes(InMemoryDataset(normalise(data[split][0], data["mean"], data["std"]), data[split][1]), ids)
             for split in ("train", "test")}
    return Parts(train=parts["train"], train_eval=parts["train"], test=parts["test"])


DATASETS.register(
    "coloured_fashion_mnist",
    DatasetSpec(
        input_shape=(3, 28, 28),
        locate=_locate,
        class_names=lambda _folder: list(fmnist.CLASS_NAMES),
        load=_load,
        can_download=True,
        known_class_names=fmnist.CLASS_NAMES,
        options={"colour": COLOURS},
    ),
)
