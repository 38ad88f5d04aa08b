"""PASCAL VOC and COCO loaders (data/_voc.py) on tiny folders built here in the real layouts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data import DatasetNotFoundError, get_data, iterate_batches
from data import _voc as voc
from data._folder import IMAGENET_MEAN, IMAGENET_STD

S = 128  # data.size in these tests
# id: (width, height, colour, objects as (name, xmin, ymin, xmax, ymax, difficult), VOC's 1-based corners)
VOC_IMAGES = {
    "2008_000001": (200, 100, (200, 40, 40), [("dog", 11, 21, 60, 80, 0), ("person", 100, 10, 190, 95, 1),
                                              ("car", 1, 1, 200, 100, 0)]),
    "2008_000002": (80, 160, (40, 200, 40), [("cat", 5, 5, 70, 150, 0)]),
    "2008_000003": (120, 120, (40, 40, 200), [("bottle", 30, 30, 50, 90, 1)]),  # only a difficult object
    "2008_000004": (64, 48, (120, 120, 120), [("person", 2, 3, 60, 40, 0)]),
}
VOC_TRAIN, VOC_VAL = ["2008_000001", "2008_000002", "2008_000003"], ["2008_000004"]


def voc_xml(width: int, height: int, objects: list) -> str:
    objs = "".join(
        f"<object><name>{n}</name><pose>Unspecified</pose><truncated>0</truncated><difficult>{d}</difficult>"
        f"<bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
        for n, x1, y1, x2, y2, d in objects
    )
    return (f"<annotation><folder>VOC2012</folder><filename>x.jpg</filename><size><width>{width}</width>"
            f"<height>{height}</height><depth>3</depth></size><segmented>1</segmented>{objs}</annotation>")


def voc_mask(width: int, height: int, objects: list) -> np.ndarray:
    """Each object's box filled with its class id inside a one-pixel 255 boundary (as VOC draws them)."""
    mask = np.zeros((height, width), dtype=np.uint8)
    for name, x1, y1, x2, y2, _ in objects:
        mask[y1 - 1 : y2, x1 - 1 : x2] = 255
        mask[y1 : y2 - 1, x1 : x2 - 1] = voc.CLASS_NAMES.index(name)
    return mask


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("voc")
    devkit = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "Annotations", "SegmentationClass", "ImageSets/Main", "ImageSets/Segmentation"):
        (devkit / sub).mkdir(parents=True)
    palette = [v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)]
    for image_id, (w, h, colour, objects) in VOC_IMAGES.items():
        Image.new("RGB", (w, h), colour).save(devkit / "JPEGImages" / f"{image_id}.jpg", quality=95)
        (devkit / "Annotations" / f"{image_id}.xml").write_text(voc_xml(w, h, objects))
        png = Image.frombytes("P", (w, h), voc_mask(w, h, objects).tobytes())
        png.putpalette(palette)
        png.save(devkit / "SegmentationClass" / f"{image_id}.png")
    for kind in ("Main", "Segmentation"):
        (devkit / "ImageSets" / kind / "train.txt").write_text("\n".join(VOC_TRAIN) + "\n")
        (devkit / "ImageSets" / kind / "val.txt").write_text("\n".join(VOC_VAL) + "\n")
    return root


def colour_of(image: torch.Tensor) -> list[float]:
    """Mean RGB (0..255) of a normalised (3, H, W) image."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((image * std + mean) * 255).mean(dim=(1, 2)).tolist()


def objects_of(target: torch.Tensor) -> torch.Tensor:
    return target[target[:, 0] >= 0]


# ---------------------------------------------------------------- VOC detection


def test_voc_boxes_are_scaled_to_the_square_and_difficult_objects_dropped(voc_root):
    ds = voc.VOCBoxes(voc_root, "2012", "train", S)
    image, target = ds[0]  # 2008_000001: 200 x 100
    assert image.shape == (3, S, S) and image.dtype == torch.float32
    assert colour_of(image) == pytest.approx([200, 40, 40], abs=3)
    assert target.shape == (voc.MAX_OBJECTS, 5) and target.dtype == torch.float32
    # dog [11, 21, 60, 80] -> [10, 20, 60, 80] (0-based, continuous), scaled by (128/200, 128/100);
    # the difficult person is gone; car covers the whole image.
    expected = torch.tensor([[12, 6.4, 25.6, 38.4, 102.4], [7, 0, 0, 128, 128]])
    assert torch.allclose(objects_of(target), expected, atol=1e-4)
    assert [voc.CLASS_NAMES[int(v)] for v in objects_of(target)[:, 0]] == ["dog", "car"]
    assert (target[2:] == -1).all()
    _, target = ds[1]  # 2008_000002: 80 x 160, cat [4, 4, 70, 150]
    assert torch.allclose(objects_of(target), torch.tensor([[8, 6.4, 3.2, 112, 120]]), atol=1e-4)
    _, target = ds[2]  # only a difficult bottle: nothing to find
    assert (target == -1).all()


def test_voc_detection_through_get_data(voc_root):
    s = get_data("voc_detection", voc_root, val_size=1, seed=0, options={"size": str(S)})
    assert (s.task, s.num_classes, s.input_shape) == ("detection", 21, (3, S, S))
    assert s.class_names[0] == "background" and s.class_names[15] == "person"
    assert (len(s.train), len(s.val), len(s.test)) == (2, 1, 1)
    assert not set(s.train.indices) & set(s.val.indices)  # carved from VOC's train image set
    images, targets = next(iterate_batches(s.train, 2, shuffle=True, seed=0))
    assert images.shape == (2, 3, S, S) and targets.shape == (2, voc.MAX_OBJECTS, 5)
    image, target = s.test[0]  # VOC's val image set: 2008_000004, 64 x 48, person [1, 2, 60, 40]
    assert colour_of(image) == pytest.approx([120, 120, 120], abs=3)
    assert torch.allclose(objects_of(target), torch.tensor([[15, 2, 2 * S / 48, 120, 40 * S / 48]]), atol=1e-4)
    assert get_data("voc_detection", voc_root, val_size=1).input_shape == (3, 320, 320)  # the default size


# ---------------------------------------------------------------- VOC segmentation


def nearest(mask: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resize by pixel centres: output pixel i samples floor((i + 0.5) * n / size)."""
    rows = np.floor((np.arange(size) + 0.5) * mask.shape[0] / size).astype(int)
    cols = np.floor((np.arange(size) + 0.5) * mask.shape[1] / size).astype(int)
    return mask[rows][:, cols]


def test_voc_masks_are_resized_nearest_and_keep_the_boundary(voc_root):
    s = get_data("voc_segmentation", voc_root, val_size=1, options={"size": str(S)})
    assert (s.task, s.num_classes, s.input_shape) == ("segmentation", 21, (3, S, S))
    ds = voc.VOCMasks(voc_root, "2012", "train", S)
    for i, image_id in enumerate(VOC_TRAIN):
        w, h, _, objects = VOC_IMAGES[image_id]
        image, mask = ds[i]
        assert image.shape == (3, S, S) and mask.shape == (S, S) and mask.dtype == torch.int64
        assert np.array_equal(mask.numpy(), nearest(voc_mask(w, h, objects), S))
        assert 255 in mask  # thin boundaries survive the resize, never blended into other ids
    _, mask = ds[1]  # 2008_000002: a cat in its boundary on background
    assert set(mask.unique().tolist()) == {0, 255, voc.CLASS_NAMES.index("cat")}
    images, masks = next(iterate_batches(s.test, 1, shuffle=False))
    assert images.shape == (1, 3, S, S) and masks.shape == (1, S, S) and masks.dtype == torch.int64


# ---------------------------------------------------------------- VOC errors


@pytest.mark.parametrize("name", ["voc_detection", "voc_segmentation"])
def test_a_missing_voc_root_names_the_expected_layout_in_one_line(tmp_path, name):
    for root in (tmp_path / "empty", None):
        with pytest.raises(DatasetNotFoundError) as err:
            get_data(name, root)
        assert "\n" not in str(err.value) and "VOCdevkit/VOC2012/" in str(err.value) and name in str(err.value)
    folder = "Main" if name == "voc_detection" else "Segmentation"
    assert f"ImageSets/{folder}" in str(err.value)


def test_a_missing_voc_year_and_a_root_inside_the_devkit_are_explained(voc_root):
    with pytest.raises(DatasetNotFoundError, match=r"VOCdevkit/VOC2007/"):
        get_data("voc_detection", voc_root, options={"year": "2007"})
    with pytest.raises(DatasetNotFoundError, match=r"points inside the devkit"):
        get_data("voc_detection", voc_root / "VOCdevkit")


def test_voc_refuses_class_subsets_and_unknown_sizes(voc_root):
    with pytest.raises(ValueError, match=r"^data\.classes selects classes .*voc_segmentation is a segmentation data set.*\['person'\]$"):
        get_data("voc_segmentation", voc_root, classes=["person"])
    with pytest.raises(ValueError, match=r"^data\.size must be one of 320, .*but got '100'$"):
        get_data("voc_detection", voc_root, options={"size": "100"})
    assert get_data("voc_detection", voc_root, val_size=1, options={"size": 128}).input_shape == (3, S, S)


# ---------------------------------------------------------------- COCO

# Categories listed out of id order: labels follow the ids (person 1 -> 1, dog 18 -> 2, bottle 44 -> 3).
COCO_CATEGORIES = [{"id": 18, "name": "dog", "supercategory": "animal"},
                   {"id": 1, "name": "person", "supercategory": "person"},
                   {"id": 44, "name": "bottle", "supercategory": "kitchen"}]


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("coco")
    (root / "annotations").mkdir()
    splits = {
        "train": ([(7, "a.jpg", 100, 50), (3, "b.jpg", 60, 60)],
                  [(7, 18, [10, 5, 40, 20], 0), (7, 1, [0, 0, 100, 50], 1), (3, 44, [30, 30, 30, 30], 0),
                   (3, 1, [0, 10, 20, 40], 0)]),
        "val": ([(1, "c.jpg", 40, 80)], [(1, 1, [4, 8, 20, 40], 0)]),
    }
    ann_id = 0
    for split, (images, anns) in splits.items():
        (root / f"{split}2017").mkdir()
        for _, file_name, w, h in images:
            Image.new("RGB", (w, h), (90, 160, 30)).save(root / f"{split}2017" / file_name, quality=95)
        annotations = []
        for image_id, cat, bbox, crowd in anns:
            ann_id += 1
            annotations.append({"id": ann_id, "image_id": image_id, "category_id": cat, "bbox": bbox,
                                "area": bbox[2] * bbox[3], "iscrowd": crowd, "segmentation": []})
        doc = {"images": [{"id": i, "file_name": f, "width": w, "height": h} for i, f, w, h in images],
               "annotations": annotations, "categories": COCO_CATEGORIES}
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(doc))
    return root


def test_coco_detection_end_to_end(coco_root):
    s = get_data("coco_detection", coco_root, val_size=1, seed=0, options={"size": str(S)})
    assert (s.task, s.num_classes, s.input_shape) == ("detection", 4, (3, S, S))
    assert s.class_names == ["background", "person", "dog", "bottle"]
    assert len(s.train) + len(s.val) == 2 and len(s.test) == 1
    ds = s.train.dataset  # the COCOBoxes over train2017, images in id order: 3 (b.jpg), 7 (a.jpg)
    image, target = ds[1]  # a.jpg, 100 x 50: the dog; the crowd of people is left out
    assert image.shape == (3, S, S) and colour_of(image) == pytest.approx([90, 160, 30], abs=3)
    assert torch.allclose(objects_of(target), torch.tensor([[2, 12.8, 12.8, 64, 64]]), atol=1e-4)
    _, target = ds[0]  # b.jpg, 60 x 60: bottle, then a person
    scale = S / 60
    expected = torch.tensor([[3, 30 * scale, 30 * scale, 60 * scale, 60 * scale], [1, 0, 10 * scale, 20 * scale, 50 * scale]])
    assert torch.allclose(objects_of(target), expected, atol=1e-4)
    assert target.shape == (voc.MAX_OBJECTS, 5) and (target[2:] == -1).all()
    _, target = s.test[0]  # c.jpg, 40 x 80: person [4, 8, 24, 48]
    assert torch.allclose(objects_of(target), torch.tensor([[1, 4 * S / 40, 8 * S / 80, 24 * S / 40, 48 * S / 80]]), atol=1e-4)
    images, targets = next(iterate_batches(s.train, 2, shuffle=False))
    assert images.shape == (1, 3, S, S) and targets.shape == (1, voc.MAX_OBJECTS, 5)


def test_a_missing_coco_file_is_named_in_one_line(tmp_path, coco_root):
    with pytest.raises(DatasetNotFoundError) as err:
        get_data("coco_detection", tmp_path / "empty")
    message = str(err.value)
    assert "\n" not in message and "annotations/instances_{train,val}2017.json" in message and "empty" in message
    with pytest.raises(DatasetNotFoundError, match=r"^coco_detection: data\.root is unset"):
        get_data("coco_detection")


def test_more_objects_than_rows_keep_the_largest_in_their_order():
    n = voc.MAX_OBJECTS + 6
    sides = np.random.default_rng(0).permutation(n).astype(np.float64) + 1  # a shuffle of 1..n
    boxes = np.stack([np.zeros(n), np.zeros(n), sides, sides], axis=1)
    with pytest.warns(UserWarning, match="keeping the largest"):
        target = voc.boxes_target(list(range(1, n + 1)), boxes, (1.0, 1.0), 1000)
    kept = sides > 6  # the six smallest (sides 1..6) go
    assert torch.equal(target[:, 0], torch.tensor(np.arange(1, n + 1)[kept], dtype=torch.float32))
    assert torch.equal(target[:, 3], torch.tensor(sides[kept], dtype=torch.float32))
    # Boxes left with no area after clipping to the image are dropped, not served degenerate.
    clipped = voc.boxes_target([1, 2], np.array([[5, 5, 9, 9], [130, 0, 140, 10]]), (1.0, 1.0), 128)
    assert torch.equal(objects_of(clipped), torch.tensor([[1.0, 5, 5, 9, 9]]))
