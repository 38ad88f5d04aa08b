"""`python -m trainables.run`: bad input is one line before any work; a tiny run end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainables import list_criteria
from trainables.cli.compose import CONF_DIR
from trainables.run import main


def _tiny_args(root: Path, tmp_path: Path) -> list[str]:
    return [
        f"data.root={root}", "data.val_size=100", "data.batch_size=32", "data.eval_batch_size=100",
        "model.pretrain.epochs=1", f"cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'out'}",
        "measure.batch_size=4", "measure.repeats=2", "progress=false", "prune.p=0.2", "prune.q=0.2",
    ]


# Bad input for this command line is in the shared table of tests/test_bad_inputs.py.


def root_of(root: Path) -> Path:
    """Where the Fashion-MNIST reader finds the IDX files of ``data.root=root``."""
    return root if any(root.glob("train-images-idx3-ubyte*")) else root / "FashionMNIST" / "raw"


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
    assert record["data_root"] == str(root_of(tiny_fmnist))  # the folder actually read
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
    from trainables.cli.base_model import load_checkpoint, save_checkpoint

    path = tmp_path / "ck.pt"
    save_checkpoint(build_model("small_cnn", width=8), path, {})
    with pytest.raises(ValueError, match=r"does not match the model; shape mismatch: classifier.weight, features.0.weight"):
        load_checkpoint(build_model("small_cnn"), path)
    save_checkpoint(build_model("resnet20_cifar"), path, {})
    with pytest.raises(ValueError, match=r"missing: classifier.bias"):
        load_checkpoint(build_model("small_cnn"), path)
    assert isinstance(torch.load(path, weights_only=True), dict)


def _record(steps_to_recover):
    return {"units": [], "flops_before": 10e6, "flops_after": 5e6, "params_before": 1e4, "params_after": 5e3,
            "base_val_acc": 0.9, "final_val_acc": 0.88, "final_test_acc": 0.87, "method": "layer_by_layer",
            "recovery_delta": 0.01, "steps_to_recover": steps_to_recover, "recovery_auc": 0.5, "wall_s": 1.0}


@pytest.mark.parametrize("steps, phrase", [
    (None, "not back within 1.0 points of the base val score by the end of fine-tuning"),
    (0, "back within 1.0 points of the base val score without fine-tuning"),
    (120, "back within 1.0 points of the base val score after 120 fine-tuning steps"),
])
def test_summary_says_when_the_run_recovered(steps, phrase):
    from trainables.run import format_summary

    text = format_summary(_record(steps))
    assert phrase in text and "never steps" not in text
