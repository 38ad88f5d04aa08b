"""Bad input, the whole table: every entry point refuses it with one line naming the key, the
value and what is allowed, before any data is read, any model trained, any folder written or
any MLflow run created.

Command lines answer with exit code 2 and ``error: <one line>`` on stderr; the Python API
raises the exception type given in the row.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import assert_refused

import search.blend.__main__ as blend_cli
from data import get_data
from search import launch
from trainables import build_model, get_criterion, prune_layer
from trainables import compress as compress_cli
from trainables import run as run_cli
from trainables.protocol.config import FinetuneConfig, MeasureConfig, PretrainConfig, PruneConfig
from trainables.protocol.greedy_car import greedy_car_order
from trainables.protocol.schedules import make_ratios

# (args, every one of these substrings must be in the message)
RUN_ROWS = [
    (["criterion=l3"], ["unknown criterion 'l3'", "valid: apoz, blended, bn_gamma, car"]),
    (["model=resnet5"], ["unknown model 'resnet5'", "valid: alexnet"]),
    (["data=mnistt"], ["unknown data 'mnistt'", "valid: cifar10, cifar100, coco_detection, coloured_fashion_mnist"]),
    (["data=coloured_fashion_mnist", "data.colour=blue"], ["data.colour must be one of random, label, but got 'blue'"]),
    (["prune.ratio=1.5"], ["prune.ratio must be in [0, 1), but got 1.5"]),
    (["prune.ratio=-0.1"], ["prune.ratio must be in [0, 1), but got -0.1"]),
    (["prune.p=-1"], ["prune.p must be a number >= 0, but got -1"]),
    (["prune.q=-2"], ["prune.q must be a number >= 0, but got -2"]),
    (["prune.schedule=per_layer", "prune.ratios=[0.1,0.2]"],
     ["prune.ratios must have one ratio per prunable unit (5 for small_cnn), but got 2"]),
    (["prune.schedule=per_layer"], ["prune.ratios must be a list with one ratio per unit", "but got None"]),
    (["prune.schedule=per_layer", "prune.ratios=[0.1,0.2,0.3,0.4,1.0]"], ["prune.ratios[4] must be in [0, 1), but got 1.0"]),
    (["prune.schedule=steep"], ["prune.schedule must be one of differential, differential_depth,", "uniform, but got 'steep'"]),
    (["prune.schedule=differential", "prune.ratio_low=0.7", "prune.ratio_high=0.2"],
     ["prune.ratio_high must be >= prune.ratio_low=0.7", "prune.schedule=differential_inverted", "but got 0.2"]),
    (["prune.method=greedy"],
     ["prune.method must be one of layer_by_layer, one_shot, iterative, control, scratch, greedy_car, but got 'greedy'"]),
    (["prune.method=greedy_car", "prune.rescore_every=0"], ["prune.rescore_every must be an integer >= 1, but got 0"]),
    (["prune.method=greedy_car", "prune.greedy_retrain_steps=-1"],
     ["prune.greedy_retrain_steps must be an integer >= 0, but got -1"]),
    (["prune.fo=1"], ["prune.fo"]),
    (["prune.round_to=0"], ["prune.round_to must be an integer >= 1, but got 0"]),
    (["prune.target_flops_reduction=1.5"], ["prune.target_flops_reduction must be null or in (0, 1), but got 1.5"]),
    (["criterion=class_specific"], ["prune.target_classes must be a non-empty list", "but got None"]),
    (["criterion=class_specific", "prune.target_classes=[Sandle]"], ["unknown class 'Sandle'", "valid: T-shirt/top"]),
    (["finetune.lr=0"], ["finetune.lr must be a number > 0, but got 0"]),
    (["finetune.eval_max_images=0"], ["finetune.eval_max_images must be an integer >= 1, but got 0"]),
    (["measure.repeats=0"], ["measure.repeats must be an integer >= 1, but got 0"]),
    (["model.pretrain.epochs=0"], ["model.pretrain.epochs must be an integer >= 1 when model.weights is null",
                                   "give model.weights=", "but got 0"]),
    (["data.num_workers=-1"], ["data.num_workers must be an integer >= 0, but got -1"]),
    (["seed=-1"], ["seed must be an integer >= 0, but got -1"]),
    (["threads=0"], ["threads must be null or an integer >= 1, but got 0"]),
    (["subset=shoes"], ["unknown class subset 'shoes'", "valid: fmnist_footwear"]),
]

# Keys conf/ does not declare, with or without + / ++: refused with close matches, never added.
UNKNOWN_KEY_ROWS = [
    (["ratio=0.5"], ["unknown key 'ratio'; did you mean prune.ratio?"]),
    (["+ratio=0.9"], ["unknown key 'ratio'; did you mean prune.ratio?"]),
    (["++ratio=0.9"], ["unknown key 'ratio'; did you mean prune.ratio?"]),
    (["+prune.ratoi=0.3"], ["unknown key 'prune.ratoi'; did you mean prune.ratio"]),
    (["prune.ratio=0.3", "finetune.learning_rate=0.1"], ["unknown key 'finetune.learning_rate'"]),
    (["data.colour=label"], ["unknown key 'data.colour' (it is a key of data=coloured_fashion_mnist, "
                             "not of the chosen data=fashion_mnist)"]),
    (["criterion.weights={l1:1.0}"], ["unknown key 'criterion.weights' (it is a key of criterion=blended"]),
    (["classes=fmnist_footwear"], ["unknown key 'classes'; did you mean data.classes?"]),
    (["+classes=fmnist_footwear"], ["unknown key 'classes'; did you mean data.classes?"]),
    (["hydra.run.dir=/tmp/x"], ["unknown key 'hydra.run.dir'"]),
    (["~prune.ratio"], ["prune.ratio must be set, not removed (~prune.ratio)"]),
    (["prune.ratio"], ["arguments must be key=value overrides", "but got 'prune.ratio'"]),
    (["--verbose"], ["options must be -h/--help or --cfg job", "but got '--verbose'"]),
]

# Settings the chosen schedule / method / criterion would not read (changed from the default).
UNREAD_ROWS = [
    (["prune.ratios=[0.1,0.2,0.3,0.4,0.5]"],
     ["prune.ratios is read only with prune.schedule=per_layer, but got prune.schedule=uniform"]),
    (["+prune.ratios=[0.1,0.2,0.3,0.4,0.5]"], ["prune.ratios is read only with prune.schedule=per_layer"]),
    (["++prune.ratios=[0.1,0.2,0.3,0.4,0.5]"], ["prune.ratios is read only with prune.schedule=per_layer"]),
    (["prune.ratio_low=0.1"], ["prune.ratio_low is read only with prune.schedule=differential|", "but got prune.schedule=uniform"]),
    (["prune.ratio_high=0.9"], ["prune.ratio_high is read only with prune.schedule=differential|"]),
    (["prune.schedule=differential", "prune.ratio=0.3"],
     ["prune.ratio is read only with prune.schedule=uniform|global, but got prune.schedule=differential"]),
    (["prune.schedule=per_layer", "prune.ratios=[0.1,0.2,0.3,0.4,0.5]", "prune.ratio=0.3"],
     ["prune.ratio is read only with prune.schedule=uniform|global"]),
    (["prune.target_flops_reduction=0.5", "prune.ratio=0.3"],
     ["prune.ratio is read only with prune.target_flops_reduction=null", "but got prune.target_flops_reduction=0.5"]),
    (["prune.method=control", "prune.target_flops_reduction=0.5"],
     ["prune.target_flops_reduction is read only with prune.method=layer_by_layer|", "but got prune.method=control"]),
    (["prune.steps=8"], ["prune.steps is read only with prune.method=iterative, but got prune.method=layer_by_layer"]),
    (["prune.method=one_shot", "prune.p=0.5"], ["prune.p is read only with prune.method=", "but got prune.method=one_shot"]),
    (["prune.rescore_every=2"], ["prune.rescore_every is read only with prune.method=greedy_car"]),
    (["prune.greedy_retrain_steps=3"], ["prune.greedy_retrain_steps is read only with prune.method=greedy_car"]),
    (["prune.target_classes=[Sandal]"], ["prune.target_classes is read only with criterion=class_specific, but got criterion=l1"]),
    (["prune.adapt_bn_batch_size=64"], ["prune.adapt_bn_batch_size is read only with prune.adapt_bn_batches >= 1",
                                        "but got prune.adapt_bn_batches=0"]),
    (["prune.method=control", "criterion=fpgm"], ["criterion is read only with prune.method=layer_by_layer|one_shot|iterative",
                                                  "but got prune.method=control"]),
]

# Issue 22 point 6: the data keys are checked with the rest, before any data is read or model trained.
DATA_ROWS = [
    (["data.fraction=0"], ["data.fraction must be a number in (0, 1], but got 0"]),
    (["data.fraction=1.5"], ["data.fraction must be a number in (0, 1], but got 1.5"]),
    (["data.val_size=-1"], ["data.val_size must be an image count >= 0 or a share in (0, 1), but got -1"]),
    (["data.val_size=1.5"], ["data.val_size must be an image count >= 0 or a share in (0, 1), but got 1.5"]),
    (["data.batch_size=0"], ["data.batch_size must be an integer >= 1, but got 0"]),
    (["data.eval_batch_size=2.5"], ["data.eval_batch_size must be an integer >= 1, but got 2.5"]),
    (["data.seed=-3"], ["data.seed must be an integer >= 0, but got -3"]),
    (["data.download=maybe"], ["data.download must be true or false, but got 'maybe'"]),
]

RUN_ROWS += UNKNOWN_KEY_ROWS + UNREAD_ROWS + DATA_ROWS

SEARCH_ROWS = [
    (["search.num_trial=8"], ["unknown key 'search.num_trial'; did you mean search.num_trials?"]),
    (["+search.num_trial=8"], ["unknown key 'search.num_trial'; did you mean search.num_trials?"]),
    (["+search.fidelity=proxy"], ["unknown key 'search.fidelity' (it is a key of search=blended"]),
    (["prune.ratio=0.3"], ["prune.ratio is chosen per trial by the search (search.ratio={low: 0.1, high: 0.8})",
                           "set search.ratio (or search.ratio=null to keep prune.ratio)"]),
    (["prune.schedule=differential"], ["prune.schedule is chosen per trial by the search"]),
    (["prune.p=0.1"], ["prune.p is chosen per trial by the search (search.p={low: 0.0, high: 0.05})"]),
    (["finetune.lr=0.1"], ["finetune.lr is chosen per trial by the search (search.lr="]),
    (["criterion=fpgm"], ["criterion is chosen per trial by the search (search.criteria=[random, l1"]),
    (["search.asha.grace_period=3"], ["search.asha.grace_period is read only with search.scheduler=asha",
                                      "but got search.scheduler=none"]),
    (["search.population_size=4"], ["unknown key 'search.population_size' (it is a key of search=blended"]),
    (["prune.steps=8"], ["prune.steps is read only with prune.method=iterative"]),
    (["data.fraction=0"], ["data.fraction must be a number in (0, 1], but got 0"]),
    (["search.sampler=grid"], ["search.sampler must be one of tpe, nsga2, cmaes, random, but got 'grid'"]),
    (["search.scheduler=hyperband"], ["search.scheduler must be one of asha, none, but got 'hyperband'"]),
    (["search.num_trials=0"], ["search.num_trials must be an integer >= 1, but got 0"]),
    (["search.max_concurrent_trials=0"], ["search.max_concurrent_trials must be an integer >= 1, but got 0"]),
    (["search.max_failures=-1"], ["search.max_failures must be an integer >= 0, but got -1"]),
    (["search.criteria=[l1,l3]"], ["unknown criterion 'l3'", "valid: apoz"]),
    (["search.schedules=[steep]"], ["search.schedules must be a non-empty subset of uniform, differential, differential_depth, per_layer",
                                    "but got ['steep']"]),
    (["search.ratio.high=1.2"], ["search.ratio must have 0 <= low <= high < 1", "but got low=0.1, high=1.2"]),
    (["search.lr.low=0"], ["search.lr must have", "low > 0 (log scale)", "but got low=0.0"]),
    (["train.path=slow"], ["train.path must be one of auto, fast, torch_trainer, but got 'slow'"]),
    (["train.num_workers=0"], ["train.num_workers must be an integer >= 1, but got 0"]),
    (["trial_threads=0"], ["trial_threads must be an integer >= 1, but got 0"]),
    (["prune.ratio=2"], ["prune.ratio is chosen per trial by the search"]),  # not read, whatever its value
    (["search.objectives=[val_acc,energy]"], ["search.objectives[1] must be one of flops, params, latency, but got 'energy'"]),
    (["search.objectives=[flops,val_acc]"], ["search.objectives must be [val_acc, <cost>]", "but got ['flops', 'val_acc']"]),
    (["search.objectives=[val_acc,latency]", "measure.latency=false"],
     ["measure.latency must be true when search.objectives=[val_acc, latency], but got False"]),
    (["search.scheduler=asha", "search.asha.grace_period=0"], ["search.asha.grace_period must be an integer >= 1, but got 0"]),
    (["search.retime.rounds=1"], ["search.retime.rounds must be an integer >= 2, but got 1"]),
    (["checkpoint_every_s=-1"], ["checkpoint_every_s must be a number of seconds >= 0, but got -1"]),
]

BLEND_ROWS = [
    (["search.blend.stages=3"], ["search.blend.stages is read only with search.blend.layerwise=stage",
                                 "but got search.blend.layerwise=global"]),
    (["search.fidelity=full", "search.proxy.finetune_steps=5"],
     ["search.proxy.finetune_steps is read only with search.fidelity=proxy, but got search.fidelity=full"]),
    (["search.sampler=tpe", "search.population_size=4"],
     ["search.population_size is read only with search.sampler=nsga2|cmaes, but got search.sampler=tpe"]),
    (["search.blend.pool=[l1,l3]"], ["unknown criterion 'l3'", "valid: apoz"]),
    (["search.blend.pool=[l1]"], ["search.blend.pool must list at least 2 criteria", "but got ['l1']"]),
    (["search.blend.n_clusters=12"], ["search.blend.n_clusters must be an integer in [1, 9]", "but got 12"]),
    (["search.blend.normalize=minmax"], ["search.blend.normalize must be one of rank, zscore, but got 'minmax'"]),
]

COMPRESS_ROWS = [
    (["compress.bits=0"], ["compress.bits must be an integer in [1, 16], but got 0"]),
    (["compress.layers=[features.99]", "compress.sparsity=0.8", "compress.bits=4"],
     ["compress.layers must be units of the model (features.0,", "but got ['features.99']"]),
    (["compress.sparsity=[0.5]"], ["compress.sparsity must be one value or a list of 2 (one per layer), but got [0.5]"]),
    (["compress.filter_ratio=1"], ["compress.filter_ratio must be in [0, 1), but got 1"]),
    (["+compress.fo=1"], ["unknown key 'compress.fo'"]),
    (["compress.bit=3"], ["unknown key 'compress.bit'; did you mean compress.bits"]),
    (["criterion=l3"], ["unknown criterion 'l3'"]),
]


def _files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*"))


@pytest.mark.parametrize("args, musts", RUN_ROWS, ids=[" ".join(a) for a, _ in RUN_ROWS])
def test_run_cli_refuses_before_any_work(args, musts, capsys, tmp_path):
    code = run_cli.main([*args, f"cache_dir={tmp_path}/cache", f"output_dir={tmp_path}/out"])
    assert_refused(capsys, code, musts)
    assert _files(tmp_path) == []  # no base model trained or cached, no record written


@pytest.mark.parametrize("args, musts", SEARCH_ROWS, ids=[" ".join(a) for a, _ in SEARCH_ROWS])
def test_search_cli_refuses_before_any_work(args, musts, capsys, tmp_path):
    code = launch.main([*args, f"cache_dir={tmp_path}/cache", f"output_root={tmp_path}/search"])
    assert_refused(capsys, code, musts)
    assert _files(tmp_path) == []  # no output folder, no MLflow store, no base model


@pytest.mark.parametrize("args, musts", BLEND_ROWS, ids=[" ".join(a) for a, _ in BLEND_ROWS])
def test_blend_cli_refuses_before_any_work(args, musts, capsys, tmp_path):
    code = blend_cli.main([*args, f"cache_dir={tmp_path}/cache", f"output_root={tmp_path}/search"])
    assert_refused(capsys, code, musts)
    assert _files(tmp_path) == []


@pytest.mark.parametrize("args, musts", COMPRESS_ROWS, ids=[" ".join(a) for a, _ in COMPRESS_ROWS])
def test_compress_cli_refuses_before_any_work(args, musts, capsys, tmp_path):
    code = compress_cli.main([*args, f"cache_dir={tmp_path}/cache", f"output_dir={tmp_path}/out"])
    assert_refused(capsys, code, musts)
    assert _files(tmp_path) == []


def _saved_search(tmp_path: Path) -> Path:
    """An output folder as an earlier search leaves it: its state file and resolved config."""
    cfg = launch.load_search_config([f"output_root={tmp_path}"])
    folder = tmp_path / "earlier"
    folder.mkdir()
    from omegaconf import OmegaConf

    OmegaConf.save(cfg, folder / "config.yaml", resolve=True)
    (folder / "launch_state.json").write_text(json.dumps({"parent_run_id": "0" * 32}))
    return folder


def test_resume_refuses_overrides_that_change_the_search(tmp_path, capsys):
    folder = _saved_search(tmp_path)
    before = _files(tmp_path)
    code = launch.main([f"resume={folder}", "search.num_trials=3", "seed=4", "num_cpus=1"])
    assert_refused(capsys, code, [f"resume={folder}", "would change it: search.num_trials, seed",
                            "allowed with resume: num_cpus, ray_address"])
    assert _files(tmp_path) == before


def test_resume_accepts_where_it_runs(tmp_path):
    folder = _saved_search(tmp_path)
    cfg = launch.load_search_config([f"resume={folder}", "num_cpus=1", "ray_address=127.0.0.1:6379"])
    assert (cfg.num_cpus, cfg.ray_address, cfg.resume) == (1, "127.0.0.1:6379", str(folder))
    assert cfg.search.num_trials == 16  # the saved search, untouched


def test_resume_of_a_folder_without_state(tmp_path, capsys):
    code = launch.main([f"resume={tmp_path}"])
    assert_refused(capsys, code, ["resume must be the output folder of an earlier search", f"but got {tmp_path}"])


# The Python API: (callable, exception type, substrings of the message)
API_ROWS = [
    (lambda: PruneConfig(ratio=7.0), ValueError, ["prune.ratio must be in [0, 1), but got 7.0"]),
    (lambda: PruneConfig(ratio=True), ValueError, ["prune.ratio must be in [0, 1), but got True"]),
    (lambda: PruneConfig(schedule="differential", ratio_low=0.6, ratio_high=0.1), ValueError,
     ["prune.ratio_high must be >= prune.ratio_low=0.6"]),
    (lambda: PruneConfig(criterion="l3"), ValueError, ["unknown criterion 'l3'"]),
    (lambda: PruneConfig(steps=0), ValueError, ["prune.steps must be an integer >= 1, but got 0"]),
    (lambda: PruneConfig(score_batches=2.5), ValueError, ["prune.score_batches must be an integer >= 1, but got 2.5"]),
    (lambda: PruneConfig(method="greedy_car", rescore_every=True), ValueError,
     ["prune.rescore_every must be an integer >= 1, but got True"]),
    (lambda: greedy_car_order(build_model("small_cnn"), "features.99", [(torch.zeros(2, 1, 28, 28), torch.zeros(2, dtype=torch.long))],
                              n_remove=1), ValueError, ["unit_name must be one of features.0", "but got 'features.99'"]),
    (lambda: PruneConfig(0.5), TypeError, ["positional"]),  # keyword-only: no silent field mix-up
    (lambda: FinetuneConfig(momentum=1.0), ValueError, ["finetune.momentum must be in [0, 1), but got 1.0"]),
    (lambda: MeasureConfig(warmup=-1), ValueError, ["measure.warmup must be an integer >= 0, but got -1"]),
    (lambda: PretrainConfig(lr=0), ValueError, ["model.pretrain.lr must be a number > 0, but got 0"]),
    (lambda: make_ratios("per_layer", [8, 8, 8], ratios=[0.1]), ValueError,
     ["prune.ratios must have one ratio per prunable unit (3 for this model), but got 1"]),
    (lambda: get_data("fashion_mnist", fraction=0), ValueError, ["data.fraction", "0"]),
    (lambda: get_data("fashion_mnist", num_workers=-2), ValueError, ["data.num_workers must be an integer >= 0, but got -2"]),
    (lambda: get_data("coloured_fashion_mnist", options={"colour": "blue"}), ValueError,
     ["data.colour must be one of random, label, but got 'blue'"]),
    (lambda: get_data("fashion_mnist", options={"colour": "label"}), ValueError,
     ["data.colour must be a setting of fashion_mnist (none), but got 'colour'"]),
    (lambda: get_criterion("l3"), ValueError, ["unknown criterion 'l3'; valid: apoz"]),
    (lambda: build_model("resnet5"), ValueError, ["unknown model 'resnet5'; valid: alexnet"]),
    (lambda: prune_layer(build_model("small_cnn"), "features.99", [0]), ValueError, ["unknown unit 'features.99'"]),
    (lambda: prune_layer(build_model("small_cnn"), "features.0", [0.5, 2.7]), ValueError, ["keep_idxs", "0.5"]),
    (lambda: prune_layer(build_model("small_cnn"), "features.0", []), ValueError, ["keep_idxs is empty"]),
]


@pytest.mark.parametrize("call, exc, musts", API_ROWS, ids=[f"api{i}" for i in range(len(API_ROWS))])
def test_python_api_refuses(call, exc, musts):
    torch.manual_seed(0)
    with pytest.raises(exc) as info:
        call()
    text = str(info.value)
    assert "\n" not in text
    for must in musts:
        assert must in text, f"{must!r} not in {text!r}"


# ---------------------------------------------------------------- what is accepted instead


@pytest.mark.parametrize("prefix", ["", "+", "++"])
def test_a_declared_key_is_set_with_or_without_plus(prefix):
    from trainables.cli.compose import compose

    assert compose("config", [f"{prefix}prune.ratio=0.3"]).prune.ratio == 0.3


def test_free_form_maps_take_any_key_with_or_without_plus():
    from trainables.cli.compose import compose

    cfg = compose("config", ["model.kwargs.width=8", "+criterion.options.eps=0.5"])
    assert cfg.model.kwargs.width == 8 and cfg.criterion.options.eps == 0.5


def test_restating_a_default_is_not_a_change():
    from trainables.cli.compose import compose

    # prune.ratio=0.5 is uniform's default: with a differential schedule it changes nothing, so it is accepted
    cfg = compose("config", ["prune.schedule=differential", "prune.ratio=0.5"])
    assert cfg.prune.schedule == "differential"


def test_a_group_changes_which_keys_exist():
    from trainables.cli.compose import compose

    assert compose("config", ["data=coloured_fashion_mnist", "data.colour=label"]).data.colour == "label"


def test_a_given_data_root_without_the_data_is_an_error_naming_it(tmp_path, monkeypatch):
    """A root that does not hold the files fails even where the system copy exists (no silent
    fallback); with no root the fallback is read and the splits say from where."""
    from conftest import make_learnable_fmnist

    import data._fashion_mnist as fmnist

    system = make_learnable_fmnist(tmp_path / "system", n_train=100, n_test=20)
    monkeypatch.setattr(fmnist, "FALLBACK_DIRS", (system,))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError) as info:
        get_data("fashion_mnist", root=str(empty), val_size=10)
    assert f"data.root={empty} does not hold fashion_mnist's IDX files" in str(info.value)
    assert str(empty / "FashionMNIST" / "raw") in str(info.value)  # what was looked for, where
    assert get_data("fashion_mnist", val_size=10).data_root == str(system)
