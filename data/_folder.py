"""Class-folder image datasets: ImageNet (``train/<class>/*``, ``val/<class>/*``) and any folder of
the user's images (``data=folder``, registered as ``image_folder``).

``image_folder`` reads ``root/train/<class>/*`` with ``root/test/`` or ``root/val/`` as the test
split when present; without one, or for a flat ``root/<class>/*`` tree, a fixed share of every
class is held out as the test split (``TEST_SHARE``, drawn per class with a seed derived from the
class name, so a class subset holds out the same files as the whole tree). ``data.size`` sets the
side of the square crop (ImageNet's transforms at that scale) for both.
"""

from __future__ import annotations

import copy
import hashlib
import os
import zlib
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from ._spec import DATASETS, DatasetNotFoundError, DatasetSpec, Parts

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP, RESIZE = 224, 256
# data.size: the square side images are served at (the first is the default); evaluation resizes
# to size * 256/224 first and centre-crops, as for ImageNet.
SIZES = ("224", "32", "28", "48", "64", "96", "112", "128", "160", "192", "256", "288", "320", "384", "448", "512")
# Share of each class held out as the test split of a folder without test/ or val/.
TEST_SHARE = 0.2
_SPLIT_DIRS = ("train", "val", "test")


# torchvision is imported inside the functions: it costs ~2 s, and in-memory datasets
# never need it.


def train_transform(size: int = CROP) -> Any:
    """The standard ImageNet training augmentation (He et al. 2016), ``size`` pixels square."""
    from torchvision import transforms as T

    return T.Compose([
        T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])  # fmt: skip


def eval_transform(size: int = CROP) -> Any:
    from torchvision import transforms as T

    return T.Compose([
        T.Resize(round(size * RESIZE / CROP)), T.CenterCrop(size), T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])  # fmt: skip


class ImageFiles(Dataset):
    """Image files with their labels, decoded and transformed on access."""

    def __init__(self, samples: list[tuple[str, int]], transform: Any):
        self.samples = samples  # (path, label id)
        self.targets = torch.tensor([label for _, label in samples], dtype=torch.int64)  # (N,)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        from torchvision.datasets.folder import default_loader

        path, label = self.samples[i]
        return self.transform(default_loader(path)), label

    def with_transform(self, transform: Any) -> ImageFiles:
        """The same samples (shared, not copied) under another transform."""
        other = copy.copy(self)
        other.transform = transform
        return other


def _scan(folder: Path, class_to_idx: dict[str, int], allow_empty: bool) -> list[tuple[str, int]]:
    """(path, id) of the images in ``folder/<class>/``, for the given classes only.

    The class -> id map comes from ``train/``, so ``val/`` gets the same ids even when it
    lacks a class, and with a class subset only the requested folders are scanned (a big
    saving on ImageNet's 1.28M files).
    """
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    return make_dataset(
        str(folder), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=allow_empty
    )


def _subdirs(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir())


def _test_dir(root: Path, test_dirs: tuple[str, ...]) -> Path | None:
    return next((root / d for d in test_dirs if (root / d).is_dir()), None)


def _train_dir(root: Path) -> Path:
    """``root/train``, or ``root`` itself for a flat ``root/<class>/*`` tree."""
    return root / "train" if (root / "train").is_dir() else root


def _locate(name: str, test_dirs: tuple[str, ...], held_out: bool, root: Path | None, download: bool) -> Path:
    layout = f"train/<class>/*.JPEG and {test_dirs[-1]}/<class>/*.JPEG"
    if held_out:
        layout = "<class>/<images> or train/<class>/<images> (with test/ or val/ when there is one)"
    if root is None:
        raise DatasetNotFoundError(f"{name}: data.root is unset; set data.root=<folder with {layout}>")
    if not held_out:
        if (root / "train").is_dir() and _test_dir(root, test_dirs) is not None:
            return root
        raise DatasetNotFoundError(
            f"{name}: expected {layout} under {root}; set data.root to that folder "
            "(ImageNet's official val images must first be sorted into class folders)"
        )
    if not root.is_dir():
        raise DatasetNotFoundError(f"{name}: data.root={root} is not a folder; it must hold {layout}")
    if not _class_names(root):
        raise DatasetNotFoundError(f"{name}: data.root={root} holds no class folders; it must hold {layout}")
    return root


def _class_names(root: Path) -> list[str]:
    train = _train_dir(root)
    names = _subdirs(train)
    return names if train is not root else [n for n in names if n not in _SPLIT_DIRS]


def _held_out(samples: list[tuple[str, int]], names: list[str]) -> tuple[list[int], list[int]]:
    """(train, test) positions in ``samples``: ``TEST_SHARE`` of every class with at least two
    images (at least one) to the test split, drawn by a generator seeded from the class name."""
    by_class: dict[int, list[int]] = {}
    for i, (_, label) in enumerate(samples):
        by_class.setdefault(label, []).append(i)
    train, test = [], []
    for label, rows in by_class.items():
        generator = torch.Generator().manual_seed(zlib.crc32(names[label].encode()))
        order = [rows[j] for j in torch.randperm(len(rows), generator=generator).tolist()]
        n_test = 0 if len(rows) < 2 else max(1, round(TEST_SHARE * len(rows)))
        test += order[:n_test]
        train += order[n_test:]
    return sorted(train), sorted(test)


def _load(
    name: str, test_dirs: tuple[str, ...], root: Path, class_ids: Sequence[int] | None, size: str = str(CROP)
) -> Parts:
    side = int(size)
    classes = _class_names(root)
    ids = range(len(classes)) if class_ids is None else class_ids
    class_to_idx = {classes[i]: i for i in ids}
    train_dir = _train_dir(root)
    test_root = _test_dir(root, test_dirs) if train_dir is not root else None
    if test_root is not None:
        extra = sorted(set(_subdirs(test_root)) - set(classes))
        if extra:
            raise ValueError(f"{name}: {test_root} has classes not in {train_dir}: {', '.join(extra[:5])}")
    samples = _scan(train_dir, class_to_idx, allow_empty=True)
    empty = sorted(set(class_to_idx) - {classes[label] for _, label in samples})
    if empty:
        from torchvision.datasets.folder import IMG_EXTENSIONS

        shown = ", ".join(empty[:5]) + (f", ... ({len(empty)} in all)" if len(empty) > 5 else "")
        raise DatasetNotFoundError(f"{name}: class folders without images under {train_dir}: {shown}; data.root "
                                   f"must hold a folder of images ({', '.join(IMG_EXTENSIONS)}) per class")
    if test_root is not None:
        test_samples = _scan(test_root, class_to_idx, allow_empty=True)
    else:
        keep, held = _held_out(samples, classes)
        samples, test_samples = [samples[i] for i in keep], [samples[i] for i in held]
    train = ImageFiles(samples, train_transform(side))
    # Same samples, no augmentation: the validation split is carved from train/.
    train_eval = train.with_transform(eval_transform(side))
    test = ImageFiles(test_samples, eval_transform(side))
    return Parts(train=train, train_eval=train_eval, test=test, input_shape=(3, side, side))


def _fingerprint(root: Path) -> str:
    """SHA-256 over every file's path (relative to ``root``) and size: another folder, or files
    added, removed or replaced by others of another size, train another base model."""
    digest = hashlib.sha256()
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for f in sorted(files):
            path = Path(folder) / f
            digest.update(f"{path.relative_to(root)}\0{path.stat().st_size}\n".encode())
    return digest.hexdigest()[:16]


# imagenet: the official layout, as the name promises (its cache key names it: no fingerprint);
# image_folder (data=folder): any folder of the user's images.
for _name, _test_dirs, _held in (("imagenet", ("val",), False), ("image_folder", ("test", "val"), True)):
    DATASETS.register(
        _name,
        DatasetSpec(
            input_shape=(3, CROP, CROP),
            locate=partial(_locate, _name, _test_dirs, _held),
            class_names=_class_names,
            load=partial(_load, _name, _test_dirs),
            options={"size": SIZES},
            fingerprint=_fingerprint if _held else None,
        ),
    )
