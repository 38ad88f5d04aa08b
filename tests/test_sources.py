"""Models and data from outside the project: torchvision / timm / custom models by name, a folder
of the user's images, a user's data factory; their bad inputs; both routes end to end."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_refused
from torch import nn
from torch.utils.data import Dataset

from data import dataset_fingerprint, get_data, iterate_batches, known_class_names
from trainables.core.models import MODELS, build_model, check_model_fits
from trainables.run import main as run_main

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- generated data


def _read_idx(path: Path) -> np.ndarray:
    raw = gzip.open(path).read()
    ndim = raw[3]
    dims = np.frombuffer(raw[4 : 4 + 4 * ndim], ">u4")
    return np.frombuffer(raw[4 + 4 * ndim :], np.uint8).reshape(dims)


def write_png_folder(fmnist: Path, out: Path, splits: dict[str, int], classes: int = 10, seed: int = 0) -> Path:
    """A class-folder tree of PNGs drawn (seeded) from an IDX Fashion-MNIST: ``<split>/<class>/<i>.png``
    with ``splits[split]`` images per class (split "" for a flat ``<class>/<i>.png`` tree)."""
    from PIL import Image

    images, labels = _read_idx(fmnist / "train-images-idx3-ubyte.gz"), _read_idx(fmnist / "train-labels-idx1-ubyte.gz")
    names = [n.replace("/", "-") for n in known_class_names("fashion_mnist")]  # "T-shirt/top" is no folder name
    rng = np.random.default_rng(seed)
    for c in range(classes):
        rows = rng.permutation(np.flatnonzero(labels == c))
        start = 0
        for split, n in splits.items():
            folder = out / split / names[c]
            folder.mkdir(parents=True, exist_ok=True)
            for i in rows[start : start + n]:
                Image.fromarray(images[i]).save(folder / f"{i}.png")
            start += n
    return out


@pytest.fixture(scope="module")
def png_folder(tiny_fmnist, tmp_path_factory) -> Path:
    """train/ and test/ of 10 Fashion-MNIST classes, 8 and 2 PNGs per class (28x28 grey)."""
    return write_png_folder(tiny_fmnist, tmp_path_factory.mktemp("pngs"), {"train": 8, "test": 2})


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """Write a module of the user's into a folder on sys.path; returns a function name -> factory spec."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(name: str, source: str) -> str:
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        return name

    return write


# ---------------------------------------------------------------- model sources


def test_torchvision_model_by_name_is_a_registry_builder():
    builder = MODELS.get("torchvision:mobilenet_v3_small")
    assert builder.task == "classification" and builder.source == "torchvision"
    model = build_model("torchvision:mobilenet_v3_small", num_classes=4)
    assert model.model_name == "torchvision:mobilenet_v3_small" and model.task == "classification"
    assert model.head_name == "classifier.3" and model.get_submodule("classifier.3").out_features == 4
    assert model.eval()(torch.zeros(2, 3, 32, 32)).shape == (2, 4)
    # kwargs pass through to torchvision: width_mult changes the first conv's width
    slim = build_model("torchvision:mobilenet_v3_small", num_classes=4, width_mult=0.5)
    assert slim.features[0][0].out_channels < model.features[0][0].out_channels
    # googlenet trains without its auxiliary heads, so a training forward is one logits tensor
    net = build_model("torchvision:googlenet", num_classes=3, init_weights=False).train()
    assert isinstance(net(torch.zeros(2, 3, 64, 64)), torch.Tensor)


def test_timm_model_by_name():
    pytest.importorskip("timm")
    model = build_model("timm:resnet18d", num_classes=3)
    assert model.head_name == "fc" and model.model_name == "timm:resnet18d"
    assert model.eval()(torch.zeros(2, 3, 32, 32)).shape == (2, 3)
    grey = build_model("timm:resnet18d", num_classes=3, in_chans=1)
    assert grey.input_shape[0] == 1


def test_custom_factory_gets_num_classes_and_kwargs():
    model = build_model("custom:examples.tiny_custom:net", num_classes=5, width=4)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [4, 8, 8]
    assert model.eval()(torch.zeros(2, 1, 28, 28)).shape == (2, 5)
    assert model.head_name == "13" and model.model_name == "custom:examples.tiny_custom:net"


def test_factory_without_num_classes_is_probed(user_module):
    mod = user_module("h5_fixed_width", """
        from torch import nn
        def net(width=4):
            return nn.Sequential(nn.Conv2d(1, width, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 7))
    """)
    check_model_fits(f"custom:{mod}:net", {}, (1, 28, 28), 7, data_name="d")  # 7 wide: fits
    with pytest.raises(ValueError, match=r"output for 2 images must be \(2, 3\) logits .* \(let the factory take "
                                         r"num_classes\), but got \(2, 7\)"):
        check_model_fits(f"custom:{mod}:net", {}, (1, 28, 28), 3, data_name="d")


def test_editing_a_custom_network_trains_a_new_base_model(user_module, tiny_fmnist, tmp_path):
    # The network's name does not say what it builds: the module's source is part of the cache key.
    from trainables.cli.base_model import get_base_model, model_code
    from trainables.protocol.config import PretrainConfig

    assert model_code("small_cnn") is None and model_code("torchvision:resnet18") is None
    body = """
        from torch import nn
        def net(num_classes=10, width=WIDTH):
            return nn.Sequential(nn.Conv2d(1, width, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(width, num_classes))
    """
    mod = user_module("h_edit_net", body.replace("WIDTH", "4"))
    splits = get_data("fashion_mnist", str(tiny_fmnist), val_size=50)
    pretrain = PretrainConfig(epochs=1, lr=0.01)

    def base():
        return get_base_model(f"custom:{mod}:net", {}, 10, lambda: splits, {"name": "tiny"}, pretrain, tmp_path / "cache",
                              log=lambda *_: None)

    first, again = base()[1], base()[1]
    assert first == again and first.is_file()  # unchanged code: the cached entry
    (tmp_path / f"{mod}.py").write_text(textwrap.dedent(body.replace("WIDTH", "6")))
    edited = base()[1]
    assert edited != first and edited.is_file()


def test_unknown_source_and_names_are_one_line():
    for name, musts in [
        ("tv:resnet18", ["unknown model source 'tv'", "valid sources: custom:, timm:, torchvision:"]),
        ("torchvision:mobilenet_v3_smal", ["model.name", "'mobilenet_v3_smal'", "did you mean mobilenet_v3_small"]),
        ("custom:h5_missing_module:net", ["model.factory=h5_missing_module:net does not import",
                                          "ModuleNotFoundError"]),
        ("custom:examples.tiny_custom:nope", ["module examples.tiny_custom has no 'nope'"]),
        ("custom:not a factory", ["model.factory must be <module>:<callable>", "'not a factory'"]),
    ]:
        with pytest.raises(ValueError) as err:
            build_model(name)
        assert "\n" not in str(err.value)
        for must in musts:
            assert must in str(err.value), (must, str(err.value))


# ---------------------------------------------------------------- folder data


def test_folder_with_test_split_serves_data_size(png_folder):
    s = get_data("image_folder", png_folder, val_size=10, seed=0, options={"size": "32"})
    assert s.num_classes == 10 and s.class_names[:2] == ["Ankle boot", "Bag"]  # sorted folder names
    assert (len(s.train), len(s.val), len(s.test)) == (70, 10, 20)
    assert s.input_shape == (3, 32, 32) and s.train[0][0].shape == (3, 32, 32) and s.test[0][0].shape == (3, 32, 32)
    assert torch.bincount(s.val.targets).tolist() == [1] * 10  # the project's stratified, seeded carve-out
    images, labels = next(iterate_batches(s.train, 8, shuffle=True, seed=0, shard=(1, 2)))
    assert images.shape == (8, 3, 32, 32) and labels.dtype == torch.int64


def test_folder_without_test_holds_out_the_same_files_for_any_subset(tiny_fmnist, tmp_path):
    flat = write_png_folder(tiny_fmnist, tmp_path / "flat", {"": 10}, classes=4)
    whole = get_data("image_folder", flat, val_size=4, seed=0, options={"size": "28"})
    assert len(whole.test) == 8 and torch.bincount(whole.test.targets).tolist() == [2, 2, 2, 2]  # 20% per class
    assert len(whole.train) + len(whole.val) == 32
    subset = get_data("image_folder", flat, val_size=2, seed=5, classes=["Pullover", "Trouser"])
    assert _files(subset.test, "Trouser") == _files(whole.test, "Trouser") and len(_files(whole.test, "Trouser")) == 2  # held out per class: neither the seed nor the subset moves it


def _files(split, cls: str) -> list[str]:
    """The file names of class folder ``cls`` in a split (an ``ImageFiles`` or a relabelled subset of one)."""
    samples = [split.base.samples[int(i)] for i in split.indices] if hasattr(split, "base") else split.samples
    return sorted(Path(p).name for p, _ in samples if Path(p).parent.name == cls)


def test_folder_fingerprint_follows_the_files(tiny_fmnist, tmp_path):
    a = write_png_folder(tiny_fmnist, tmp_path / "a", {"train": 2}, classes=2, seed=0)
    b = write_png_folder(tiny_fmnist, tmp_path / "b", {"train": 2}, classes=2, seed=1)
    assert dataset_fingerprint("image_folder", a) != dataset_fingerprint("image_folder", b)
    assert dataset_fingerprint("image_folder", a) == dataset_fingerprint("image_folder", a)
    assert dataset_fingerprint("fashion_mnist", tiny_fmnist) is None  # a registered set: the key stays as it was


# ---------------------------------------------------------------- custom data


class _NoTargets(Dataset):
    """A user's Dataset without .targets: its labels are read by iterating it once."""

    def __init__(self, n: int):
        self.x = torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(n))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], i % 3


def test_custom_data_factory_splits_subsets_and_fractions():
    s = get_data("custom:examples.tiny_custom:data", val_size=50, seed=1, fraction=0.5)
    assert s.class_names == ["top", "upper", "middle", "lower", "bottom"] and s.input_shape == (1, 28, 28)
    assert len(s.val) == 50 and torch.bincount(s.val.targets).tolist() == [10] * 5
    assert len(s.train) == 975 and s.train_size_full == 1950 and len(s.test) == 500
    again = get_data("custom:examples.tiny_custom:data", val_size=50, seed=1, fraction=0.5)
    assert torch.equal(s.val.images, again.val.images)
    sub = get_data("custom:examples.tiny_custom:data", val_size=10, classes=["bottom", "top"])
    assert sub.class_names == ["bottom", "top"] and set(sub.test.targets.tolist()) == {0, 1}


def test_custom_data_without_targets_and_with_own_val(monkeypatch):
    module = type(sys)("h5_own_val")  # a user's module, already imported
    module.make = lambda: {"train": _NoTargets(30), "test": _NoTargets(9), "val": _NoTargets(6)}
    monkeypatch.setitem(sys.modules, "h5_own_val", module)
    s = get_data("custom:h5_own_val:make", val_size=0)
    assert (len(s.train), len(s.val), len(s.test)) == (30, 6, 9) and s.class_names == ["0", "1", "2"]
    assert s.train.targets.tolist() == [i % 3 for i in range(30)]
    with pytest.raises(ValueError, match=r"data.val_size must be 0 when custom:h5_own_val:make gives its own "
                                         r"validation set, but got 5"):
        get_data("custom:h5_own_val:make", val_size=5)


@pytest.mark.parametrize(("body", "musts"), [
    ("return [train, train, train]", ["must return (train, test) Datasets or a mapping", "it returned a list"]),
    ("return {'train': train}", ["it returned a mapping with keys ['train']"]),
    ("return {'train': train, 'test': 3}", ["its test is a int, not a Dataset"]),
    ("return TensorDataset((x * 255).to(torch.uint8), y), train",
     ["the image of train[0] is a torch.uint8 tensor of shape (1, 4, 4), not a float (C, H, W) tensor"]),
    ("return {'train': train, 'test': train, 'classes': ['a']}", ["its labels span 0..1, outside 0..0"]),
    ("return TensorDataset(x[:, :, :2], y), train", ["its images differ in shape between sets"]),
])
def test_data_factory_returning_the_wrong_things_is_refused(user_module, body, musts):
    mod = user_module(f"h5_bad_data_{abs(hash(body))}", f"""
        import torch
        from torch.utils.data import TensorDataset
        def make():
            x, y = torch.rand(6, 1, 4, 4), torch.arange(6) % 2
            train = TensorDataset(x, y)
            {body}
    """)
    with pytest.raises(ValueError) as err:
        get_data(f"custom:{mod}:make", val_size=2)
    assert "\n" not in str(err.value) and f"data.factory={mod}:make must return" in str(err.value)
    for must in musts:
        assert must in str(err.value), (must, str(err.value))


# ---------------------------------------------------------------- bad input on the command line


def _cli(tmp_path: Path, *args: str) -> list[str]:
    return [*args, f"cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'out'}", "progress=false"]


def _no_training(tmp_path: Path) -> None:
    assert not list((tmp_path / "cache").glob("base_models/*")) and not (tmp_path / "out").exists()


BAD_SOURCES = [
    (["model=torchvision"], ["model.name must be given", "but got ???"]),
    (["model=torchvision", "model.name=mobilenet_v3_smal"],
     ["model.name must be a torchvision classification model", "'mobilenet_v3_smal'", "did you mean mobilenet_v3_small"]),
    (["model=custom"], ["model.factory must be given"]),
    (["model=custom", "model.factory=h5_no_such_module:net"],
     ["model.factory=h5_no_such_module:net does not import", "working directory or PYTHONPATH"]),
    (["model=custom", "model.factory=examples.tiny_custom:net", "model.name=mine"], ["model.name must be null"]),
    (["model=torchvision", "model.name=resnet18", "model.factory=examples.tiny_custom:net"],
     ["model.factory must be null with model=torchvision"]),
    (["model=torchvision", "model.name=resnet18", "model.input_shape=[3,32]"],
     ["model.input_shape must be null or [C, H, W]", "[3, 32]"]),
    (["data=custom"], ["data.factory must be given"]),
    (["data=custom", "data.factory=h5_no_such_module:data"], ["data.factory=h5_no_such_module:data does not import"]),
    (["data=custom", "data.factory=examples.tiny_custom:data", "data.root=/tmp"],
     ["data.root must be null for data.factory=examples.tiny_custom:data (it takes no root argument)"]),
    (["data=folder"], ["data.root must be given"]),
]


@pytest.mark.parametrize(("args", "musts"), BAD_SOURCES, ids=[" ".join(a) for a, _ in BAD_SOURCES])
def test_bad_sources_are_refused_before_any_work(tmp_path, capsys, args, musts):
    assert_refused(capsys, run_main(_cli(tmp_path, *args)), musts)
    _no_training(tmp_path)


def test_timm_name_refused_with_close_matches(tmp_path, capsys):
    pytest.importorskip("timm")
    assert_refused(capsys, run_main(_cli(tmp_path, "model=timm", "model.name=resnet18dd")),
                   ["model.name must be a timm model", "'resnet18dd'", "did you mean resnet18d"])


def test_mismatches_found_on_the_data_are_refused_before_training(tmp_path, capsys, png_folder, user_module):
    folder = ["data=folder", f"data.root={png_folder}", "data.size=32", "data.val_size=10"]
    # a declared input shape whose channels are not the data's
    assert_refused(capsys, run_main(_cli(tmp_path, "model=torchvision", "model.name=mobilenet_v3_small",
                                         "model.input_shape=[1,32,32]", *folder)),
                   ["model.input_shape must be the (C, H, W) of data.name=image_folder's images, [3, 32, 32]",
                    "channels differ", "but got [1, 32, 32]"])
    # a grey-image network on colour images: its probe forward pass fails
    assert_refused(capsys, run_main(_cli(tmp_path, "model=custom", "model.factory=examples.tiny_custom:net", *folder)),
                   ["model.factory=examples.tiny_custom:net must take data.name=image_folder's images [3, 32, 32]",
                    "forward pass failed: RuntimeError"])
    mod = user_module("h5_not_a_module", "def net(num_classes=10):\n    return 'a network'\n")
    assert_refused(capsys, run_main(_cli(tmp_path, "model=custom", f"model.factory={mod}:net", *folder)),
                   [f"model.factory={mod}:net must return an nn.Module, but it returned a str"])
    assert_refused(capsys, run_main(_cli(tmp_path, "model=custom", "model.factory=examples.tiny_custom:net",
                                         *folder[:2], "data.size=33")),
                   ["data.size must be one of 224, 32, 28", "but got '33'"])
    _no_training(tmp_path)


def test_folders_without_classes_or_images_are_refused(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_refused(capsys, run_main(_cli(tmp_path, "data=folder", f"data.root={empty}", "model=torchvision",
                                         "model.name=mobilenet_v3_small")),
                   [f"data.root={empty} holds no class folders", "<class>/<images>"])
    (tmp_path / "no_images" / "train" / "cat").mkdir(parents=True)
    (tmp_path / "no_images" / "train" / "cat" / "notes.txt").write_text("not an image")
    assert_refused(capsys, run_main(_cli(tmp_path, "data=folder", f"data.root={tmp_path / 'no_images'}",
                                         "model=torchvision", "model.name=mobilenet_v3_small")),
                   ["class folders without images", "cat", ".png"])
    _no_training(tmp_path)


# ---------------------------------------------------------------- end to end


def test_run_torchvision_model_on_a_folder_end_to_end(png_folder, tmp_path, capsys):
    args = _cli(tmp_path, "model=torchvision", "model.name=mobilenet_v3_small", "data=folder",
                f"data.root={png_folder}", "data.size=32", "data.val_size=10", "data.batch_size=16",
                "model.pretrain.epochs=1", "prune.method=one_shot", "prune.q=0.2", "measure.batch_size=4",
                "measure.repeats=1")
    assert run_main(args) == 0
    record_path = Path(capsys.readouterr().out.strip().splitlines()[-1])
    record = json.loads(record_path.read_text())
    assert record["config"]["model"]["name"] == "torchvision:mobilenet_v3_small"
    assert record["config"]["data"]["name"] == "image_folder"
    assert 0 < record["flops_after"] < record["flops_before"]
    assert len(record["units"]) > 10  # mobilenet_v3_small's convs, squeeze-excitation included
    cached = list((tmp_path / "cache" / "base_models").glob("torchvision:mobilenet_v3_small-*.pt"))
    assert len(cached) == 1


def test_search_with_custom_model_and_data_end_to_end(tmp_path):
    """``search.launch`` with the user's module in the working directory (not the project's):
    local Ray trials import it there too."""
    source = (ROOT / "examples" / "tiny_custom.py").read_text()
    small = source.replace("n_train: int = 2000, n_test: int = 500", "n_train: int = 400, n_test: int = 100")
    assert small != source  # a user's copy, with less data: short trials
    (tmp_path / "h5_user_tiny_custom.py").write_text(small)
    out = tmp_path / "search"
    cmd = [sys.executable, "-m", "search.launch", "model=custom", "model.factory=h5_user_tiny_custom:net",
           "model.kwargs.width=4", "data=custom", "data.factory=h5_user_tiny_custom:data", "data.val_size=50",
           "model.pretrain.epochs=1", "search.num_trials=4", "search.max_concurrent_trials=2", "num_cpus=2",
           f"cache_dir={tmp_path / 'cache'}", f"output_root={out}", "name=c4", "measure.batch_size=4",
           "measure.repeats=1", "search.retime.rounds=2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == str(out / "c4")
    from search.pareto import read_trials

    rows = read_trials(out / "c4" / "trials.parquet")
    assert len(rows) == 4 and all(r["status"] == "COMPLETED" for r in rows)
    assert any(r["pareto"] for r in rows)
    assert list((tmp_path / "cache" / "base_models").glob("custom:h5_user_tiny_custom:net-*.pt"))


@pytest.mark.parametrize("loader", ["search.launch", "search.blend", "search.study"])
def test_search_study_and_blend_take_the_same_forms(loader, png_folder, tmp_path):
    """Their configs resolve to the same qualified names the trials rebuild from."""
    from search.launch import load_search_config
    from search.study import load_study_config

    load = {"search.launch": load_search_config, "search.study": load_study_config,
            "search.blend": lambda args: load_search_config(["search=blended", *args])}[loader]
    cfg = load(["model=torchvision", "model.name=mobilenet_v3_small", "data=folder", f"data.root={png_folder}",
                "data.size=32", f"cache_dir={tmp_path}"])
    assert (cfg.model.name, cfg.data.name) == ("torchvision:mobilenet_v3_small", "image_folder")
    cfg = load(["model=custom", "model.factory=examples.tiny_custom:net", "data=custom",
                "data.factory=examples.tiny_custom:data", f"cache_dir={tmp_path}"])
    assert (cfg.model.name, cfg.data.name) == ("custom:examples.tiny_custom:net", "custom:examples.tiny_custom:data")
    with pytest.raises(ValueError, match="model.name must be a torchvision classification model"):
        load(["model=torchvision", "model.name=mobilenet_v3_smal"])


def test_other_images_train_another_base_model(tiny_fmnist, tmp_path, capsys):
    """The folder's fingerprint is part of the base model's cache key: the same command on other
    images trains a new base model instead of reusing the first (the name image_folder is the same)."""
    from trainables.pretrain import main as pretrain_main

    paths = []
    for seed in (0, 0, 1):  # the same images twice, then other images under the same class names
        root = write_png_folder(tiny_fmnist, tmp_path / f"images{seed}", {"train": 3}, classes=3, seed=seed)
        assert pretrain_main(_cli(tmp_path, "model=torchvision", "model.name=squeezenet1_1", "data=folder",
                                  f"data.root={root}", "data.size=32", "data.val_size=3", "data.batch_size=2",
                                  "model.pretrain.epochs=1")) == 0
        paths.append(capsys.readouterr().out.strip().splitlines()[-1])
    assert paths[0] == paths[1] and paths[2] != paths[0]
