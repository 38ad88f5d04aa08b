"""Export for deployment: ONNX (run in ONNX Runtime) and torch.export (.pt2) give the pruned
PyTorch model's outputs; ``python -m trainables.export <run folder>`` rebuilds the run's
fine-tuned, pruned model and exports it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from trainables.core.models import build_model
from trainables.core.surgery import describe_units, prune_layer
from trainables.export import (
    FORMATS,
    check_export,
    export_model,
    load_run_model,
    main,
    onnxruntime_available,
)

# CI installs the onnx extra (.ci/run), so the ONNX round trip runs there; a bare install skips it.
ONNX = pytest.param("onnx", marks=pytest.mark.skipif(not onnxruntime_available(),
                                                      reason="the onnx extra is not installed"))
BOTH = [ONNX, "pt2"]


def _pruned(name: str) -> torch.nn.Module:
    """``name`` with every unit cut to its odd-indexed filters, BN statistics randomised (a
    fresh BN's identity statistics would hide a wrong channel mapping), in eval mode."""
    torch.manual_seed(0)
    model = build_model(name)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    for unit in describe_units(model):
        prune_layer(model, unit.name, list(range(1, unit.n_filters, 2)))
    return model.eval()


@pytest.mark.parametrize("fmt", BOTH)
@pytest.mark.parametrize("name", ["small_cnn", "resnet20_cifar"])
def test_exported_pruned_model_gives_pytorchs_outputs(tmp_path, name, fmt):
    torch.set_num_threads(1)
    model = _pruned(name)
    x = torch.randn(2, *model.input_shape, generator=torch.Generator().manual_seed(1))
    path = export_model(model, x, tmp_path / f"m.{fmt}", fmt)
    assert path.is_file() and path.stat().st_size > 0
    assert check_export(model, path, x) <= 1e-4
    # the batch dimension stays dynamic: another batch size runs and agrees too
    other = torch.randn(5, *model.input_shape, generator=torch.Generator().manual_seed(2))
    assert check_export(model, path, other) <= 1e-4
    assert model.training is False  # the caller's model is left as it was


@pytest.mark.parametrize("fmt", BOTH)
def test_check_export_catches_a_model_that_differs(tmp_path, fmt):
    model = _pruned("small_cnn")
    x = torch.randn(2, *model.input_shape)
    path = export_model(model, x, tmp_path / f"m.{fmt}", fmt)
    with torch.no_grad():
        model.classifier.bias += 0.1  # the exported file no longer matches this model
    with pytest.raises(ValueError, match=r"^exported outputs of .* must equal PyTorch's within 0.0001, but differ by 0.1"):
        check_export(model, path, x)


def test_unknown_format_is_one_line(tmp_path):
    with pytest.raises(ValueError, match=r"^--format must be one of onnx, pt2, but got 'tflite'$"):
        export_model(_pruned("small_cnn"), torch.randn(2, 1, 28, 28), tmp_path / "m.tflite", "tflite")


def _run_folder(root: Path, tmp_path: Path, capsys) -> Path:
    from trainables.run import main as run_main

    args = [f"data.root={root}", "data.val_size=100", "data.batch_size=32", "data.eval_batch_size=100",
            "model.pretrain.epochs=1", f"cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'out'}",
            "measure.latency=false", "progress=false", "prune.method=one_shot", "prune.schedule=global",
            "prune.ratio=0.5", "prune.q=0.2"]
    assert run_main(args) == 0
    return Path(capsys.readouterr().out.strip().splitlines()[-1]).parent


@pytest.mark.skipif(not onnxruntime_available(), reason="the onnx extra is not installed")
def test_export_command_from_a_run_folder(tiny_fmnist, tmp_path, capsys):
    from omegaconf import OmegaConf

    from data import iterate_batches
    from trainables.cli.base_model import prepare
    from trainables.protocol.tasks import task_of

    torch.set_num_threads(1)
    folder = _run_folder(tiny_fmnist, tmp_path, capsys)
    assert (folder / "model.pt").is_file()
    assert main([str(folder), "--out", str(tmp_path / "exp")]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert [Path(line.split()[0]).name for line in printed] == [f"model.{f}" for f in FORMATS]
    # The rebuilt model is the run's final one: its test accuracy is the record's.
    model, record = load_run_model(folder, log=lambda *_: None)
    _, splits, _, _ = prepare(OmegaConf.load(folder / "config.yaml"), log=lambda *_: None)
    batches = iterate_batches(splits.test, 100, shuffle=False)
    assert task_of(model).evaluate(model, batches, classes=splits.eval_classes)["score"] == record["final_test_acc"]
    kept = {r["unit"]: r["filters_after"] for r in record["prune_log"]}
    assert {u.name: u.n_filters for u in describe_units(model)} == kept
    x = torch.randn(3, *model.input_shape)
    for fmt in FORMATS:
        assert check_export(model, tmp_path / "exp" / f"model.{fmt}", x) <= 1e-4


@pytest.mark.parametrize(("argv", "message"), [
    (["{missing}"], "error: run folder must be a trainables.run output holding config.yaml and record.json, but "),
    (["{folder}", "--format", "tflite"], "error: --format must be one of onnx, pt2, but got 'tflite'"),
    (["{folder}", "--batch-size", "0"], "error: --batch-size must be an integer >= 1, but got 0"),
])
def test_export_command_refuses_bad_input_in_one_line(tmp_path, capsys, argv, message):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "config.yaml").write_text("seed: 0\n")
    (folder / "record.json").write_text(json.dumps({"prune_log": []}))
    args = [a.format(missing=tmp_path / "nowhere", folder=folder) for a in argv]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err


@pytest.mark.parametrize(("value", "message"), [
    ("onnx", r"^search.export must be a list of formats from onnx, pt2 \(or \[\]\), but got 'onnx'$"),
    (["onnx", "tflite"], r"^search.export must be a list of formats from onnx, pt2 \(or \[\]\), but got \['onnx', 'tflite'\]$"),
])
def test_search_export_setting_is_checked_before_the_search(value, message):
    from search.export_front import check_export_formats
    from search.space import check_space

    with pytest.raises(ValueError, match=message):
        check_space({"criteria": ["l1"], "schedules": ["uniform"], "ratio": {"low": 0.1, "high": 0.5}, "p": None,
                     "q": None, "lr": None, "export": value}, ["l1"])
    assert check_export_formats(["pt2", "pt2"]) == ["pt2"] and check_export_formats(None) == []


@pytest.mark.skipif(not onnxruntime_available(), reason="the onnx extra is not installed")
def test_search_exports_every_pareto_optimal_trial(tiny_fmnist, tmp_path, ray_session):
    """A tiny search over the global schedule with search.export=[onnx,pt2]: one folder per front
    trial, both files, each the trial's pruned model (its parameter count, the same outputs)."""
    import numpy as np

    from search.launch import main as launch
    from search.pareto import read_trials
    from trainables.export import onnx_session

    assert launch([
        f"data.root={tiny_fmnist}", "data.val_size=100", "data.batch_size=32", "data.eval_batch_size=100",
        "model.pretrain.epochs=1", f"cache_dir={tmp_path / 'cache'}", f"output_root={tmp_path / 'out'}", "name=ex",
        "search.num_trials=3", "search.max_concurrent_trials=2", "search.sampler=random", "search.seed=1",
        "search.schedules=[global]", "search.export=[onnx,pt2]", "measure.latency=false", "num_cpus=2",
    ]) == 0
    out = tmp_path / "out" / "ex"
    rows = read_trials(out / "trials.parquet")
    assert {r["schedule"] for r in rows} == {"global"}
    front = {r["trial_id"]: r for r in rows if r["pareto"]}
    assert front and sorted(p.name for p in (out / "export").iterdir()) == sorted(front)
    x = torch.randn(4, 1, 28, 28)
    for trial_id, row in front.items():
        program = torch.export.load(str(out / "export" / trial_id / "model.pt2")).module()
        assert sum(p.numel() for p in program.parameters()) == row["params"]
        session = onnx_session(out / "export" / trial_id / "model.onnx")
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        with torch.no_grad():
            want = program(x).numpy()
        assert got.shape == (4, 10) and np.abs(got - want).max() <= 1e-4
