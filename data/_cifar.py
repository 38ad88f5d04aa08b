"""CIFAR-10 and CIFAR-100 (Krizhevsky 2009) from the official python pickle batches."""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._datasets import InMemoryDataset, keep_classes, normalise
from ._spec import DATASETS, DatasetNotFoundError, DatasetSpec, Parts, where_searched

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip


@dataclass(frozen=True)
class _Layout:
    name: str
    subdir: str  # what the official archive extracts to
    train_files: tuple[str, ...]
    test_file: str
    meta_file: str
    label_key: str
    names_key: str
    # Per-channel statistics of the training images, pixels in [0, 1]. The CIFAR-10 std is
    # the per-pixel one; the widespread (0.2023, 0.1994, 0.2010) is a std of channel means.
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    torchvision_class: str


_CIFAR10 = _Layout(
    "cifar10", "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test_batch", "batches.meta", "labels", "label_names",
    (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), "CIFAR10",
)  # fmt: skip
_CIFAR100 = _Layout(
    "cifar100", "cifar-100-python", ("train",),
    "test", "meta", "fine_labels", "fine_label_names",
    (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), "CIFAR100",
)  # fmt: skip


def _unpickle(path: Path) -> dict[str, Any]:
    # latin1 reads the original python-2 pickles; keys may still come back as bytes.
    with open(path, "rb") as f:
        raw = pickle.load(f, encoding="latin1")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}


def _complete(layout: _Layout, folder: Path) -> bool:
    files = (*layout.train_files, layout.test_file, layout.meta_file)
    return all((folder / f).is_file() for f in files)


def _locate(layout: _Layout, root: Path | None, download: bool) -> Path:
    searched = [root, root / layout.subdir] if root is not None else []
    for folder in searched:
        if _complete(layout, folder):
            return folder
    if download and root is not None:
        return _download(layout, root)
    raise DatasetNotFoundError(
        f"{layout.name}: pickle batches ({', '.join(layout.train_files[:1])}, "
        f"{layout.test_file}, {layout.meta_file}) not found {where_searched(searched)}; set "
        f"data.root=<folder containing {layout.subdir}/> or pass data.download=true (with data.root)"
    )


def _download(layout: _Layout, root: Path) -> Path:
    import torchvision.datasets

    try:
        getattr(torchvision.datasets, layout.torchvision_class)(str(root), download=True)
    except Exception as e:  # network errors come in many types; report one line
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DatasetNotFoundError(
            f"{layout.name}: download into {root} failed ({reason}); "
            f"set data.root=<folder containing {layout.subdir}/>"
        ) from e
    return root / layout.subdir


def _class_names(layout: _Layout, folder: Path) -> list[str]:
    return [str(n) for n in _unpickle(folder / layout.meta_file)[layout.names_key]]


def _read(layout: _Layout, folder: Path, files: Sequence[str]) -> InMemoryDataset:
    batches = [_unpickle(folder / f) for f in files]
    data = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches])
    labels = np.concatenate([np.asarray(b[layout.label_key], dtype=np.int64) for b in batches])
    # Rows are 1024 red, then green, then blue values, each a 32x32 image in row order.
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32))  # (N, 3, 32, 32) uint8
    return InMemoryDataset(normalise(images, layout.mean, layout.std), torch.from_numpy(labels))


def _load(layout: _Layout, folder: Path, class_ids: Sequence[int] | None) -> Parts:
    ids = None if class_ids is None else list(class_ids)
    train = keep_classes(_read(layout, folder, layout.train_files), ids)
    test = keep_classes(_read(layout, folder, (layout.test_file,)), ids)
    return Parts(train=train, train_eval=train, test=test)


for _layout, _known in ((_CIFAR10, CIFAR10_CLASSES), (_CIFAR100, None)):
    DATASETS.register(
        _layout.name,
        DatasetSpec(
            input_shape=(3, 32, 32),
            locate=partial(_locate, _layout),
            class_names=partial(_class_names, _layout),
            load=partial(_load, _layout),
            can_download=True,
            known_class_names=_known,
        ),
    )
