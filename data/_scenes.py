"""Fashion-MNIST scenes: a few real Fashion-MNIST items pasted on a blank canvas, for detection
and segmentation that train in CPU minutes.

Each scene is a 128x128 grey canvas holding 1 to ``MAX_ITEMS`` items. An item is scaled from
28x28 to a square side drawn in ``SIDES`` (bilinear) and placed at a random position; a
placement whose box overlaps an earlier box with IoU above ``MAX_IOU`` is redrawn (up to
``TRIES`` times, then the item is left out), so objects barely touch. An item's ink is its
pixels above ``INK`` (of 255); its box is the tight box of that ink and its mask marks the ink
with ``label + 1`` (0 is background). Where two items do overlap, the later one wins in both
the image and the mask; boxes stay the whole item's (what a detector should find).

One generation serves both data sets, ``fmnist_detection`` (targets: (4, 5) padded boxes) and
``fmnist_segmentation`` (targets: (128, 128) masks). Train scenes use items of Fashion-MNIST's
train split only and test scenes items of its test split only, each item at most once while
the split has unused ones. The draws are seeded per split (not by ``data.seed``), so every run
sees the same scenes; they are generated once and kept in memory and in
``$PRUNESEARCH_CACHE/scenes`` (default ``~/.cache/prunesearch/scenes``, the base models'
default cache), keyed by the source files' contents and every generation setting.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from . import _fashion_mnist as fmnist
from ._datasets import InMemoryDataset, normalise
from ._spec import DATASETS, DatasetNotFoundError, DatasetSpec, Parts

CANVAS = 128  # side of a scene, pixels
MAX_ITEMS = 4  # items per scene at most; also M, the rows of a detection target
SIDES = (24, 48)  # an item's side after scaling, inclusive range (28 px originally)
MAX_IOU = 0.1  # a placement overlapping an earlier box more than this is redrawn
TRIES = 50  # placements tried per item before it is left out
INK = 32  # pixel values above this (of 255) are the item's ink: its box and its mask
# Scenes per split: enough for a small detector or SegNet to learn on CPU in minutes. Module
# constants (not options) so tests can generate a few.
N_TRAIN_SCENES, N_TEST_SCENES = 6000, 1000
# Seeds of the generation per split: fixed, so every run sees the same scenes.
_SPLIT_SEEDS = {"train": 20_250_301, "test": 20_250_302}
# Bump when the generation changes, so stale cache files are not read.
_VERSION = 1
# Where generated scenes are saved; None: $PRUNESEARCH_CACHE/scenes (conf/config.yaml's default).
CACHE_DIR: Path | None = None
# Pixel statistics of the 6000 default train scenes, pixels in [0, 1] (mostly blank canvas).
MEAN, STD = (0.0589,), (0.1924,)

CLASS_NAMES = ("background", *fmnist.CLASS_NAMES)


@dataclass(frozen=True)
class Scenes:
    """One split of generated scenes, before normalisation.

    ``sources[n, j]`` is the Fashion-MNIST item behind row j of ``boxes[n]``, numbered in the
    train + test concatenation (train items 0..59,999, test items 60,000..69,999 for the real
    set), -1 for padding: what proves the splits share no item.
    """

    images: np.ndarray  # (N, 128, 128) uint8
    masks: np.ndarray  # (N, 128, 128) uint8: 0 background, 1..10 item label + 1
    boxes: np.ndarray  # (N, MAX_ITEMS, 5) float32 rows [label, x1, y1, x2, y2], padding -1
    sources: np.ndarray  # (N, MAX_ITEMS) int64


def render(item: np.ndarray, side: int) -> np.ndarray:
    """A 28x28 uint8 item scaled to (side, side) uint8 (bilinear, PIL's antialiasing)."""
    from PIL import Image

    return np.asarray(Image.fromarray(item).resize((side, side), Image.BILINEAR))


def _ink_box(ink: np.ndarray) -> np.ndarray | None:
    """[x1, y1, x2, y2] of the True pixels (x2, y2 exclusive: pixel c covers [c, c + 1)), or None."""
    cols, rows = np.flatnonzero(ink.any(axis=0)), np.flatnonzero(ink.any(axis=1))
    if len(cols) == 0:
        return None
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=np.int64)


def _iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    """IoU of one box with each of ``others`` (K, 4)."""
    lo, hi = np.maximum(box[:2], others[:, :2]), np.minimum(box[2:], others[:, 2:])
    inter = np.clip(hi - lo, 0, None).prod(axis=1)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return inter / (area(box) + area(others) - inter)


def compose(items: np.ndarray, labels: np.ndarray, n_scenes: int, seed: int, first_id: int = 0) -> Scenes:
    """``n_scenes`` scenes from ``items`` (K, 28, 28) uint8 with ``labels`` (K,) 0..9, seeded by
    ``seed``; ``first_id`` numbers the items in ``Scenes.sources``."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n_scenes, CANVAS, CANVAS), dtype=np.uint8)
    masks = np.zeros_like(images)
    boxes = np.full((n_scenes, MAX_ITEMS, 5), -1, dtype=np.float32)
    sources = np.full((n_scenes, MAX_ITEMS), -1, dtype=np.int64)
    queue: list[int] = []  # items not used yet, in a random order; refilled when it runs dry
    for n in range(n_scenes):
        placed: list[np.ndarray] = []
        for _ in range(int(rng.integers(1, MAX_ITEMS + 1))):
            if not queue:
                queue = rng.permutation(len(items)).tolist()
            k = queue.pop()
            side = int(rng.integers(SIDES[0], SIDES[1] + 1))
            patch = render(items[k], side)
            ink = patch > INK
            offset = _ink_box(ink)
            if offset is None:  # a blank item has nothing to find
                continue
            for _ in range(TRIES):
                x0, y0 = (int(v) for v in rng.integers(0, CANVAS - side + 1, size=2))
                box = offset + np.array([x0, y0, x0, y0])
                if not placed or _iou(box, np.stack(placed)).max() <= MAX_IOU:
                    break
            else:
                continue
            region = np.s_[y0 : y0 + side, x0 : x0 + side]
            # Ink overwrites (the later item wins); faint edges only brighten what lies below.
            images[n][region] = np.where(ink, patch, np.maximum(images[n][region], patch))
            masks[n][region][ink] = labels[k] + 1
            boxes[n, len(placed)] = [labels[k] + 1, *box]
            sources[n, len(placed)] = first_id + k
            placed.append(box)
    return Scenes(images, masks, boxes, sources)


def _read_sources(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for split, prefix in (("train", "train"), ("test", "test")):
        images = fmnist.read_idx(fmnist._file(folder, fmnist._FILES[f"{prefix}_images"]))  # noqa: SLF001
        labels = fmnist.read_idx(fmnist._file(folder, fmnist._FILES[f"{prefix}_labels"]))  # noqa: SLF001
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"{folder}: {prefix} images {images.shape} do not match labels {labels.shape}")
        out[split] = (images, labels)
    return out


def generate(folder: Path, n_train: int, n_test: int) -> dict[str, Scenes]:
    """Both splits, freshly generated from the Fashion-MNIST files in ``folder`` (no cache)."""
    src = _read_sources(folder)
    n_source_train = len(src["train"][0])
    return {
        "train": compose(*src["train"], n_train, _SPLIT_SEEDS["train"]),
        "test": compose(*src["test"], n_test, _SPLIT_SEEDS["test"], first_id=n_source_train),
    }


def _cache_key(folder: Path, n_train: int, n_test: int) -> str:
    """Names one generation: the source files' bytes and every setting that shapes a scene."""
    h = hashlib.blake2b(digest_size=12)
    settings = (_VERSION, CANVAS, MAX_ITEMS, SIDES, MAX_IOU, TRIES, INK, n_train, n_test, sorted(_SPLIT_SEEDS.items()))
    h.update(repr(settings).encode())
    for stem in fmnist._FILES.values():  # noqa: SLF001
        h.update(fmnist._file(folder, stem).read_bytes())  # noqa: SLF001  (30 MB: tens of ms)
    return h.hexdigest()


def _cache_dir() -> Path:
    if CACHE_DIR is not None:
        return Path(CACHE_DIR)
    return Path(os.environ.get("PRUNESEARCH_CACHE", "~/.cache/prunesearch")).expanduser() / "scenes"


def _read_cache(path: Path) -> dict[str, Scenes] | None:
    try:
        with np.load(path) as f:
            return {s: Scenes(*(f[f"{s}_{k}"] for k in ("images", "masks", "boxes", "sources")))
                    for s in ("train", "test")}
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):  # missing, partial or stale: regenerate
        return None


def _write_cache(path: Path, scenes: dict[str, Scenes]) -> None:
    arrays = {f"{s}_{k}": getattr(sc, k) for s, sc in scenes.items() for k in ("images", "masks", "boxes", "sources")}
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)  # mostly blank canvas: ~10x smaller than raw
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename: parallel workers generating the same scenes never read half a file.
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as f:
            f.write(buf.getvalue())
        os.replace(f.name, path)
    except OSError:  # a read-only cache only costs the next process a regeneration
        pass


@functools.lru_cache(maxsize=2)
def _scenes(folder: str, stamp: tuple[float, ...], n_train: int, n_test: int) -> dict[str, Scenes]:
    """Both splits, from the disk cache or generated (and saved). ``stamp`` (the source files'
    mtimes) makes a rewritten folder a new entry."""
    path = _cache_dir() / f"fmnist-scenes-{_cache_key(Path(folder), n_train, n_test)}.npz"
    scenes = _read_cache(path)
    if scenes is None:
        scenes = generate(Path(folder), n_train, n_test)
        _write_cache(path, scenes)
    for sc in scenes.values():  # shared by every caller in the process: nobody may edit them
        for array in (sc.images, sc.masks, sc.boxes, sc.sources):
            array.flags.writeable = False
    return scenes


def _cached(folder: Path) -> dict[str, Scenes]:
    files = [fmnist._file(folder, stem) for stem in fmnist._FILES.values()]  # noqa: SLF001
    return _scenes(str(folder), tuple(f.stat().st_mtime for f in files), N_TRAIN_SCENES, N_TEST_SCENES)


def _locate(name: str, root: Path | None, download: bool) -> Path:
    try:
        return fmnist._locate(root, download)  # noqa: SLF001  (same package)
    except DatasetNotFoundError as err:  # same files, but say which data set wanted them
        raise DatasetNotFoundError(f"{name} needs Fashion-MNIST: {err}") from None


def fmnist_scenes(root: str | Path | None = None) -> dict[str, Scenes]:
    """The generated scenes, ``{"train": ..., "test": ...}``, raw (uint8, before normalisation):
    what ``fmnist_detection`` and ``fmnist_segmentation`` serve. The arrays are read-only: one
    copy serves the whole process."""
    return _cached(_locate("fmnist_scenes", None if root is None else Path(root).expanduser(), False))


def _load(task: str, folder: Path, class_ids: Sequence[int] | None) -> Parts:
    scenes = _cached(folder)
    parts = {}
    for split, sc in scenes.items():
        # Copies (the cached arrays are read-only), so a caller may edit what it is served.
        images = normalise(torch.tensor(sc.images).unsqueeze(1), MEAN, STD)  # (N, 1, 128, 128)
        if task == "detection":
            targets = torch.tensor(sc.boxes)  # (N, 4, 5) float32
        else:
            # uint8, not int64: 8x less memory for 7000 masks (0.1 GB, not 0.9 GB) in every
            # process that holds the data; the segmentation task widens each batch for its loss.
            targets = torch.tensor(sc.masks, dtype=torch.uint8)  # (N, 128, 128)
        parts[split] = InMemoryDataset(images, targets)
    return Parts(train=parts["train"], train_eval=parts["train"], test=parts["test"])


for _task in ("detection", "segmentation"):
    DATASETS.register(
        f"fmnist_{_task}",
        DatasetSpec(
            input_shape=(1, CANVAS, CANVAS),
            locate=partial(_locate, f"fmnist_{_task}"),
            class_names=lambda _folder: list(CLASS_NAMES),
            load=partial(_load, _task),
            can_download=True,
            known_class_names=CLASS_NAMES,
            task=_task,
        ),
    )
