"""`python -m trainables.run`: bad input is one line before any work; a tiny run end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainables import list_criteria
from trainables.run import CONF_DIR, main


def _tiny_args(root: Path, tmp_path: Path) -> list[str]:
    return [
        f"data.root={root}", "data.val_size=100", "data.batch_size=32", "data.eval_batch_size=100",
        "model.pretrain.epochs=1", f"cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'out'}",
        "measure.batch_size=4", "measure.repeats=2", "progress=false", "prune.p=0.2", "prune.q=0.2",
    ]


@pytest.mark.parametrize(
    "args, match",
    [
        (["criterion=l3"], "unknown criterion 'l3'; valid: apoz, blended, bn_gamma, car"),
        (["model=resnet5"], "unknown model 'resnet5'; valid: alexnet"),
        (["data=mnistt"], "unknown data 'mnistt'; valid: cifar10, cifar100, fashion_mnist, imagenet"),
        (["prune.ratio=1.5"], "prune.ratio=1.5 is outside [0, 1)"),
        (["prune.p=-1"], "prune.p=-1 must be a number of epochs >= 0"),
        (["prune.q=-2"], "prune.q=-2 must be a number of epochs >= 0"),
        (["prune.schedule=per_layer", "prune.ratios=[0.1,0.2]"], "prune.ratios has 2 values; model small_cnn has 5 prunable units"),
        (["prune.schedule=steep"], "prune.schedule='steep' is not one of: differential, per_layer, uniform"),
        (["prune.method=greedy"], "prune.method='greedy' is not one of"),
        (["prune.fo=1"], "prune.fo"),
        (["criterion=class_specific"], "prune.target_classes is empty"),
    ],
)
def test_bad_input_is_one_line_before_any_work(args, match, capsys, tmp_path):
    code = main([*args, f"cache_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and match in err
    assert err.count("\n") == 1
    assert not any(tmp_path.iterdir())  # nothing trained or cached


def test_unknown_target_class_fails_before_training(tiny_fmnist, tmp_path, capsys):
    code = main([*_tiny_args(tiny_fmnist, tmp_path), "criterion=class_specific", "prune.target_classes=[Sandle]"])
    err = capsys.readouterr().err
    assert code == 2 and "unknown class 'Sandle'; valid: T-shirt/top" in err


def test_every_criterion_has_a_config_file():
    assert sorted(p.stem for p in (CONF_DIR / "criterion").glob("*.yaml")) == list_criteria()


def test_tiny_run_end_to_end(tiny_fmnist, tmp_path, capsys):
    assert main(_tiny_args(tiny_fmnist, tmp_path)) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    record_path = Path(lines[-1])
    assert record_path.name == "record.json" and record_path.exists()
    assert (record_path.parent / "config.yaml").exists()
    record = json.loads(record_path.read_text())
    assert record["config"]["criterion"]["name"] == "l1"
    assert any(line.startswith("final val acc") for line in lines)
    cached = list((tmp_path / "cache" / "base_models").glob("small_cnn-*.pt"))
    assert len(cached) == 1
    # A second run reuses the cached base model: same base accuracy, no new checkpoint.
    assert main([*_tiny_args(tiny_fmnist, tmp_path), "criterion=random"]) == 0
    second = json.loads(Path(capsys.readouterr().out.strip().splitlines()[-1]).read_text())
    assert second["base_val_acc"] == record["base_val_acc"]
    assert list((tmp_path / "cache" / "base_models").glob("small_cnn-*.pt")) == cached


def test_checkpoint_mismatch_names_keys(tmp_path):
    import torch

    from trainables import build_model
    from trainables.pretrain import load_checkpoint, save_checkpoint

    path = tmp_path / "ck.pt"
    save_checkpoint(build_model("small_cnn", width=8), path, {})
    with pytest.raises(ValueError, match=r"does not match the model; shape mismatch: classifier.weight, features.0.weight"):
        load_checkpoint(build_model("small_cnn"), path)
    save_checkpoint(build_model("resnet20_cifar"), path, {})
    with pytest.raises(ValueError, match=r"missing: classifier.bias"):
        load_checkpoint(build_model("small_cnn"), path)
    assert isinstance(torch.load(path, weights_only=True), dict)
