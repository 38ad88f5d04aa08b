"""Fashion-MNIST scenes (data/_scenes.py): tight boxes, masks, disjoint sources, caching, get_data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_idx

import data._fashion_mnist as fmnist
from data import DatasetNotFoundError, fmnist_scenes, get_data, iterate_batches
from data import _scenes as scenes_mod

N_TRAIN_ITEMS, N_TEST_ITEMS = 80, 40
N_TRAIN, N_TEST = 60, 30  # scenes generated in these tests
DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")


def item_value(source: int) -> int:
    """The ink value of fake item ``source`` (numbered train + test): 100.. train, 200.. test."""
    return 100 + source if source < N_TRAIN_ITEMS else 200 + source - N_TRAIN_ITEMS


def fake_items(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(n, 28, 28) items: a filled rectangle of the item's own value in a faint halo (below INK),
    so a scene's pixels say which item they came from and faint pixels must stay out of boxes."""
    items = np.zeros((len(values), 28, 28), dtype=np.uint8)
    for k, v in enumerate(values):
        x0, y0 = rng.integers(2, 8, size=2)
        x1, y1 = rng.integers(20, 27, size=2)
        items[k, y0 - 1 : y1 + 1, x0 - 1 : x1 + 1] = 20
        items[k, y0:y1, x0:x1] = v
    return items


@pytest.fixture(scope="module")
def fake_fmnist(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fake_fmnist")
    rng = np.random.default_rng(0)
    for prefix, values in (("train", 100 + np.arange(N_TRAIN_ITEMS)), ("t10k", 200 + np.arange(N_TEST_ITEMS))):
        write_idx(folder / f"{prefix}-images-idx3-ubyte", fake_items(values, rng))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", np.arange(len(values)) % 10)
    return folder


@pytest.fixture(autouse=True)
def small_scenes(monkeypatch, tmp_path):
    """Few scenes, a private cache folder, no Debian fallback and no scenes kept from another test."""
    monkeypatch.setattr(scenes_mod, "N_TRAIN_SCENES", N_TRAIN)
    monkeypatch.setattr(scenes_mod, "N_TEST_SCENES", N_TEST)
    monkeypatch.setattr(scenes_mod, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.setattr(fmnist, "FALLBACK_DIRS", (tmp_path / "no-debian-here",))
    scenes_mod._scenes.cache_clear()
    yield
    scenes_mod._scenes.cache_clear()


def isolated_objects(boxes: np.ndarray):
    """(row, label, x1, y1, x2, y2) of the objects whose box, grown by one pixel, meets no other box."""
    used = boxes[boxes[:, 0] > 0]
    for j, (label, *box) in enumerate(used.astype(int)):
        grown = np.array(box) + [-1, -1, 1, 1]
        others = np.delete(used[:, 1:], j, axis=0)
        overlap = (np.minimum(grown[2:], others[:, 2:]) > np.maximum(grown[:2], others[:, :2])).all(axis=1)
        if not overlap.any():
            yield j, label, *box


# ---------------------------------------------------------------- the generated scenes


def test_boxes_are_tight_around_their_items_ink_and_padding_is_minus_one(fake_fmnist):
    checked = 0
    for sc in fmnist_scenes(fake_fmnist).values():
        assert sc.images.shape == sc.masks.shape == (len(sc.images), 128, 128)
        assert sc.boxes.shape == (len(sc.images), 4, 5) and sc.boxes.dtype == np.float32
        used = sc.boxes[:, :, 0] > 0
        assert used[:, 0].all()  # every scene holds an item, in the first rows
        assert (np.diff(used.astype(int), axis=1) <= 0).all()  # padding only after the objects
        assert (sc.boxes[~used] == -1).all() and (sc.sources[~used] == -1).all()
        assert set(np.unique(sc.boxes[used][:, 0])) <= set(range(1, 11))
        x1, y1, x2, y2 = sc.boxes[used][:, 1:].T
        assert (x2 > x1).all() and (y2 > y1).all() and (x1 >= 0).all() and (y2 <= 128).all()
        assert set(np.unique(sc.masks)) <= set(range(11))
        assert (sc.images[sc.masks > 0] > scenes_mod.INK).all()  # masks mark ink, not halo
        # Fake item k has label k % 10 in both splits (80 train items: the numbering keeps it).
        assert (sc.boxes[used][:, 0] == sc.sources[used] % 10 + 1).all()
        for n in range(len(sc.images)):
            padded = np.pad(sc.masks[n], 1)  # a blank border, so a box at the edge has a ring too
            for j, label, bx1, by1, bx2, by2 in isolated_objects(sc.boxes[n]):
                # The box and a one-pixel ring around it: the label's pixels span the box exactly.
                ys, xs = np.nonzero(padded[by1 : by2 + 2, bx1 : bx2 + 2] == label)
                assert (xs.min(), ys.min(), xs.max(), ys.max()) == (1, 1, bx2 - bx1, by2 - by1)
                # The brightest pixel in the box is the recorded source item's own value.
                assert sc.images[n, by1:by2, bx1:bx2].max() == item_value(int(sc.sources[n, j]))
                checked += 1
    assert checked > 50  # most objects stand alone, so the checks above ran on many


def test_train_and_test_scenes_share_no_fashion_mnist_item(fake_fmnist):
    sc = fmnist_scenes(fake_fmnist)
    train = set(sc["train"].sources[sc["train"].sources >= 0].tolist())
    test = set(sc["test"].sources[sc["test"].sources >= 0].tolist())
    assert train <= set(range(N_TRAIN_ITEMS)) and test <= set(range(N_TRAIN_ITEMS, N_TRAIN_ITEMS + N_TEST_ITEMS))
    assert not train & test
    # What the pixels show agrees: train items are 100..179 (edges blend lower), test items 200..239.
    assert sc["train"].images.max() < 200
    assert (sc["test"].images.max(axis=(1, 2)) >= 200).all()
    # Items are drawn without replacement while unused ones remain.
    n_used = int((sc["test"].sources >= 0).sum())
    assert len(test) == min(n_used, N_TEST_ITEMS)


def test_later_items_win_where_items_overlap(monkeypatch, fake_fmnist):
    monkeypatch.setattr(scenes_mod, "MAX_IOU", 1.0)  # let items pile up
    sc = scenes_mod.generate(fake_fmnist, 200, 1)["train"]
    seen = 0
    for n in range(len(sc.images)):
        rows = np.flatnonzero(sc.boxes[n, :, 0] > 0)
        for a in rows:
            for b in rows[rows > a]:
                (ax1, ay1, ax2, ay2), (bx1, by1, bx2, by2) = sc.boxes[n, a, 1:].astype(int), sc.boxes[n, b, 1:].astype(int)
                # A pixel inside the later box's filled core: value and mask are the later item's.
                cx, cy = (bx1 + bx2) // 2, (by1 + by2) // 2
                later_on_top = all(not (r > b and sc.boxes[n, r, 1] <= cx < sc.boxes[n, r, 3]
                                        and sc.boxes[n, r, 2] <= cy < sc.boxes[n, r, 4]) for r in rows)
                if ax1 <= cx < ax2 and ay1 <= cy < ay2 and later_on_top:
                    assert sc.images[n, cy, cx] == item_value(int(sc.sources[n, b]))
                    assert sc.masks[n, cy, cx] == sc.boxes[n, b, 0]
                    seen += 1
    assert seen > 0


def test_scenes_are_the_same_bytes_from_the_cache_and_fresh(monkeypatch, fake_fmnist, tmp_path):
    first = fmnist_scenes(fake_fmnist)
    files = list((tmp_path / "cache").glob("fmnist-scenes-*.npz"))
    assert len(files) == 1
    scenes_mod._scenes.cache_clear()

    def no_generation(*args):
        raise AssertionError("the cached scenes should have been read")

    with monkeypatch.context() as m:
        m.setattr(scenes_mod, "generate", no_generation)
        cached = fmnist_scenes(fake_fmnist)
    fresh = scenes_mod.generate(fake_fmnist, N_TRAIN, N_TEST)
    for split in ("train", "test"):
        for key in ("images", "masks", "boxes", "sources"):
            a, b, c = (getattr(s[split], key) for s in (first, cached, fresh))
            assert a.dtype == b.dtype == c.dtype and a.tobytes() == b.tobytes() == c.tobytes()
    # Another count is another generation (another file), not a stale read.
    monkeypatch.setattr(scenes_mod, "N_TEST_SCENES", N_TEST + 1)
    assert len(fmnist_scenes(fake_fmnist)["test"].images) == N_TEST + 1
    assert len(list((tmp_path / "cache").glob("fmnist-scenes-*.npz"))) == 2


def test_a_broken_cache_file_is_regenerated(fake_fmnist, tmp_path):
    first = fmnist_scenes(fake_fmnist)
    (path,) = (tmp_path / "cache").glob("fmnist-scenes-*.npz")
    path.write_bytes(b"not a zip")
    scenes_mod._scenes.cache_clear()
    again = fmnist_scenes(fake_fmnist)
    assert again["train"].images.tobytes() == first["train"].images.tobytes()


@pytest.mark.skipif(not DEBIAN_FMNIST.is_dir(), reason="needs the real Fashion-MNIST (dataset-fashion-mnist)")
def test_real_fashion_mnist_scenes_have_tight_boxes_and_the_documented_statistics(monkeypatch):
    monkeypatch.setattr(fmnist, "FALLBACK_DIRS", (DEBIAN_FMNIST,))
    monkeypatch.setattr(scenes_mod, "N_TRAIN_SCENES", 300)
    sc = fmnist_scenes()["train"]
    for n in range(len(sc.images)):
        for _, label, bx1, by1, bx2, by2 in isolated_objects(sc.boxes[n]):
            ys, xs = np.nonzero(sc.masks[n][by1:by2, bx1:bx2] == label)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (0, 0, bx2 - bx1, by2 - by1)
    pixels = sc.images / 255.0
    assert pixels.mean() == pytest.approx(scenes_mod.MEAN[0], rel=0.1)
    assert pixels.std() == pytest.approx(scenes_mod.STD[0], rel=0.1)


# ---------------------------------------------------------------- through get_data


def test_get_data_serves_padded_boxes_in_disjoint_seeded_splits(fake_fmnist):
    s = get_data("fmnist_detection", fake_fmnist, val_size=10, seed=3)
    assert (s.task, s.num_classes, s.input_shape) == ("detection", 11, (1, 128, 128))
    assert s.class_names[0] == "background" and s.class_names[1:] == list(fmnist.CLASS_NAMES)
    assert (len(s.train), len(s.val), len(s.test)) == (N_TRAIN - 10, 10, N_TEST)
    raw = fmnist_scenes(fake_fmnist)
    index = {img.tobytes(): i for i, img in enumerate(raw["train"].images)}

    def rows(ds) -> list[int]:
        restored = torch.round((ds.images[:, 0] * scenes_mod.STD[0] + scenes_mod.MEAN[0]) * 255).to(torch.uint8)
        return [index[img.numpy().tobytes()] for img in restored]  # KeyError: not a train scene

    train, val = rows(s.train), rows(s.val)
    assert not set(train) & set(val) and sorted(train + val) == list(range(N_TRAIN))
    assert torch.equal(s.val.targets, torch.from_numpy(raw["train"].boxes[val]))
    assert rows(get_data("fmnist_detection", fake_fmnist, val_size=10, seed=3).val) == val
    assert rows(get_data("fmnist_detection", fake_fmnist, val_size=10, seed=4).val) != val
    half = get_data("fmnist_detection", fake_fmnist, val_size=10, seed=3, fraction=0.5)
    assert rows(half.val) == val and set(rows(half.train)) < set(train) and len(half.train) == 25
    images, targets = next(iterate_batches(s.train, 8, shuffle=True, seed=0))
    assert images.shape == (8, 1, 128, 128) and images.dtype == torch.float32
    assert targets.shape == (8, 4, 5) and targets.dtype == torch.float32


def test_segmentation_serves_the_same_scenes_with_masks(fake_fmnist):
    det = get_data("fmnist_detection", fake_fmnist, val_size=10, seed=1)
    seg = get_data("fmnist_segmentation", fake_fmnist, val_size=10, seed=1)
    assert (seg.task, seg.num_classes, seg.class_names) == ("segmentation", 11, det.class_names)
    assert torch.equal(seg.val.images, det.val.images) and torch.equal(seg.test.images, det.test.images)
    images, masks = next(iterate_batches(seg.test, 8, shuffle=False))
    assert images.shape == (8, 1, 128, 128) and masks.shape == (8, 128, 128) and masks.dtype == torch.uint8  # uint8 in memory; the task widens it
    # Every object pixel lies in a box of its own label.
    boxes = det.test.targets[:8]
    for n in range(8):
        inside = torch.zeros(128, 128, dtype=torch.bool)
        for label, x1, y1, x2, y2 in boxes[n][boxes[n, :, 0] > 0].int().tolist():
            inside[y1:y2, x1:x2] |= masks[n, y1:y2, x1:x2] == label
        assert torch.equal(inside, masks[n] > 0)
    # Serving a split twice never hands out the cache itself.
    seg.test.targets.zero_()
    assert fmnist_scenes(fake_fmnist)["test"].masks.any()


@pytest.mark.parametrize("name", ["fmnist_detection", "fmnist_segmentation"])
def test_class_subsets_are_refused_in_one_line(fake_fmnist, name):
    with pytest.raises(ValueError) as err:
        get_data(name, fake_fmnist, classes=["Bag"])
    message = str(err.value)
    assert "\n" not in message and "data.classes" in message and name in message and "['Bag']" in message
    assert message.startswith("data.classes selects classes of a classification data set")


def test_missing_fashion_mnist_says_which_data_set_wanted_it(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"^fmnist_segmentation needs Fashion-MNIST: .*does not hold fashion_mnist.s IDX files"):
        get_data("fmnist_segmentation", tmp_path / "empty")
