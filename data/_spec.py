"""What a dataset source provides, and the registry of sources by name."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._registry import Registry

# What a data set's targets mean: a label id per image, boxes per image, or a label per pixel.
# The sample formats of each are in ``DatasetSpec``'s docstring.
TASKS = ("classification", "detection", "segmentation")


class DatasetNotFoundError(ValueError):
    """The dataset's files are not where we looked; the message says where and how to fix it."""


def where_searched(folders: list[Path]) -> str:
    """'in a, b' for an error message, or why nothing was searched."""
    if not folders:
        return "(data.root is unset, so nothing was searched)"
    return "in " + ", ".join(str(f) for f in folders)


@dataclass(frozen=True)
class Parts:
    """Full official splits, restricted to the requested classes (original label ids).

    ``train`` and ``train_eval`` hold the same samples in the same order; they differ
    only in transforms (augmented vs. deterministic), so the validation split carved from
    the training set is read without augmentation. For in-memory sets they are one object.
    """

    train: Any
    train_eval: Any
    test: Any
    # (C, H, W) when it depends on the data set's options (``data.size``) or is only known from
    # the data (a user's factory); else the spec's.
    input_shape: tuple[int, int, int] | None = None
    # A validation set the source gives itself (a data factory's); None: carved from train (seeded).
    val: Any = None


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset source.

    ``locate(root, download)`` returns the folder holding the files or raises
    ``DatasetNotFoundError``; ``class_names(folder)`` lists names for ids 0..K-1 (cheap);
    ``load(folder, class_ids)`` reads the splits, keeping only ``class_ids`` when given.
    ``known_class_names`` lets ``data.classes`` be checked before anything is read.
    ``options`` names the data set's own settings (``data.<key>`` in the config) and their
    allowed values, the first being the default; ``load`` receives them as keyword arguments.
    ``input_shape`` is (C, H, W) under the default options; a ``load`` whose options change it
    (``data.size``) reports the shape in ``Parts.input_shape``. ``fingerprint(folder)`` identifies
    the content where the name does not (a folder of the user's images, a user's factory): it
    joins the base model's cache key, so other images train another base model; None for data
    sets whose name says what they hold.

    ``task`` says what a sample's target is (images are always float32 (C, H, W), normalised,
    one size per data set, so a batch stays an ``(images, targets)`` pair of tensors):

    * ``classification``: an int64 label id in 0..K-1;
    * ``detection``: float32 (M, 5), rows ``[label, x1, y1, x2, y2]`` in pixel coordinates of
      the image as served (x2 > x1, y2 > y1), labels 1..K-1, M fixed per data set, unused rows
      all -1 (padding);
    * ``segmentation``: int64 (H, W), a label per pixel, 255 where it is unknown (ignore).

    Detection and segmentation reserve label 0 for background (torchvision's convention), so
    their class names start with ``"background"`` and count it.
    """

    input_shape: tuple[int, int, int]
    locate: Callable[[Path | None, bool], Path]
    class_names: Callable[[Path], list[str]]
    load: Callable[[Path, Sequence[int] | None], Parts]
    can_download: bool = False
    known_class_names: tuple[str, ...] | None = None
    options: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    task: str = "classification"
    fingerprint: Callable[[Path], str] | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"DatasetSpec.task must be one of {', '.join(TASKS)}, but got {self.task!r}")


DATASETS: Registry[DatasetSpec] = Registry("dataset")
