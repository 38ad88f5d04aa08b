"""Fashion-MNIST (Xiao et al. 2017) read offline from its IDX files."""

from __future__ import annotations

import gzip
import math
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ._datasets import InMemoryDataset, keep_classes, normalise
from ._spec import DATASETS, DatasetNotFoundError, DatasetSpec, Parts, where_searched

# Where Debian's `dataset-fashion-mnist` package installs the files; searched after
# data.root. A module constant so tests can switch the fallback off.
FALLBACK_DIRS: tuple[Path, ...] = (Path("/usr/share/datasets/fashion-mnist"),)

CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
MEAN, STD = (0.2860,), (0.3530,)  # of the 60,000 training images, pixels in [0, 1]

_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def read_idx(path: Path) -> np.ndarray:
    """An unsigned-byte IDX array (LeCun's MNIST format), plain or gzipped."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        buf = bytearray(f.read())  # writable, so torch.from_numpy does not warn
    if len(buf) < 4 or buf[0] != 0 or buf[1] != 0 or buf[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (header {bytes(buf[:4]).hex()})")
    ndim = buf[3]
    dims = struct.unpack(f">{ndim}I", bytes(buf[4 : 4 + 4 * ndim]))
    data = np.frombuffer(buf, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != math.prod(dims):
        raise ValueError(f"{path}: header says shape {dims} but holds {data.size} bytes")
    return data.reshape(dims)


def _file(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def _complete(folder: Path) -> bool:
    return all(_file(folder, stem) is not None for stem in _FILES.values())


def _locate(root: Path | None, download: bool) -> Path:
    # The system copy only when no root was given: a root that does not hold the files is a
    # mistake to name, not a reason to read other data under the given path's name.
    searched = [root, root / "FashionMNIST" / "raw"] if root is not None else list(FALLBACK_DIRS)
    for folder in searched:
        if _complete(folder):
            return folder
    if download and root is not None:
        return _download(root)
    if root is not None:
        raise DatasetNotFoundError(
            f"data.root={root} does not hold fashion_mnist's IDX files ({_FILES['train_images']}.gz, ...): looked "
            f"{where_searched(searched)}; set data.root to the folder holding them, data.root=null for the system "
            "copy, or data.download=true to download into it")
    raise DatasetNotFoundError(
        f"fashion_mnist: IDX files ({_FILES['train_images']}.gz, ...) not found {where_searched(searched)}; "
        "install it with `sudo apt-get install dataset-fashion-mnist`, "
        "set data.root=<folder with the files>, or pass data.download=true (with data.root)"
    )


def _download(root: Path) -> Path:
    from torchvision.datasets import FashionMNIST

    try:
        for train in (True, False):
            FashionMNIST(str(root), train=train, download=True)
    except Exception as e:  # network errors come in many types; report one line
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DatasetNotFoundError(
            f"fashion_mnist: download into {root} failed ({reason}); install it with "
            "`sudo apt-get install dataset-fashion-mnist` or set data.root=<folder with the files>"
        ) from e
    return root / "FashionMNIST" / "raw"


def _split(folder: Path, prefix: str) -> InMemoryDataset:
    images = read_idx(_file(folder, _FILES[f"{prefix}_images"]))  # (N, 28, 28) uint8
    labels = read_idx(_file(folder, _FILES[f"{prefix}_labels"]))  # (N,) uint8
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(
            f"{folder}: {prefix} images {images.shape} do not match labels {labels.shape}"
        )
    x = normalise(torch.from_numpy(images).unsqueeze(1), MEAN, STD)  # (N, 1, 28, 28)
    return InMemoryDataset(x, torch.from_numpy(labels).to(torch.int64))


def _load(folder: Path, class_ids: Sequence[int] | None) -> Parts:
    ids = None if class_ids is None else list(class_ids)
    train = keep_classes(_split(folder, "train"), ids)
    return Parts(train=train, train_eval=train, test=keep_classes(_split(folder, "test"), ids))


DATASETS.register(
    "fashion_mnist",
    DatasetSpec(
        input_shape=(1, 28, 28),
        locate=_locate,
        class_names=lambda _folder: list(CLASS_NAMES),
        load=_load,
        can_download=True,
        known_class_names=CLASS_NAMES,
    ),
)
