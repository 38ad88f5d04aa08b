"""PASCAL VOC (detection, segmentation) and COCO (detection), read lazily from local copies.

Images are resized to a fixed square ``data.size`` (so batches stack; aspect ratios are not
kept) and normalised with ImageNet's statistics, what pretrained backbones expect. Targets
follow ``DatasetSpec``: detection gives (``MAX_OBJECTS``, 5) float32 rows ``[label, x1, y1, x2,
y2]`` in pixels of the resized image, padding rows all -1; segmentation gives (size, size)
int64 masks resized with nearest neighbour, so VOC's 255 (object boundaries, ignore) survives.
Label 0 is background; VOC's 20 classes are 1..20, COCO's categories 1..K in the order of
their json ids. Test labels of neither are public, so the test split is VOC's ``val`` image set
and COCO's ``val2017``; validation is carved from ``train``. Nothing is ever downloaded: VOC and COCO are large and their licences are
per image, so ``data.root`` must point at a local copy.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import warnings
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ._datasets import normalise
from ._folder import IMAGENET_MEAN, IMAGENET_STD
from ._spec import DATASETS, DatasetNotFoundError, DatasetSpec, Parts

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip
CLASS_NAMES = ("background", *VOC_CLASSES)
# Rows of a detection target: more than VOC or COCO (crowds left out) hold in all but a few
# images; an image with more keeps its MAX_OBJECTS largest, with a warning.
MAX_OBJECTS = 64
SIZES = ("320", "128", "160", "224", "256", "384", "448", "512", "640")  # data.size, default first
YEARS = ("2012", "2007")  # data.year for VOC, default first
IGNORE = 255  # segmentation label of pixels nobody scores (VOC's object boundaries)
_DEFAULT_SIZE = int(SIZES[0])

_VOC_LAYOUT = {
    "detection": "JPEGImages/*.jpg, Annotations/*.xml, ImageSets/Main/{train,val}.txt",
    "segmentation": "JPEGImages/*.jpg, SegmentationClass/*.png, ImageSets/Segmentation/{train,val}.txt",
}
_COCO_LAYOUT = "annotations/instances_{train,val}2017.json, train2017/*.jpg, val2017/*.jpg"


def photo(image: Any, size: int) -> Tensor:
    """A PIL image -> (3, size, size) float32, resized (bilinear, antialiased) and normalised."""
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    rgb = image.convert("RGB").resize((size, size), Image.BILINEAR)
    return normalise(pil_to_tensor(rgb).unsqueeze(0), IMAGENET_MEAN, IMAGENET_STD)[0]


def boxes_target(labels: Sequence[int], boxes: np.ndarray, scale: tuple[float, float], size: int) -> Tensor:
    """(MAX_OBJECTS, 5) padded target from ``boxes`` (K, 4) [x1, y1, x2, y2] in original pixels,
    scaled by ``scale`` (sx, sy) and clipped to the ``size`` square; boxes left with no width or
    height are dropped, and beyond ``MAX_OBJECTS`` the largest are kept (in their order)."""
    out = torch.full((MAX_OBJECTS, 5), -1.0)
    if len(labels) == 0:
        return out
    xy = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) * np.array([*scale, *scale])
    xy = np.clip(xy, 0, size)
    wh = xy[:, 2:] - xy[:, :2]
    keep = np.flatnonzero((wh > 0).all(axis=1))
    if len(keep) > MAX_OBJECTS:
        warnings.warn(
            f"an image has more than MAX_OBJECTS={MAX_OBJECTS} objects; keeping the largest "
            f"(raise data._voc.MAX_OBJECTS to keep all)",
            stacklevel=2,
        )
        area = wh[keep].prod(axis=1)
        keep = np.sort(keep[np.argsort(-area, kind="stable")[:MAX_OBJECTS]])
    rows = np.concatenate([np.asarray(labels, dtype=np.float64)[keep, None], xy[keep]], axis=1)
    out[: len(keep)] = torch.from_numpy(rows).to(torch.float32)
    return out


class VOCBoxes(Dataset):
    """VOC detection: (image (3, S, S), boxes (MAX_OBJECTS, 5)) per image of an image set.

    Objects marked ``difficult`` are left out of the targets (VOC's own evaluation ignores
    them, and they are often barely visible). VOC's corners are 1-based pixel indices, both
    inclusive; a box becomes ``[xmin - 1, ymin - 1, xmax, ymax]`` in continuous coordinates.
    """

    def __init__(self, root: Path, year: str, image_set: str, size: int = _DEFAULT_SIZE):
        from torchvision.datasets import VOCDetection

        self.voc = VOCDetection(str(root), year=year, image_set=image_set, download=False)
        self.size = size

    def __len__(self) -> int:
        return len(self.voc)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        image, annotation = self.voc[i]
        labels, boxes = [], []
        for obj in annotation["annotation"].get("object", []):
            if obj.get("difficult", "0").strip() == "1":
                continue
            name = obj["name"].strip()
            if name not in VOC_CLASSES:
                raise ValueError(f"{self.voc.targets[i]}: unknown VOC class {name!r}; valid: {', '.join(VOC_CLASSES)}")
            b = obj["bndbox"]
            labels.append(CLASS_NAMES.index(name))
            boxes.append([float(b["xmin"]) - 1, float(b["ymin"]) - 1, float(b["xmax"]), float(b["ymax"])])
        w, h = image.size
        scale = (self.size / w, self.size / h)
        return photo(image, self.size), boxes_target(labels, np.array(boxes), scale, self.size)


class VOCMasks(Dataset):
    """VOC segmentation: (image (3, S, S), mask (S, S) int64) per image of an image set;
    mask values are 0 background, 1..20 the classes, 255 boundaries (ignore)."""

    def __init__(self, root: Path, year: str, image_set: str, size: int = _DEFAULT_SIZE):
        from torchvision.datasets import VOCSegmentation

        self.voc = VOCSegmentation(str(root), year=year, image_set=image_set, download=False)
        self.size = size

    def __len__(self) -> int:
        return len(self.voc)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        from PIL import Image

        image, mask = self.voc[i]
        # Palette ("P") or grey PNGs hold class ids; an RGB one would hold colours instead.
        if mask.mode not in ("P", "L"):
            raise ValueError(f"{self.voc.masks[i]}: expected a palette or grey PNG of class ids, but got mode {mask.mode}")
        resized = mask.resize((self.size, self.size), Image.NEAREST)  # never blends ids
        return photo(image, self.size), torch.from_numpy(np.array(resized, dtype=np.int64))


class COCOBoxes(Dataset):
    """COCO detection: (image (3, S, S), boxes (MAX_OBJECTS, 5)) per image of an annotation file.

    Crowd annotations (``iscrowd``) are left out, as torchvision's detection references do;
    COCO boxes ``[x, y, w, h]`` become ``[x, y, x + w, y + h]``. ``category_ids`` (sorted json
    category ids) gives the label order: category ``category_ids[j]`` is label j + 1.
    """

    def __init__(self, images: Path, annotations: Path, category_ids: Sequence[int], size: int = _DEFAULT_SIZE):
        from torchvision.datasets import CocoDetection

        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
            self.coco = CocoDetection(str(images), str(annotations))
        self.label_of = {c: j + 1 for j, c in enumerate(category_ids)}
        self.size = size

    def __len__(self) -> int:
        return len(self.coco)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        image, annotations = self.coco[int(i)]
        kept = [a for a in annotations if not a.get("iscrowd", 0)]
        labels = [self.label_of[a["category_id"]] for a in kept]
        boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in kept)])
        w, h = image.size
        return photo(image, self.size), boxes_target(labels, boxes, (self.size / w, self.size / h), self.size)


def _voc_missing(name: str, task: str, year: str, root: Path | None) -> DatasetNotFoundError:
    layout = f"<root>/VOCdevkit/VOC{year}/{{{_VOC_LAYOUT[task]}}}"
    if root is None:
        return DatasetNotFoundError(f"{name}: data.root is unset; set data.root=<folder holding VOCdevkit/>, laid out as {layout}")
    hint = ""
    if (root / "JPEGImages").is_dir() or (root / f"VOC{year}").is_dir():
        hint = " (data.root points inside the devkit: set it to the folder holding VOCdevkit/)"
    return DatasetNotFoundError(
        f"{name}: expected {layout} with root={root}{hint}; set data.root to that folder "
        f"(data.year picks VOC{YEARS[1]} or VOC{YEARS[0]}; nothing is downloaded)"
    )


def _locate_voc(name: str, task: str, root: Path | None, download: bool) -> Path:
    """The folder holding ``VOCdevkit/VOC<year>``; the year is checked by ``load``, which knows it."""
    if root is not None and any((root / "VOCdevkit" / f"VOC{y}").is_dir() for y in YEARS):
        return root
    raise _voc_missing(name, task, YEARS[0], root)


def _load_voc(name: str, task: str, folder: Path, class_ids: Sequence[int] | None,
              year: str = YEARS[0], size: str = SIZES[0]) -> Parts:
    if not (folder / "VOCdevkit" / f"VOC{year}").is_dir():
        raise _voc_missing(name, task, year, folder)
    kind = VOCBoxes if task == "detection" else VOCMasks
    try:
        # VOC's test labels are not public: the official val image set is the test split here.
        train, test = (kind(folder, year, image_set, int(size)) for image_set in ("train", "val"))
    except FileNotFoundError as e:  # an image set list is missing
        raise DatasetNotFoundError(
            f"{name}: {e.filename or e} is missing; expected <root>/VOCdevkit/VOC{year}/{{{_VOC_LAYOUT[task]}}}"
        ) from e
    return Parts(train=train, train_eval=train, test=test, input_shape=(3, int(size), int(size)))


def _coco_files(root: Path) -> dict[str, tuple[Path, Path]]:
    return {split: (root / f"{split}2017", root / "annotations" / f"instances_{split}2017.json")
            for split in ("train", "val")}


def _locate_coco(root: Path | None, download: bool) -> Path:
    if root is None:
        raise DatasetNotFoundError(
            f"coco_detection: data.root is unset; set data.root=<folder holding {_COCO_LAYOUT}>"
        )
    missing = [p for pair in _coco_files(root).values() for p in pair if not p.exists()]
    if missing:
        raise DatasetNotFoundError(
            f"coco_detection: expected {_COCO_LAYOUT} under {root}, but {missing[0]} is missing; "
            "set data.root to that folder (nothing is downloaded)"
        )
    return root


@functools.lru_cache(maxsize=4)
def _categories(path: str, stamp: float) -> tuple[tuple[int, str], ...]:
    """(id, name) of the json's categories, sorted by id; ``stamp`` (mtime) keys a rewritten file."""
    with open(path) as f:
        cats = json.load(f)["categories"]
    return tuple(sorted((int(c["id"]), str(c["name"])) for c in cats))


def _coco_categories(root: Path, split: str) -> tuple[tuple[int, str], ...]:
    path = _coco_files(root)[split][1]
    return _categories(str(path), path.stat().st_mtime)


def _coco_class_names(root: Path) -> list[str]:
    # From the val file: the same categories as train's (load checks) at a tenth of the size.
    return ["background", *(name for _, name in _coco_categories(root, "val"))]


def _load_coco(folder: Path, class_ids: Sequence[int] | None, size: str = SIZES[0]) -> Parts:
    cats = _coco_categories(folder, "val")
    if _coco_categories(folder, "train") != cats:
        raise ValueError(
            f"coco_detection: {_coco_files(folder)['train'][1]} and {_coco_files(folder)['val'][1]} "
            "list different categories; both must list the same ids and names"
        )
    ids = [c for c, _ in cats]
    train, test = (COCOBoxes(*_coco_files(folder)[split], ids, int(size)) for split in ("train", "val"))
    # COCO's test labels are not public either: val2017 is the test split.
    return Parts(train=train, train_eval=train, test=test, input_shape=(3, int(size), int(size)))


for _task in ("detection", "segmentation"):
    DATASETS.register(
        f"voc_{_task}",
        DatasetSpec(
            input_shape=(3, _DEFAULT_SIZE, _DEFAULT_SIZE),
            locate=partial(_locate_voc, f"voc_{_task}", _task),
            class_names=lambda _folder: list(CLASS_NAMES),
            load=partial(_load_voc, f"voc_{_task}", _task),
            known_class_names=CLASS_NAMES,
            options={"year": YEARS, "size": SIZES},
            task=_task,
        ),
    )

DATASETS.register(
    "coco_detection",
    DatasetSpec(
        input_shape=(3, _DEFAULT_SIZE, _DEFAULT_SIZE),
        locate=_locate_coco,
        class_names=_coco_class_names,
        load=_load_coco,
        options={"size": SIZES},
        task="detection",
    ),
)
