"""Class-specific pruning as Mittal et al. ran it: the base model knows every class, only the
run's data (scoring, pruning, fine-tuning, evaluation) are a class subset's; and base models
given as weights files (``model.weights``, ``model.pretrain.epochs=0``)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from data import get_data
from trainables.cli.base_model import prepare, save_checkpoint
from trainables.cli.compose import load_run_config
from trainables.core.models import MODELS, build_model, cut_head, head_of, list_models
from trainables.run import main as run_main

FOOTWEAR = [5, 7, 9]  # Sandal, Sneaker, Ankle boot: conf/classes/fmnist_footwear.yaml


def _args(root: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [f"data.root={root}", "data.val_size=100", "data.batch_size=32", "data.eval_batch_size=100",
            "model.pretrain.epochs=1", f"cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'out'}",
            "progress=false", "threads=1", *extra]


def _prepare(root: Path, tmp_path: Path, *extra: str):
    return prepare(load_run_config(_args(root, tmp_path, *extra)), log=lambda *_: None)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cached(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "cache" / "base_models").glob("*.pt"))


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_base_weights_unchanged_by_the_subset(tiny_fmnist, tmp_path):
    full, _, path, full_meta = _prepare(tiny_fmnist, tmp_path)
    digest, state = _digest(path), {k: v.clone() for k, v in full.state_dict().items()}

    keep, keep_splits, keep_path, keep_meta = _prepare(tiny_fmnist, tmp_path, "subset=fmnist_footwear")
    assert keep_path == path and _cached(tmp_path) == [path]  # one base model, shared by every subset
    assert _same_state(keep.state_dict(), state)
    assert keep_splits.num_classes == 10 and keep_splits.eval_classes == FOOTWEAR
    assert set(keep_splits.val.targets.tolist()) == set(FOOTWEAR)  # the run's data are the subset's
    assert keep_meta["base_data_val_acc"] == full_meta["val_acc"]  # the base's own (all-class) accuracy, kept

    cut, cut_splits, cut_path, _ = _prepare(tiny_fmnist, tmp_path, "subset=fmnist_footwear", "subset_head=cut")
    assert cut_path == path and _cached(tmp_path) == [path] and _digest(path) == digest  # the cache is untouched
    assert cut_splits.num_classes == 3 and cut_splits.class_names == ["Sandal", "Sneaker", "Ankle boot"]
    cut_state = cut.state_dict()
    assert cut_state["classifier.weight"].shape == (3, 576)
    assert torch.equal(cut_state["classifier.weight"], state["classifier.weight"][FOOTWEAR])
    assert torch.equal(cut_state["classifier.bias"], state["classifier.bias"][FOOTWEAR])
    assert _same_state({k: v for k, v in cut_state.items() if not k.startswith("classifier.")},
                       {k: v for k, v in state.items() if not k.startswith("classifier.")})
    # The same model whichever way it is asked for: the subset did not retrain or perturb it.
    assert _same_state(_prepare(tiny_fmnist, tmp_path)[0].state_dict(), state)

    # The old behaviour on request: a base model of its own, trained on the subset only.
    _, _, own_path, _ = _prepare(tiny_fmnist, tmp_path, "subset=fmnist_footwear", "subset_base=subset")
    assert own_path != path and len(_cached(tmp_path)) == 2 and _digest(path) == digest


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_subset_val_images_are_the_all_class_val_images(tiny_fmnist, fraction):
    """With an all-class base model, no validation image of the subset trained it."""
    common = dict(root=tiny_fmnist, val_size=100, fraction=fraction)
    full = get_data("fashion_mnist", **common)
    sub = get_data("fashion_mnist", classes=FOOTWEAR, remap_labels=False, split_before_subset=True, **common)
    for name in ("train", "val", "test"):
        whole, part = getattr(full, name), getattr(sub, name)
        mask = torch.isin(whole.targets, torch.tensor(FOOTWEAR))
        assert torch.equal(part.images, whole.images[mask]) and torch.equal(part.targets, whole.targets[mask]), name
    whole_pool = get_data("fashion_mnist", **{**common, "fraction": 1.0}).train
    assert sub.train_size_full == int(torch.isin(whole_pool.targets, torch.tensor(FOOTWEAR)).sum())
    remapped = get_data("fashion_mnist", classes=FOOTWEAR, split_before_subset=True, **common)
    assert torch.equal(remapped.val.images, sub.val.images) and sorted(set(remapped.val.targets.tolist())) == [0, 1, 2]


# Building an ImageNet VGG-16 (138M parameters) alone takes 5-8 s on 2 shared cores.
_SLOW_TO_BUILD = {"vgg16", "vgg16_bn"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in _SLOW_TO_BUILD else n
                                  for n in list_models() if MODELS.get(n).task == "classification"])
def test_cut_head_keeps_the_rows_of_the_subset(name):
    model = build_model(name, num_classes=12).eval()
    c, h, w = model.input_shape
    x = torch.randn(2, c, min(h, 64), min(w, 64), generator=torch.Generator().manual_seed(0))  # 64: fast enough
    ids = [7, 0, 11, 3]
    with torch.no_grad():
        before = model(x)
        cut_head(model, ids)
        after = model(x)
    assert after.shape == (2, 4) and torch.allclose(after, before[:, ids], atol=1e-5)
    assert head_of(model)[1].out_features == 4
    # The cut model is the architecture a 4-class build has: trials rebuild it and load its weights.
    build_model(name, num_classes=4).load_state_dict(model.state_dict())


def test_cut_head_refuses_bad_ids():
    with pytest.raises(ValueError, match=r"class_ids must be distinct ids in \[0, 10\) of the head 'classifier', "
                                         r"but got \[1, 1\]"):
        cut_head(build_model("small_cnn"), [1, 1])


def test_given_weights_are_the_base_model_without_training(tiny_fmnist, tmp_path):
    torch.manual_seed(1)
    given = build_model("small_cnn")
    plain = tmp_path / "plain.pth"
    torch.save(given.state_dict(), plain)  # a bare state_dict, as torchvision's .pth files are
    ours = tmp_path / "ours.pt"
    save_checkpoint(given, ours, {"val_acc": 0.5})
    for weights in (plain, ours):
        model, _, path, meta = _prepare(tiny_fmnist, tmp_path, f"model.weights={weights}", "model.pretrain.epochs=0")
        assert path == weights and _same_state(model.state_dict(), given.state_dict())
        assert 0 <= meta["val_acc"] <= 1  # measured on this run's val, not copied from the file
    assert _cached(tmp_path) == []  # nothing trained, nothing cached

    # With a subset and a cut head the given weights are cut, the file is not.
    digest = _digest(plain)
    cut, _, _, _ = _prepare(tiny_fmnist, tmp_path, f"model.weights={plain}", "model.pretrain.epochs=0",
                            "subset=fmnist_footwear", "subset_head=cut")
    assert torch.equal(cut.classifier.weight, given.classifier.weight[FOOTWEAR]) and _digest(plain) == digest

    # epochs > 0 trains from the given weights; the cache key follows their content.
    trained, _, t_path, t_meta = _prepare(tiny_fmnist, tmp_path, f"model.weights={plain}")
    scratch_path = _prepare(tiny_fmnist, tmp_path)[2]
    assert t_path != scratch_path and t_meta["weights"] == str(plain)
    assert not _same_state(trained.state_dict(), given.state_dict())
    copy = tmp_path / "copy.pth"
    copy.write_bytes(plain.read_bytes())
    assert _prepare(tiny_fmnist, tmp_path, f"model.weights={copy}")[2] == t_path  # same bytes, same base model


def test_weights_of_another_model_are_refused(tiny_fmnist, tmp_path):
    wrong = tmp_path / "wrong.pth"
    torch.save(build_model("small_cnn", width=8).state_dict(), wrong)
    with pytest.raises(ValueError, match=r"does not match the model; shape mismatch: classifier.weight"):
        _prepare(tiny_fmnist, tmp_path, f"model.weights={wrong}", "model.pretrain.epochs=0")
    junk = tmp_path / "junk.pth"
    torch.save({"lr": 0.1}, junk)
    with pytest.raises(ValueError, match=r"holds no state_dict"):
        _prepare(tiny_fmnist, tmp_path, f"model.weights={junk}", "model.pretrain.epochs=0")


def test_the_class_specific_command_line_composes():
    cfg = load_run_config(["subset=fmnist_footwear", "criterion=class_specific",
                           "prune.target_classes=[Sandal,Sneaker,Ankle boot]"])
    assert cfg.subset_base == "all" and cfg.subset_head == "keep"
    load_run_config(["subset=fmnist_footwear", "subset_head=cut", "prune.method=scratch"])


BAD = [
    (["subset=fmnist_footwear", "subset_head=chop"], "subset_head must be one of keep, cut, but got 'chop'"),
    (["subset=fmnist_footwear", "subset_base=some"], "subset_base must be one of all, subset, but got 'some'"),
    (["subset_head=cut"], "subset must be a class subset from conf/classes when subset_head=cut, but got None"),
    (["subset=fmnist_footwear", "data.classes=[Sandal]"],
     "data.classes must be null when subset=fmnist_footwear names the classes, but got ['Sandal']"),
    (["subset=fmnist_footwear", "criterion=class_specific", "prune.target_classes=[Shirt]"],
     "prune.target_classes must be classes of the run's data (Sandal, Sneaker, Ankle boot), but got ['Shirt']"),
    (["model.weights=/no/such/file.pth"],
     "model.weights must be null or the path of an existing checkpoint or state_dict file, but got '/no/such/file.pth'"),
    (["model=vgg16", "+model.kwargs.weights=DEFAULT", "subset=fmnist_footwear", "subset_head=cut"],
     "model.kwargs.weights must be null with subset_head=cut"),
]


@pytest.mark.parametrize("args, message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_subset_and_weights_settings_are_one_line(args, message, capsys, tmp_path):
    assert run_main([*args, f"cache_dir={tmp_path}/cache", f"output_dir={tmp_path}/out"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert sorted(tmp_path.rglob("*")) == []


@pytest.mark.parametrize("head, n_out", [("keep", 10), ("cut", 3)])
def test_class_specific_run_end_to_end(tiny_fmnist, tmp_path, capsys, head, n_out):
    args = _args(tiny_fmnist, tmp_path, "subset=fmnist_footwear", f"subset_head={head}", "prune.method=one_shot",
                 "prune.q=0.2", "measure.latency=false")
    assert run_main(args) == 0
    record = json.loads(Path(capsys.readouterr().out.strip().splitlines()[-1]).read_text())
    full = build_model("small_cnn", num_classes=10)
    head_params = 576 * (10 - n_out) + (10 - n_out)
    assert record["params_before"] == sum(p.numel() for p in full.parameters()) - head_params  # the cut head counts
    assert 0 <= record["final_test_acc"] <= 1 and record["config"]["subset_head"] == head
    assert len(_cached(tmp_path)) == 1
