"""Class-folder image datasets (ImageNet layout: ``train/<class>/*``, ``val/<class>/*``)."""

from __future__ import annotations

import copy
import os
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


# torchvision is imported inside the functions: it costs ~2 s, and in-memory datasets
# never need it.


def train_transform() -> Any:
    """The standard ImageNet training augmentation (He et al. 2016)."""
    from torchvision import transforms as T

    return T.Compose([
        T.RandomResizedCrop(CROP), T.RandomHorizontalFlip(), T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])  # fmt: skip


def eval_transform() -> Any:
    from torchvision import transforms as T

    return T.Compose([
        T.Resize(RESIZE), T.CenterCrop(CROP), T.ToTensor(),
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


def _locate(name: str, test_dirs: tuple[str, ...], root: Path | None, download: bool) -> Path:
    layout = f"train/<class>/*.JPEG and {test_dirs[-1]}/<class>/*.JPEG"
    if root is None:
        raise DatasetNotFoundError(
            f"{name}: data.root is unset; set data.root=<folder with {layout}>"
        )
    if (root / "train").is_dir() and _test_dir(root, test_dirs) is not None:
        return root
    raise DatasetNotFoundError(
        f"{name}: expected {layout} under {root}; set data.root to that folder "
        "(ImageNet's official val images must first be sorted into class folders)"
    )


def _class_names(root: Path) -> list[str]:
    return _subdirs(root / "train")


def _load(
    name: str, test_dirs: tuple[str, ...], root: Path, class_ids: Sequence[int] | None
) -> Parts:
    classes = _class_names(root)
    ids = range(len(classes)) if class_ids is None else class_ids
    class_to_idx = {classes[i]: i for i in ids}
    test_root = _test_dir(root, test_dirs)
    extra = sorted(set(_subdirs(test_root)) - set(classes))
    if extra:
        raise ValueError(
            f"{name}: {test_root} has classes not in {root / 'train'}: {', '.join(extra[:5])}"
        )
    try:
        train = ImageFiles(
            _scan(root / "train", class_to_idx, allow_empty=False), train_transform()
        )
    except FileNotFoundError as e:
        raise DatasetNotFoundError(
            f"{name}: {str(e).splitlines()[0]} (under {root / 'train'})"
        ) from e
    # Same samples, no augmentation: the validation split is carved from train/.
    train_eval = train.with_transform(eval_transform())
    test = ImageFiles(_scan(test_root, class_to_idx, allow_empty=True), eval_transform())
    return Parts(train=train, train_eval=train_eval, test=test)


for _name, _test_dirs in (("imagenet", ("val",)), ("image_folder", ("test", "val"))):
    DATASETS.register(
        _name,
        DatasetSpec(
            input_shape=(3, CROP, CROP),
            locate=partial(_locate, _name, _test_dirs),
            class_names=_class_names,
            load=partial(_load, _name, _test_dirs),
        ),
    )
