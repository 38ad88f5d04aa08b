"""``get_data``: argument checks, class subsets and the train / val / test splits."""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ._datasets import take, targets_of
from ._spec import DATASETS
from ._splits import split_indices

# Up to this many valid names are listed in an error; beyond, the list is cut short.
_MAX_LISTED = 100


@dataclass(frozen=True)
class DataSplits:
    """The three splits of one dataset and what a model needs to know about them.

    For classification every split has ``.targets``, an (N,) int64 tensor of label ids. In
    detection and segmentation a sample's target is padded boxes or a label mask (formats in
    ``DatasetSpec``); in-memory splits hold them all in ``.targets``, file-backed ones (VOC,
    COCO) read them per image and have no ``.targets``. In-memory splits are
    ``InMemoryDataset``s whose ``.images`` (N, C, H, W) ``iterate_batches`` slices directly.
    """

    train: Dataset  # the fine-tuning set (after `fraction`), disjoint from val, with training augmentation
    val: Dataset  # fixed validation split carved from the training set (seeded)
    test: Dataset  # the official test split; only read for final figures
    num_classes: int  # width of the model head; detection and segmentation count background (id 0)
    class_names: list[str]  # names for label ids 0..num_classes-1
    input_shape: tuple[int, int, int]  # (C, H, W) of one image
    # With `remap_labels=False` and a class subset: the label ids to score on; else None.
    eval_classes: list[int] | None
    # The samples of `train`, in the same order, under the evaluation transform: what scoring
    # and BN re-estimation read (augmented crops would score filters on images nobody deploys).
    # For in-memory data sets (no augmentation) it is the same object as `train`.
    train_eval: Dataset | None = None
    num_workers: int = 0  # DataLoader worker processes for file-backed splits (JPEG decoding)
    # Training images before `fraction` was applied: a fine-tuning budget in epochs of the full
    # set keeps the number of optimiser steps fixed while the fraction varies (data efficiency).
    train_size_full: int | None = None
    # Original label ids of the kept classes, in label order (label j of a remapped subset is
    # class class_ids[j] of the whole data set); None when every class is kept. What cutting a
    # classifier head to the subset needs (trainables.core.models.cut_head).
    class_ids: list[int] | None = None
    # Classes of the whole data set, subset or not: the head width of a model trained on all of them.
    source_num_classes: int | None = None
    task: str = "classification"  # one of data.TASKS: what the targets are
    data_root: str | None = None  # the folder the data was read from (a fallback's too, where data.root was null)

    def __post_init__(self) -> None:
        if self.train_eval is None:
            object.__setattr__(self, "train_eval", self.train)
        if self.train_size_full is None:
            object.__setattr__(self, "train_size_full", len(self.train))
        if self.source_num_classes is None:
            object.__setattr__(self, "source_num_classes", self.num_classes)


def list_datasets() -> list[str]:
    """Names accepted by ``get_data`` (``data.name`` in the config)."""
    return DATASETS.names()


def known_class_names(name: str) -> list[str] | None:
    """Class names of dataset ``name`` (ids 0..K-1) known without reading a file, else None
    (class-folder datasets learn theirs from the folder); for checks before any work."""
    known = DATASETS.get(name).known_class_names
    return list(known) if known is not None else None


def dataset_task(name: str) -> str:
    """What data set ``name`` is labelled for: classification, detection or segmentation."""
    return DATASETS.get(name).task


def dataset_fingerprint(name: str, root: str | os.PathLike[str] | None) -> str | None:
    """What identifies the content of data set ``name`` at ``root`` where its name does not (a
    folder of the user's images, a user's factory), for the base model's cache key; None for
    the data sets whose name says what they hold (the key stays as it was)."""
    spec = DATASETS.get(name)
    if spec.fingerprint is None:
        return None
    return spec.fingerprint(spec.locate(None if root is None else Path(root).expanduser(), False))


def dataset_options(name: str) -> dict[str, tuple[str, ...]]:
    """The data set's own settings (``data.<key>``) and their allowed values, default first;
    ``{}`` for most data sets. ``get_data(name, options={key: value})`` sets them."""
    return dict(DATASETS.get(name).options)


def get_data(
    name: str,
    root: str | os.PathLike[str] | None = None,
    *,
    download: bool = False,
    val_size: int | float = 5000,
    seed: int = 0,
    classes: Sequence[str | int] | None = None,
    remap_labels: bool = True,
    fraction: float = 1.0,
    num_workers: int = 0,
    split_before_subset: bool = False,
    options: Mapping[str, str] | None = None,
) -> DataSplits:
    """Load dataset ``name`` and split it into train / val / test.

    ``val_size`` images (an int) or that share of the training set (a float in (0, 1)) are
    set aside as the validation split, stratified by class and seeded by ``seed``; then
    ``fraction`` of the rest is kept for fine-tuning, also stratified (the data-efficiency
    study of Mittal et al. 2019), smaller fractions being subsets of larger ones.
    ``classes`` (names or ids) restricts all three splits; ``remap_labels`` relabels them
    0..k-1 in the order given, otherwise labels and head width stay as they are and
    ``eval_classes`` lists the ids to score on. Raises ``ValueError`` for a bad argument
    and ``DatasetNotFoundError`` (a ``ValueError``) when the files are missing.
    ``num_workers`` is handed to every loader of a file-backed split (``iterate_batches``
    callers pass ``splits.num_workers``); in-memory splits are sliced and ignore it.

    ``split_before_subset=True`` (with ``classes``) carves validation and ``fraction`` from
    all classes, exactly as a run without ``classes`` would, then keeps the subset's share:
    the subset's val images are the all-class val images of those classes. A base model
    trained on all classes has never seen them, so a class-specific run on it measures
    held-out accuracy. It reads every class (a class-folder data set scans all of train/).

    ``options`` sets the data set's own settings (``dataset_options(name)``), e.g.
    ``{"colour": "label"}`` for ``coloured_fashion_mnist``; unset ones take their defaults.

    Detection and segmentation sets (``task``) have no label per image to stratify by, so
    validation and ``fraction`` are plain seeded random draws (same nesting), and ``classes``
    is refused: every image may hold objects of several classes.
    """
    if not isinstance(name, str):
        raise ValueError(
            f"data.name must be a string naming one of {', '.join(list_datasets())}, but got {name!r}"
        )
    spec = DATASETS.get(name)
    if classes is not None and spec.task != "classification":
        raise ValueError(
            f"data.classes selects classes of a classification data set; {name} is a {spec.task} "
            f"data set (set data.classes=null), but got {classes!r}"
        )
    requested = _check_args(name, root, download, val_size, seed, classes, remap_labels, fraction)
    if not _is_int(num_workers) or num_workers < 0:
        raise ValueError(f"data.num_workers must be an integer >= 0, but got {num_workers!r}")
    if not isinstance(split_before_subset, bool):
        raise ValueError(f"split_before_subset must be true or false, but got {split_before_subset!r}")
    chosen = _check_options(name, spec.options, options)
    if download and not spec.can_download:
        raise ValueError(
            f"data.download=true is not supported for {name}; set data.root to a local copy"
        )
    root_path = None if root is None else Path(root).expanduser()

    known = spec.known_class_names
    ids = None if requested is None or known is None else _class_ids(name, requested, known)
    folder = spec.locate(root_path, download)
    all_names = list(known) if known is not None else spec.class_names(folder)
    if requested is not None and ids is None:
        ids = _class_ids(name, requested, all_names)

    carve_all = split_before_subset and ids is not None
    parts = spec.load(folder, None if carve_all else ids, **chosen)
    # One stratum for detection and segmentation: split_indices then draws plain random subsets.
    classifying = spec.task == "classification"
    targets = targets_of(parts.train) if classifying else torch.zeros(len(parts.train), dtype=torch.int64)
    if parts.val is not None and val_size != 0:  # a data factory's own validation set is used as it is
        raise ValueError(f"data.val_size must be 0 when {name} gives its own validation set, but got {val_size!r}")
    n_val = _val_count(val_size, len(targets))
    train_idx, val_idx = split_indices(targets, n_val, fraction, seed)
    n_pool = len(targets) - n_val
    test_idx = val_own = None
    if carve_all:
        wanted = torch.tensor(ids, dtype=torch.int64)
        in_subset = torch.isin(targets, wanted)
        train_idx, val_idx = train_idx[in_subset[train_idx]], val_idx[in_subset[val_idx]]
        n_pool = int(in_subset.sum()) - len(val_idx)
        test_idx = torch.isin(targets_of(parts.test), wanted).nonzero().flatten()
        if parts.val is not None:
            val_own = torch.isin(targets_of(parts.val), wanted).nonzero().flatten()

    label_map = None
    if ids is not None and remap_labels:
        label_map = torch.full((len(all_names),), -1, dtype=torch.int64)
        label_map[torch.tensor(ids)] = torch.arange(len(ids))
    remapped = label_map is not None
    train = take(parts.train, train_idx, label_map)
    return DataSplits(
        train=train,
        train_eval=train if parts.train_eval is parts.train else take(parts.train_eval, train_idx, label_map),
        num_workers=int(num_workers),
        train_size_full=n_pool,
        val=take(parts.train_eval, val_idx, label_map) if parts.val is None else take(parts.val, val_own, label_map),
        test=take(parts.test, test_idx, label_map),
        num_classes=len(ids) if remapped else len(all_names),
        class_names=[all_names[i] for i in ids] if remapped else all_names,
        input_shape=parts.input_shape or spec.input_shape,
        eval_classes=list(ids) if ids is not None and not remapped else None,
        class_ids=list(ids) if ids is not None else None,
        source_num_classes=len(all_names),
        data_root=None if folder is None else str(folder),
        task=spec.task,
    )


def _check_options(name: str, allowed: Mapping[str, tuple[str, ...]], options: object) -> dict[str, str]:
    """The data set's settings, defaults filled in; an unknown key or value is refused."""
    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        raise ValueError(f"data options must be a mapping of setting to value, but got {options!r}")
    options = {key: _option_text(value) for key, value in options.items()}
    for key, value in options.items():
        if key not in allowed:
            valid = ", ".join(allowed) if allowed else "none"
            raise ValueError(f"data.{key} must be a setting of {name} ({valid}), but got {key!r}")
        if value not in allowed[key]:
            raise ValueError(f"data.{key} must be one of {', '.join(allowed[key])}, but got {value!r}")
    return {key: options.get(key, values[0]) for key, values in allowed.items()}


def _option_text(value: object) -> object:
    """Settings are strings; a command line's ``data.size=256`` arrives as an int, taken as "256"."""
    return str(value) if _is_int(value) else value


def _is_int(x: object) -> bool:
    return isinstance(x, Integral) and not isinstance(x, bool)


def _check_args(
    name: str,
    root: object,
    download: object,
    val_size: object,
    seed: object,
    classes: object,
    remap_labels: object,
    fraction: object,
) -> list[str | int] | None:
    """Check every argument before anything is read; return ``classes`` as a list."""
    if root is not None and not isinstance(root, (str, os.PathLike)):
        raise ValueError(f"data.root must be a folder path or null, but got {root!r}")
    for key, flag in (("download", download), ("remap_labels", remap_labels)):
        if not isinstance(flag, bool):
            raise ValueError(f"data.{key} must be true or false, but got {flag!r}")
    if download and root is None:
        raise ValueError("data.download=true needs data.root=<folder to download into>")
    if _is_int(val_size):
        if val_size < 0:
            raise ValueError(
                f"data.val_size must be an image count >= 0 or a share in (0, 1), but got {val_size}"
            )
    elif not (isinstance(val_size, Real) and not isinstance(val_size, bool) and 0 < val_size < 1):
        raise ValueError(
            f"data.val_size must be an image count >= 0 or a share in (0, 1), but got {val_size!r}"
        )
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"data.seed must be an integer >= 0, but got {seed!r}")
    if isinstance(fraction, bool) or not isinstance(fraction, Real):
        raise ValueError(f"data.fraction must be a number in (0, 1], but got {fraction!r}")
    if not 0 < fraction <= 1:  # also false for NaN
        raise ValueError(f"data.fraction must be a number in (0, 1], but got {fraction}")
    if classes is None:
        return None
    if isinstance(classes, (str, bytes)) or not hasattr(classes, "__iter__"):
        raise ValueError(
            f"data.classes must be a list of class names or ids for {name} "
            f"(a named subset: data.load_class_subset(<file in conf/classes>)), but got {classes!r}"
        )
    listed = list(classes)
    if not listed:
        raise ValueError(
            f"data.classes must list at least one class of {name} (or be null for all), but got []"
        )
    return listed


def _class_ids(name: str, classes: list[str | int], names: Sequence[str]) -> list[int]:
    """Original label ids of ``classes`` (names or ids), in the order given."""
    index = {n: i for i, n in enumerate(names)}
    ids: list[int] = []
    for c in classes:
        if isinstance(c, str):
            if c not in index:
                raise ValueError(
                    f"data.classes: unknown class '{c}' for {name}; {_valid(c, names)}"
                )
            ids.append(index[c])
        elif _is_int(c):
            if not 0 <= c < len(names):
                raise ValueError(
                    f"data.classes: class id {c} is outside [0, {len(names)}) for {name}"
                )
            ids.append(int(c))
        else:
            raise ValueError(f"data.classes: {c!r} is neither a class name nor an integer id")
    seen: set[int] = set()
    for c, i in zip(classes, ids, strict=True):
        if i in seen:
            raise ValueError(f"data.classes: {c!r} (class {i}, '{names[i]}') is listed twice")
        seen.add(i)
    return ids


def _valid(wrong: str, names: Sequence[str]) -> str:
    close = difflib.get_close_matches(wrong, names, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    shown = ", ".join(names[:_MAX_LISTED])
    more = f", ... ({len(names)} in all)" if len(names) > _MAX_LISTED else ""
    return f"{hint}valid: {shown}{more}"


def _val_count(val_size: int | float, n_train: int) -> int:
    """Number of validation images out of ``n_train`` (after any class subset)."""
    if n_train < 2:
        raise ValueError(
            f"the training split has {n_train} images; need at least 2 to carve data.val_size"
        )
    if _is_int(val_size):
        if val_size >= n_train:
            raise ValueError(
                f"data.val_size={val_size} leaves no training images: the training split "
                f"(after data.classes) has {n_train}"
            )
        return int(val_size)
    return min(n_train - 1, max(1, math.floor(val_size * n_train + 0.5)))
