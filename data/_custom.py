"""Data sets from a user's factory: ``data=custom data.factory=<module>:<callable>``.

The factory is called with no argument, or with ``root=<data.root>`` when ``data.root`` is set
(it must then accept ``root``). It returns the train and test ``Dataset``s, either as a pair
``(train, test)`` or as a mapping ``{"train": ..., "test": ..., "val": ..., "classes": [...]}``
whose ``val`` (a validation set of its own, used instead of a seeded carve-out; then
``data.val_size`` must be 0) and ``classes`` (names of label ids 0..K-1) are optional. Items
are ``(image, label)``: a float (C, H, W) tensor, the same shape throughout, and an int label in
0..K-1. A ``TensorDataset`` of (images, labels) is held in memory (fast batches); any other
``Dataset`` is read per item and should carry ``.targets`` (else its labels are read once by
iterating it). From there the project's seeded validation split, class subsets, data fraction,
sharding across ranks and scoring batches work on it as on any registered data set.

The source is registered as ``custom`` on the data set registry: ``get_data("custom:<module>:
<callable>", root)`` is all a Ray worker needs, provided the module imports there too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, TensorDataset

from ._datasets import InMemoryDataset, take
from ._factory import import_factory, source_digest, takes_keyword
from ._spec import DATASETS, DatasetSpec, Parts

_KEYS = ("train", "test", "val", "classes")
_RETURNS = ('(train, test) Datasets or a mapping with "train" and "test" Datasets and optionally "val" '
            '(a Dataset) and "classes" (names of labels 0..K-1)')
# (factory spec, root) -> what it returned, checked: class_names and load both need it, and a
# factory may be slow (reading files), so it runs once per process.
_MADE: dict[tuple[str, str | None], dict[str, Any]] = {}


class LabelledDataset(Dataset):
    """A user's ``Dataset`` with its (N,) int64 labels as ``.targets`` (what splits and class
    subsets read without touching the images); items pass through unchanged."""

    def __init__(self, base: Dataset, targets: torch.Tensor):
        self.base = base
        self.targets = targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        image, _ = self.base[i]
        return image, int(self.targets[i])


def _refuse(spec: str, what: str) -> ValueError:
    return ValueError(f"data.factory={spec} must return {_RETURNS}, but {what}")


def _as_parts(spec: str, made: Any) -> dict[str, Any]:
    """The factory's return value as {"train", "test", "val", "classes"}, or a one-line refusal."""
    if isinstance(made, Mapping):
        unknown = sorted(set(made) - set(_KEYS))
        missing = [k for k in ("train", "test") if made.get(k) is None]
        if unknown or missing:
            raise _refuse(spec, f"it returned a mapping with keys {sorted(made)}")
        return {k: made.get(k) for k in _KEYS}
    if isinstance(made, (tuple, list)) and len(made) == 2:
        return {"train": made[0], "test": made[1], "val": None, "classes": None}
    raise _refuse(spec, f"it returned a {type(made).__name__}")


def _labelled(spec: str, split: str, ds: Any) -> Dataset:
    """``ds`` checked (a non-empty data set of (float (C, H, W) image, int label) items) and
    given int64 ``.targets``."""
    if not (hasattr(ds, "__len__") and hasattr(ds, "__getitem__")):
        raise _refuse(spec, f"its {split} is a {type(ds).__name__}, not a Dataset")
    if len(ds) == 0:
        raise _refuse(spec, f"its {split} set is empty")
    item = ds[0]
    if not (isinstance(item, (tuple, list)) and len(item) == 2):
        raise _refuse(spec, f"{split}[0] is a {type(item).__name__}, not an (image, label) pair")
    image, label = item
    if not (isinstance(image, torch.Tensor) and image.dim() == 3 and image.is_floating_point()):
        what = f"a {image.dtype} tensor of shape {tuple(image.shape)}" if isinstance(image, torch.Tensor) \
            else f"a {type(image).__name__}"
        raise _refuse(spec, f"the image of {split}[0] is {what}, not a float (C, H, W) tensor (use ToTensor())")
    if not _is_label(label):
        raise _refuse(spec, f"the label of {split}[0] is {label!r}, not an integer class id")
    if isinstance(ds, TensorDataset) and len(ds.tensors) == 2:
        images, labels = ds.tensors
        return InMemoryDataset(images.to(torch.float32), labels.to(torch.int64))
    targets = getattr(ds, "targets", None)
    if targets is None:  # read every label once; a .targets attribute spares the image reads
        targets = [ds[i][1] for i in range(len(ds))]
    targets = torch.as_tensor(targets, dtype=torch.int64).flatten()
    if len(targets) != len(ds):
        raise _refuse(spec, f"{split}.targets has {len(targets)} labels for {len(ds)} items")
    return LabelledDataset(ds, targets)


def _is_label(label: Any) -> bool:
    if isinstance(label, torch.Tensor):
        return label.dim() == 0 and not label.is_floating_point() and label.dtype != torch.bool
    return isinstance(label, int) and not isinstance(label, bool)


def _check(spec: str, made: Any) -> dict[str, Any]:
    parts = _as_parts(spec, made)
    sets = {k: _labelled(spec, k, parts[k]) for k in ("train", "test", "val") if parts[k] is not None}
    shapes = {k: tuple(ds[0][0].shape) for k, ds in sets.items()}
    if len(set(shapes.values())) > 1:
        raise _refuse(spec, f"its images differ in shape between sets: {shapes}")
    top = max(int(ds.targets.max()) for ds in sets.values())
    low = min(int(ds.targets.min()) for ds in sets.values())
    classes = parts["classes"]
    if classes is None:
        classes = [str(i) for i in range(top + 1)]
    elif isinstance(classes, str) or not isinstance(classes, Sequence) or not all(
            isinstance(c, str) for c in classes) or len(set(classes)) != len(classes):
        raise _refuse(spec, f"its classes are {classes!r}, not a list of distinct names")
    if low < 0 or top >= len(classes):
        raise _refuse(spec, f"its labels span {low}..{top}, outside 0..{len(classes) - 1} (one per class name)")
    return {**sets, "classes": list(classes), "input_shape": shapes["train"]}


def _made(spec: str, root: Path | None) -> dict[str, Any]:
    key = (spec, None if root is None else str(root))
    if key not in _MADE:
        factory = import_factory(spec, "data.factory")
        if root is not None and not takes_keyword(factory, "root"):
            raise ValueError(f"data.root must be null for data.factory={spec} (it takes no root argument), "
                             f"but got {str(root)!r}")
        made = factory(**({"root": str(root)} if root is not None else {}))
        _MADE[key] = _check(spec, made)
    return _MADE[key]


def _keep(ds: Dataset | None, class_ids: Sequence[int] | None) -> Dataset | None:
    """The items of ``ds`` whose label is in ``class_ids`` (all when None), ids unchanged."""
    if ds is None or class_ids is None:
        return ds
    rows = torch.isin(ds.targets, torch.tensor(list(class_ids), dtype=torch.int64)).nonzero().flatten()
    return take(ds, rows, None)


def _resolve(spec: str) -> DatasetSpec:
    import_factory(spec, "data.factory")  # an unknown factory fails at the config check

    def load(folder: Path | None, class_ids: Sequence[int] | None) -> Parts:
        made = _made(spec, folder)
        train = _keep(made["train"], class_ids)
        return Parts(train=train, train_eval=train, test=_keep(made["test"], class_ids),
                     input_shape=made["input_shape"], val=_keep(made.get("val"), class_ids))

    return DatasetSpec(
        # Known only from the data: every load reports it in Parts.input_shape.
        input_shape=(0, 0, 0),
        locate=lambda root, download: root,
        class_names=lambda folder: _made(spec, folder)["classes"],
        load=load,
        fingerprint=lambda folder: f"{source_digest(spec)[:16]}:{folder}",
    )


DATASETS.add_source("custom", _resolve)
