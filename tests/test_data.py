"""Tests for the `data` package: every format from tiny generated files, splits, errors."""

from __future__ import annotations

import inspect
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import write_idx
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.data import Dataset

import data
from data import DatasetNotFoundError, get_data, iterate_batches
from data import _fashion_mnist as fmnist
from data._splits import allocate

FMNIST_NAMES = list(fmnist.CLASS_NAMES)
CONF = Path(data.__file__).resolve().parent.parent / "conf"
DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")

# ---------------------------------------------------------------- tiny files


def tagged_images(n: int, size: int) -> np.ndarray:
    """(n, size, size) uint8 images whose first two pixels encode the image number."""
    images = np.zeros((n, size, size), dtype=np.uint8)
    images[:, 0, 0] = np.arange(n) % 256
    images[:, 0, 1] = np.arange(n) // 256
    return images


def image_ids(ds: data.InMemoryDataset, mean: float = 0.2860, std: float = 0.3530) -> list[int]:
    """Recover the image numbers written by `tagged_images` from normalised tensors."""
    pixels = torch.round((ds.images[:, 0, 0, :2] * std + mean) * 255).to(torch.int64)
    return (pixels[:, 0] + 256 * pixels[:, 1]).tolist()


def make_fmnist(folder: Path, n_train: int = 300, n_test: int = 50, gz: bool = True) -> Path:
    """Tiny Fashion-MNIST: labels cycle 0..9, so every class has n/10 images."""
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte", tagged_images(n, 28), gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10, gz)
    return folder


@pytest.fixture
def no_fallback(monkeypatch, tmp_path):
    """Switch off the Debian fallback folder, so tests never read the real dataset."""
    monkeypatch.setattr(fmnist, "FALLBACK_DIRS", (tmp_path / "no-debian-here",))


@pytest.fixture
def fm_root(tmp_path, no_fallback) -> Path:
    return make_fmnist(tmp_path / "fm")


def fm(root: Path, **kwargs) -> data.DataSplits:
    kwargs.setdefault("val_size", 50)
    return get_data("fashion_mnist", str(root), **kwargs)


def make_cifar(root: Path, hundred: bool) -> tuple[Path, np.ndarray, np.ndarray]:
    """Tiny CIFAR pickles; returns the folder, all training rows and training labels."""
    k = 100 if hundred else 10
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    label_key = "fine_labels" if hundred else "labels"
    files = ["train"] if hundred else [f"data_batch_{i}" for i in range(1, 6)]
    per_file = 2 * k // len(files)
    rows, labels = [], []
    for i, name in enumerate([*files, "test"]):
        x = rng.integers(0, 256, size=(per_file, 3072), dtype=np.uint8)
        y = [(i * per_file + j) % k for j in range(per_file)]
        target = folder / ("test" if hundred else "test_batch") if name == "test" else folder / name
        with open(target, "wb") as f:
            pickle.dump({"data": x, label_key: y}, f)
        if name != "test":
            rows.append(x)
            labels += y
    names = [f"class{i}" for i in range(k)]
    meta = (
        {"fine_label_names": names}
        if hundred
        else {"label_names": list(data._cifar.CIFAR10_CLASSES)}
    )
    with open(folder / ("meta" if hundred else "batches.meta"), "wb") as f:
        pickle.dump(meta, f)
    return folder, np.concatenate(rows), np.array(labels)


def make_image_folder(root: Path, test_dir: str = "val") -> Path:
    """Class folders of 12x10 images: red is a left-to-right ramp (so a crop or a flip changes the
    image), green is constant and encodes the file number (``folder_image_id`` reads it back
    through any crop or resize), blue is 200."""
    from PIL import Image

    ramp = np.linspace(0, 255, 12).astype(np.uint8)
    number = 0
    for split, n in (("train", 4), (test_dir, 2)):
        for cls in ("cat", "dog", "owl"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                pixels = np.empty((10, 12, 3), dtype=np.uint8)
                pixels[..., 0], pixels[..., 1], pixels[..., 2] = ramp, ID_STEP * number, 200
                ext = "JPEG" if i == 0 else "png"
                Image.fromarray(pixels).save(root / split / cls / f"{i}.{ext}")
                number += 1
    return root


ID_STEP = 10  # green levels per file number: wide enough for JPEG's rounding of a flat channel


def folder_image_id(image: torch.Tensor) -> int:
    """The file number ``make_image_folder`` wrote into the green channel of a normalised image."""
    from data._folder import IMAGENET_MEAN, IMAGENET_STD

    green = (image[1].mean().item() * IMAGENET_STD[1] + IMAGENET_MEAN[1]) * 255
    return round(green / ID_STEP)


# ---------------------------------------------------------------- each format loads


def test_listed_datasets_are_exactly_the_ones_get_data_knows(tmp_path, no_fallback):
    names = data.list_datasets()
    # Each listed name reaches its own loader: no files here, so the loader says where it looked.
    for name in names:
        with pytest.raises(DatasetNotFoundError):
            get_data(name, tmp_path / "empty")
    # An unknown name is refused with the same list, and every data config names a listed one.
    with pytest.raises(ValueError, match=f"unknown dataset 'mnistt'; valid: {', '.join(names)}$"):
        get_data("mnistt")
    loaded = [yaml.safe_load(f.read_text()) for f in (CONF / "data").glob("*.yaml")]
    configs = {c["name"] for c in loaded if "factory" not in c}  # data=custom is named by its factory
    assert configs and configs <= set(names)


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("sub", ["", "FashionMNIST/raw"])
def test_fashion_mnist_loads_idx_files(tmp_path, no_fallback, gz, sub):
    make_fmnist(tmp_path / "fm" / sub, gz=gz)
    s = get_data("fashion_mnist", tmp_path / "fm", val_size=50)
    assert (len(s.train), len(s.val), len(s.test)) == (250, 50, 50)
    assert s.train.images.shape == (250, 1, 28, 28) and s.train.images.dtype == torch.float32
    assert s.train.targets.dtype == torch.int64
    assert s.num_classes == 10 and s.class_names == FMNIST_NAMES and s.eval_classes is None
    assert s.input_shape == (1, 28, 28)
    # labels were written as image number % 10; the background pixel is normalised 0
    assert s.train.targets.tolist() == [i % 10 for i in image_ids(s.train)]
    assert s.test.targets.tolist() == list(range(10)) * 5
    assert s.test.images[0, 0, 5, 5].item() == pytest.approx(-0.2860 / 0.3530, abs=1e-6)


def test_fashion_mnist_found_in_fallback_folder(monkeypatch, tmp_path):
    monkeypatch.setattr(fmnist, "FALLBACK_DIRS", (make_fmnist(tmp_path / "debian"),))
    assert len(get_data("fashion_mnist", val_size=10).test) == 50


@pytest.mark.parametrize("hundred", [False, True])
def test_cifar_loads_pickles(tmp_path, hundred):
    _, rows, labels = make_cifar(tmp_path, hundred)
    name, k = ("cifar100", 100) if hundred else ("cifar10", 10)
    s = get_data(name, tmp_path, val_size=0)
    n_test = len(rows) // (1 if hundred else 5)  # one more file like a training file
    assert (len(s.train), len(s.val), len(s.test)) == (len(rows), 0, n_test)
    assert s.train.images.shape == (len(rows), 3, 32, 32) and s.input_shape == (3, 32, 32)
    assert s.train.targets.tolist() == labels.tolist()
    assert s.num_classes == k and len(s.class_names) == k
    layout = data._cifar._CIFAR100 if hundred else data._cifar._CIFAR10
    mean, std = layout.mean, layout.std
    # row layout: 1024 red, 1024 green, 1024 blue values, each 32x32 in row order
    for c in range(3):
        raw = s.train.images[3, c] * std[c] + mean[c]
        expected = torch.from_numpy(rows[3, 1024 * c : 1024 * (c + 1)].reshape(32, 32)) / 255
        assert torch.allclose(raw, expected.float(), atol=1e-5)


def test_cifar10_found_when_root_is_the_batch_folder(tmp_path):
    folder, rows, _ = make_cifar(tmp_path, hundred=False)
    assert len(get_data("cifar10", folder, val_size=0).train) == len(rows)


def test_cifar100_class_names_come_from_meta(tmp_path):
    make_cifar(tmp_path, hundred=True)
    s = get_data("cifar100", tmp_path, val_size=0, classes=["class7", 42])
    assert s.class_names == ["class7", "class42"] and set(s.test.targets.tolist()) == {0, 1}


@pytest.mark.parametrize(("name", "test_dir"), [("imagenet", "val"), ("image_folder", "test")])
def test_image_folder_loads(tmp_path, name, test_dir):
    root = make_image_folder(tmp_path / "imgs", test_dir)
    s = get_data(name, root, val_size=3)
    assert s.class_names == ["cat", "dog", "owl"] and s.num_classes == 3
    assert (len(s.train), len(s.val), len(s.test)) == (9, 3, 6)
    assert s.input_shape == (3, 224, 224)
    image, label = s.test[0]
    assert image.shape == (3, 224, 224) and label == 0
    assert sorted(s.val.targets.tolist()) == [0, 1, 2]  # stratified: one per class
    # train/ holds files 0..11 (4 per class), the test folder 12..17; val is carved from train/.
    ids = {name: [folder_image_id(split[i][0]) for i in range(len(split))] for name, split in
           (("train", s.train), ("val", s.val), ("test", s.test))}
    assert sorted(ids["train"] + ids["val"]) == list(range(12)) and sorted(ids["test"]) == list(range(12, 18))
    assert [i // 4 for i in ids["train"]] == s.train.targets.tolist()  # labels follow the files
    # Training reads are augmented (a seeded random crop and flip of a ramp differ); validation
    # and train_eval (the same samples as train, in order) read the plain centre crop.
    torch.manual_seed(0)
    reads = [s.train[0][0] for _ in range(4)]
    assert any(not torch.equal(reads[0], r) for r in reads[1:])
    assert torch.equal(s.val[0][0], s.val[0][0]) and torch.equal(s.train_eval[0][0], s.train_eval[0][0])
    assert [folder_image_id(s.train_eval[i][0]) for i in range(len(s.train))] == ids["train"]
    assert s.train_eval.targets.tolist() == s.train.targets.tolist()
    images, labels = next(iterate_batches(s.train, 4, shuffle=True, seed=0))
    assert images.shape == (4, 3, 224, 224) and labels.dtype == torch.int64


def test_image_folder_class_subset_keeps_or_remaps_ids(tmp_path):
    root = make_image_folder(tmp_path / "imgs")
    keep = get_data("imagenet", root, val_size=0, classes=["owl", 0], remap_labels=False)
    assert keep.eval_classes == [2, 0] and keep.num_classes == 3
    assert sorted(set(keep.test.targets.tolist())) == [0, 2]
    remap = get_data("imagenet", root, val_size=0, classes=["owl", 0])
    assert remap.class_names == ["owl", "cat"] and remap.num_classes == 2
    assert [remap.test[i][1] for i in range(len(remap.test))] == remap.test.targets.tolist()
    assert sorted(remap.test.targets.tolist()) == [0, 0, 1, 1]


# ---------------------------------------------------------------- splits


def test_val_and_train_are_disjoint_and_seeded(fm_root):
    a, b, other = fm(fm_root, seed=3), fm(fm_root, seed=3), fm(fm_root, seed=4)
    train, val = set(image_ids(a.train)), set(image_ids(a.val))
    assert not train & val and len(train | val) == 300
    assert image_ids(a.val) == image_ids(b.val) and image_ids(a.train) == image_ids(b.train)
    assert image_ids(a.val) != image_ids(other.val)
    assert torch.bincount(a.val.targets).tolist() == [5] * 10  # stratified by class


def test_val_size_share(fm_root):
    s = fm(fm_root, val_size=0.1)
    assert (len(s.train), len(s.val)) == (270, 30)
    assert torch.bincount(s.val.targets).tolist() == [3] * 10  # stratified by class
    assert not set(image_ids(s.train)) & set(image_ids(s.val))


def test_splits_ignore_the_global_rng(fm_root):
    # Same seed, same split, whatever else the process has drawn (a Ray worker, a second trial).
    torch.manual_seed(1)
    a = fm(fm_root, seed=3, fraction=0.5)
    torch.manual_seed(2)
    torch.rand(100)
    b = fm(fm_root, seed=3, fraction=0.5)
    assert image_ids(a.val) == image_ids(b.val) and image_ids(a.train) == image_ids(b.train)


def test_fractions_form_a_nested_chain_that_never_touches_val(fm_root):
    val = set(image_ids(fm(fm_root).val))
    chain = [set(image_ids(fm(fm_root, fraction=f).train)) for f in (0.04, 0.2, 0.52, 0.8, 1.0)]
    assert [len(t) for t in chain] == [10, 50, 130, 200, 250]
    assert all(small < big for small, big in zip(chain, chain[1:], strict=False))
    assert not chain[-1] & val and len(chain[-1] | val) == 300  # fraction 1: all but val


@pytest.mark.parametrize("fraction", [0.05, 0.13, 0.5, 0.99])
def test_fraction_is_stratified_deterministic_and_nested(fm_root, fraction):
    full = fm(fm_root)
    s = fm(fm_root, fraction=fraction)
    assert len(s.train) == round(fraction * 250)
    per_class = torch.bincount(s.train.targets, minlength=10)
    assert all(abs(c - fraction * 25) < 1 for c in per_class.tolist())
    assert image_ids(s.train) == image_ids(fm(fm_root, fraction=fraction).train)
    assert image_ids(s.val) == image_ids(full.val)  # fraction never moves the val split
    assert set(image_ids(s.train)) <= set(
        image_ids(fm(fm_root, fraction=min(1, 2 * fraction)).train)
    )


@given(
    counts=st.lists(st.integers(0, 50), min_size=1, max_size=12).filter(lambda c: sum(c) > 0),
    share=st.floats(0, 1),
)
def test_allocate_keeps_proportions_within_one(counts, share):
    total = round(share * sum(counts))
    out = allocate(total, counts)
    assert sum(out) == total
    assert all(
        abs(o - total * c / sum(counts)) < 1 and 0 <= o <= c
        for o, c in zip(out, counts, strict=True)
    )


def test_class_subset_remaps_labels(fm_root):
    s = fm(fm_root, val_size=6, classes=["Sandal", "Sneaker", 9])
    assert s.num_classes == 3 and s.class_names == ["Sandal", "Sneaker", "Ankle boot"]
    assert s.eval_classes is None
    assert (len(s.train), len(s.val), len(s.test)) == (84, 6, 15)
    for split in (s.train, s.val, s.test):
        assert set(split.targets.tolist()) == {0, 1, 2}
    original = [i % 10 for i in image_ids(s.train)]
    assert [[5, 7, 9][t] for t in s.train.targets.tolist()] == original


def test_class_subset_keeps_labels(fm_root):
    s = fm(fm_root, val_size=6, classes=["Sandal", "Sneaker", "Ankle boot"], remap_labels=False)
    assert s.num_classes == 10 and s.class_names == FMNIST_NAMES
    assert s.eval_classes == [5, 7, 9]
    for split in (s.train, s.val, s.test):
        assert set(split.targets.tolist()) == {5, 7, 9}


def test_class_subset_file_works_with_get_data(fm_root):
    classes = data.load_class_subset("fmnist_footwear")
    s = fm(fm_root, val_size=6, classes=classes)
    assert s.class_names == classes and s.num_classes == len(classes)
    # Label k is the k-th class of the file: image number % 10 is the original Fashion-MNIST id.
    for split in (s.train, s.val):
        assert [FMNIST_NAMES[i % 10] for i in image_ids(split)] == [classes[t] for t in split.targets.tolist()]


@pytest.mark.parametrize("name", data.list_class_subsets())
def test_every_class_subset_file_lists_distinct_classes(name):
    classes = data.load_class_subset(name)
    assert classes and len(set(classes)) == len(classes)
    assert all(isinstance(c, (str, int)) and not isinstance(c, bool) for c in classes)


def test_inputs_are_not_mutated(fm_root):
    classes = ["Sandal", 9]
    fm(fm_root, classes=classes)
    assert classes == ["Sandal", 9]


# ---------------------------------------------------------------- errors


def test_missing_dataset_says_where_and_how(tmp_path, no_fallback):
    with pytest.raises(DatasetNotFoundError) as err:
        get_data("fashion_mnist", tmp_path / "empty")
    msg = str(err.value)
    assert "\n" not in msg
    # a given root is the only place looked in (no silent fallback to the system copy)
    for part in (str(tmp_path / "empty"), "FashionMNIST/raw", "data.root=null", "data.download"):
        assert part in msg
    assert "no-debian-here" not in msg
    with pytest.raises(DatasetNotFoundError) as err:  # no root: the fallback folders, and how to install
        get_data("fashion_mnist")
    for part in ("no-debian-here", "apt-get", "data.download"):
        assert part in str(err.value)
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "imagenet", "image_folder"])
def test_other_missing_datasets_are_one_line(tmp_path, name):
    for root in (None, tmp_path):
        with pytest.raises(DatasetNotFoundError, match="data.root") as err:
            get_data(name, root)
        assert "\n" not in str(err.value)


# Each message names the key and carries the offending value (the parts listed), on one line.
BAD_INPUTS = [
    ({"name": "mnistt"}, ("unknown dataset 'mnistt'; valid: cifar10",)),
    ({"fraction": 1.5}, ("data.fraction", "1.5", "(0, 1]")),
    ({"fraction": 0.0}, ("data.fraction", "0.0")),
    ({"fraction": math.nan}, ("data.fraction", "nan")),
    ({"fraction": True}, ("data.fraction", "True")),
    ({"fraction": "half"}, ("data.fraction", "'half'")),
    ({"val_size": -1}, ("data.val_size", "-1")),
    ({"val_size": 1.0}, ("data.val_size", "1.0", "(0, 1)")),
    ({"val_size": 0.0}, ("data.val_size", "0.0")),
    ({"val_size": True}, ("data.val_size", "True")),
    ({"val_size": "5k"}, ("data.val_size", "'5k'")),
    ({"seed": -1}, ("data.seed", "-1")),
    ({"seed": 1.5}, ("data.seed", "1.5")),
    ({"classes": "Sandal"}, ("data.classes", "'Sandal'")),
    ({"classes": []}, ("data.classes", "[]")),
    (
        {"classes": ["sandals"]},
        ("data.classes: unknown class 'sandals' for fashion_mnist; did you mean 'Sandal'? valid: T-shirt/top, Trouser",),
    ),
    ({"classes": [10]}, ("data.classes", "class id 10")),
    ({"classes": [True]}, ("data.classes", "True")),
    ({"classes": ["Sandal", 5]}, ("data.classes: 5 (class 5, 'Sandal') is listed twice",)),
    ({"remap_labels": "yes"}, ("data.remap_labels", "'yes'")),
    ({"download": "no"}, ("data.download", "'no'")),
    ({"download": True, "root": None}, ("data.download=true needs data.root",)),
    ({"root": 3}, ("data.root", "3")),
    ({"name": "imagenet", "download": True}, ("data.download=true is not supported for imagenet",)),
]


@pytest.mark.parametrize(("kwargs", "parts"), BAD_INPUTS)
def test_bad_inputs_fail_before_loading(tmp_path, no_fallback, kwargs, parts):
    kwargs = {"name": "fashion_mnist", "root": str(tmp_path / "nothing-here"), **kwargs}
    with pytest.raises(ValueError) as err:
        get_data(**kwargs)
    # not DatasetNotFoundError: the argument was rejected before any file was looked for
    assert type(err.value) is ValueError
    message = str(err.value)
    assert all(part in message for part in parts), (parts, message)
    assert "\n" not in message


def test_val_size_larger_than_training_set(fm_root):
    with pytest.raises(ValueError, match=r"data.val_size=300 leaves no training images.*has 300"):
        fm(fm_root, val_size=300)
    with pytest.raises(ValueError, match="has 30"):
        fm(fm_root, val_size=30, classes=["Bag"])


# ---------------------------------------------------------------- batches


def epoch_ids(ds, **kwargs) -> list[int]:
    return [i for x, _ in iterate_batches(ds, **kwargs) for i in x.view(len(x), -1)[:, 0].tolist()]


@pytest.mark.parametrize("batch_size", [1, 7, 10, 64])
def test_in_memory_batches_cover_each_sample_once(batch_size):
    ds = data.InMemoryDataset(torch.arange(50.0).view(50, 1, 1, 1), torch.arange(50) % 3)
    ordered = epoch_ids(ds, batch_size=batch_size, shuffle=False)
    assert ordered == list(range(50))
    shuffled = epoch_ids(ds, batch_size=batch_size, shuffle=True, seed=1)
    assert sorted(shuffled) == list(range(50)) and shuffled != ordered
    assert shuffled == epoch_ids(ds, batch_size=batch_size, shuffle=True, seed=1)
    assert shuffled != epoch_ids(ds, batch_size=batch_size, shuffle=True, seed=2)
    dropped = epoch_ids(ds, batch_size=batch_size, shuffle=True, seed=1, drop_last=True)
    assert len(dropped) == 50 - 50 % batch_size
    for x, y in iterate_batches(ds, batch_size, shuffle=True, seed=0):
        assert torch.equal(y, x.view(-1).long() % 3)  # images and labels stay paired


class PlainDataset(Dataset):
    def __len__(self) -> int:
        return 23

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.tensor([float(i)]), i % 2


def test_other_datasets_go_through_a_seeded_dataloader():
    ds = PlainDataset()
    shuffled = epoch_ids(ds, batch_size=5, shuffle=True, seed=4)
    assert sorted(shuffled) == list(range(23))
    assert shuffled == epoch_ids(ds, batch_size=5, shuffle=True, seed=4)
    assert epoch_ids(ds, batch_size=5, shuffle=False) == list(range(23))
    assert len(epoch_ids(ds, batch_size=5, shuffle=False, drop_last=True)) == 20
    x, y = next(iterate_batches(ds, 5, shuffle=False))
    assert x.shape == (5, 1) and y.tolist() == [0, 1, 0, 1, 0]


def test_iterate_batches_does_not_touch_global_rng():
    ds = data.InMemoryDataset(torch.zeros(10, 1, 1, 1), torch.zeros(10, dtype=torch.int64))
    torch.manual_seed(0)
    expected = torch.rand(1)
    torch.manual_seed(0)
    list(iterate_batches(ds, 3, shuffle=True, seed=5))
    list(iterate_batches(PlainDataset(), 3, shuffle=True, seed=5))
    assert torch.equal(torch.rand(1), expected)


@pytest.mark.parametrize("batch_size", [0, -1, 2.0, True])
def test_iterate_batches_rejects_bad_batch_size(batch_size):
    with pytest.raises(ValueError, match="batch_size"):
        next(iterate_batches(PlainDataset(), batch_size, shuffle=False))


# ---------------------------------------------------------------- config files


def test_imagenet_voc_subset_is_consistent():
    cfg = yaml.safe_load((CONF / "classes" / "imagenet_voc.yaml").read_text())
    categories, flat = cfg["categories"], cfg["classes"]
    assert len(categories) == 20
    union = [i for ids in categories.values() for i in ids]
    assert all(isinstance(i, int) and 0 <= i < 1000 for i in union)
    assert len(set(union)) == len(union) and len(set(flat)) == len(flat)
    assert flat == union
    assert data.load_class_subset("imagenet_voc") == flat


def test_unknown_class_subset_lists_the_files():
    with pytest.raises(
        ValueError, match="unknown class subset 'voc'; valid: .*fmnist_footwear.*imagenet_voc"
    ):
        data.load_class_subset("voc")


@pytest.mark.parametrize("name", ["fashion_mnist", "cifar10", "cifar100", "imagenet"])
def test_data_configs_match_get_data(name, tmp_path, no_fallback):
    cfg = yaml.safe_load((CONF / "data" / f"{name}.yaml").read_text())
    loader_keys = {"batch_size", "eval_batch_size"}
    assert cfg["name"] == name and loader_keys <= set(cfg)
    assert all(isinstance(cfg[k], int) and cfg[k] >= 1 for k in loader_keys), cfg
    # Every other key is a get_data argument, and get_data's checks accept the values as given:
    # with no files, it gets as far as looking for them (a bad value would stop it earlier).
    params = set(inspect.signature(get_data).parameters)
    args = {k: v for k, v in cfg.items() if k not in loader_keys}
    assert set(args) <= params
    with pytest.raises(DatasetNotFoundError):
        get_data(**{**args, "root": tmp_path / "nothing-here"})


# ---------------------------------------------------------------- the real data set


@pytest.mark.skipif(
    not DEBIAN_FMNIST.is_dir(), reason="Debian's dataset-fashion-mnist not installed"
)
def test_real_fashion_mnist_sizes():
    s = get_data("fashion_mnist")
    assert (len(s.train), len(s.val), len(s.test)) == (55000, 5000, 10000)
    assert s.num_classes == 10 and s.train.images.shape[1:] == (1, 28, 28)
    assert abs(s.train.images.mean().item()) < 0.01 and abs(s.train.images.std().item() - 1) < 0.01
