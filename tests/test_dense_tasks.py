"""Detection and segmentation through the shared code paths: the command line (``task=``), the
protocol and its record, the checks that refuse what does not apply, and a search with mAP in MLflow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import data._fashion_mnist as fmnist
import data._scenes as scenes_mod
from tests.conftest import assert_refused, child_runs
from trainables.run import main

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def small_scenes(monkeypatch, tmp_path, tiny_fmnist):
    """80 train / 24 test scenes from the tiny generated Fashion-MNIST, cached in tmp."""
    monkeypatch.setattr(scenes_mod, "N_TRAIN_SCENES", 80)
    monkeypatch.setattr(scenes_mod, "N_TEST_SCENES", 24)
    monkeypatch.setattr(scenes_mod, "CACHE_DIR", tmp_path / "scenes")
    monkeypatch.setattr(fmnist, "FALLBACK_DIRS", (tmp_path / "no-debian-here",))
    scenes_mod._scenes.cache_clear()
    yield tiny_fmnist
    scenes_mod._scenes.cache_clear()


def _args(root: Path, tmp_path: Path, task: str, *more: str) -> list[str]:
    return [
        f"task={task}", f"data.root={root}", "data.val_size=16", "data.batch_size=8", "data.eval_batch_size=16",
        "++model.kwargs.width=8", "model.pretrain.epochs=1", f"cache_dir={tmp_path / 'cache'}",
        f"output_dir={tmp_path / 'out'}", "measure.batch_size=2", "measure.repeats=1", "measure.warmup=1",
        "progress=false", "prune.p=0.1", "prune.q=0.1", "prune.score_batch_size=8", "finetune.eval_max_images=null",
        *more,
    ]


def _record(capsys) -> tuple[dict, str]:
    out = capsys.readouterr().out
    return json.loads(Path(out.strip().splitlines()[-1]).read_text()), out


def test_detection_run_prunes_the_backbone_and_reports_map(small_scenes, tmp_path, capsys):
    assert main(_args(small_scenes, tmp_path, "detection")) == 0
    record, out = _record(capsys)
    assert record["task"] == "detection" and record["score_name"] == "map50"
    assert set(record["final_test_metrics"]) == {"map50", "map", "map75"}
    assert record["final_test_acc"] == max(record["final_test_metrics"]["map50"], 0.0)
    # Every backbone conv was pruned (and only those), halving each.
    assert record["unit_names"] and all(u.startswith("backbone.") for u in record["unit_names"])
    assert [u["filters_after"] for u in record["units"]] == [u["filters_before"] // 2 for u in record["units"]]
    assert record["backbone_flops_after"] < 0.5 * record["backbone_flops_before"]
    # The heads keep their cost: the whole model shrinks less than its backbone.
    whole = record["flops_after"] / record["flops_before"]
    assert whole > record["backbone_flops_after"] / record["backbone_flops_before"]
    assert "mAP@0.5" in out and "backbone FLOPs" in out


def test_segmentation_run_prunes_only_the_decoder_when_asked(small_scenes, tmp_path, capsys):
    assert main(_args(small_scenes, tmp_path, "segmentation", "prune.units=decoder", "criterion=taylor")) == 0
    record, out = _record(capsys)
    assert record["task"] == "segmentation" and record["score_name"] == "miou"
    assert set(record["final_test_metrics"]) == {"miou", "pixel_acc", "class_acc"}
    assert record["unit_names"] and all(u.startswith("decoder.") for u in record["unit_names"])
    assert "mIoU" in out
    # The encoder kept every filter: the pruned architecture's encoder convs have the base widths.
    from trainables.core.models import build_model
    from trainables.protocol.stages import rebuild_pruned

    base = build_model("small_segnet", num_classes=11, width=8)
    pruned = rebuild_pruned(build_model("small_segnet", num_classes=11, width=8), record)
    widths = lambda m, part: [c.out_channels for n, c in m.named_modules()  # noqa: E731
                              if n.startswith(part) and isinstance(c, torch.nn.Conv2d)]
    assert widths(pruned, "encoder.") == widths(base, "encoder.")
    assert sum(widths(pruned, "decoder.")) < sum(widths(base, "decoder."))


@pytest.mark.parametrize("args, musts", [
    (["task=detection", "criterion=taylor"], ["criterion.name=taylor does not apply to detection", "valid for detection"]),
    (["task=segmentation", "criterion=car"], ["criterion.name=car does not apply to segmentation"]),
    (["task=detection", "prune.method=greedy_car"], ["prune.method must be not greedy_car for detection"]),
    (["task=segmentation", "prune.units=middle"], ["prune.units", "'middle'", "decoder, encoder"]),
    (["data=fmnist_detection"], ["model.name=small_cnn is a classification model but data.name=fmnist_detection"]),
    (["task=segmentation", "model=small_frcnn"], ["small_frcnn is a detection model", "fmnist_segmentation is a segmentation"]),
    (["task=depth"], ["unknown task 'depth'", "classification, detection, segmentation"]),
    (["task=detection", "data.classes=[Bag]"], ["data.classes", "fmnist_detection is a detection data set"]),
    (["task=detection", "prune.target_flops_reduction=0.5"], ["prune.target_flops_reduction must be null for detection"]),
])
def test_what_does_not_apply_is_refused_in_one_line_before_any_work(args, musts, tmp_path, capsys):
    code = main([*args, f"cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'out'}"])
    assert_refused(capsys, code, musts)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


def test_detection_search_logs_map_to_mlflow(tiny_fmnist, tmp_path):
    """`python -m search.launch task=detection`: two trials on a given (saved, untrained) detector;
    each trial's MLflow run carries val_map50 beside val_acc, and the front's models are logged
    as weights + record (torch.export cannot trace torchvision's R-CNNs)."""
    from trainables.core.models import build_model

    weights = tmp_path / "frcnn.pt"
    torch.manual_seed(0)
    torch.save(build_model("small_frcnn", num_classes=11, width=8).state_dict(), weights)
    out = tmp_path / "search"
    env = {**os.environ, "PRUNESEARCH_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable, "-m", "search.launch", "task=detection", f"data.root={tiny_fmnist}", "data.val_size=16",
        "data.fraction=0.05", "data.batch_size=8", "data.eval_batch_size=16", "++model.kwargs.width=8",
        f"model.weights={weights}", "model.pretrain.epochs=0", "search.num_trials=2", "search.max_concurrent_trials=2",
        "search.p.low=0.0", "search.p.high=0.002", "search.q.low=0.002", "search.q.high=0.004",
        "search.criteria=[random,l1,taylor]", "search.schedules=[uniform]", "measure.batch_size=2",
        "measure.repeats=1", "measure.warmup=1", "search.retime.rounds=2", "finetune.eval_max_images=null",
        f"output_root={tmp_path}", "name=search", "num_cpus=2", f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
    ]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "taylor do not apply to detection; searching random, l1" in done.stderr
    runs = child_runs(out, "prunesearch")
    assert len(runs) == 2
    for run in runs:
        assert run.data.metrics["val_map50"] == run.data.metrics["val_acc"]
        assert run.data.params["criterion"] in ("random", "l1")
    # The front's detectors are logged as weights + record, and load back into a working model.
    import mlflow

    from trainables.protocol.stages import rebuild_pruned

    front = [r for r in runs if r.data.tags.get("pareto") == "true"]
    assert front
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    folder = Path(client.download_artifacts(front[0].info.run_id, "model", str(tmp_path / "dl")))
    assert sorted(p.name for p in folder.iterdir()) == ["record.json", "state_dict.pt"]
    logged = json.loads((folder / "record.json").read_text())
    arch = logged["architecture"]
    model = rebuild_pruned(build_model(arch["name"], num_classes=arch["num_classes"], **arch["kwargs"]), logged,
                           torch.load(folder / "state_dict.pt", weights_only=True))
    assert model.eval()(torch.zeros(1, 1, 128, 128))[0]["boxes"].shape[1] == 4
    import pyarrow.parquet as pq

    rows = pq.read_table(out / "trials.parquet").to_pylist()
    assert len(rows) == 2 and all(r["status"] == "COMPLETED" for r in rows)
    assert all(r["flops_kept"] < 1 for r in rows)


@pytest.mark.parametrize("command, args, musts", [
    ("search.study", ["task=detection", "study.methods=[greedy_car]"],
     ["study.methods must be a list without greedy_car for detection"]),
    ("search.study", ["task=detection", "study.criteria=[random,taylor]"],
     ["study.criteria: taylor do not apply to detection", "valid for detection: random"]),
    ("search.study", ["task=segmentation", "study.flops_targets=[0.5]", "study.ratios=null"],
     ["study.flops_targets must be null for segmentation"]),
    ("search.launch", ["task=detection", "search=blended"], ["search must not be blended for detection"]),
    ("search.launch", ["task=detection", "search.criteria=[taylor,car]"],
     ["search.criteria must include a criterion that applies to detection"]),
    ("trainables.compress", ["model=small_segnet", "data=fmnist_segmentation", "criterion=l1"],
     ["task must be classification for trainables.compress"]),
])
def test_search_study_and_compress_refuse_what_the_task_cannot_do(command, args, musts, tmp_path, capsys):
    import importlib

    main_of = importlib.import_module(command).main
    code = main_of([*args, f"cache_dir={tmp_path / 'cache'}"])
    assert_refused(capsys, code, musts)
    assert not (tmp_path / "cache").exists()
