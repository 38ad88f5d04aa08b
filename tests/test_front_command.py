"""A front row is reproducible: its ``python -m trainables.run ...`` command, read back by the run
command line's own config loading, gives the trial's settings, and run on tiny data, its numbers.

One small real search (4 trials, random sampler over the three schedules) feeds the end-to-end
test; the mapping from a trial config to command-line keys and Hydra's value grammar are
checked on their own, without a search.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import asdict

import pytest
from omegaconf import OmegaConf

from search.command import RunCommand, hydra_value, searched_keys
from search.launch import main as launch
from search.pareto import read_trials
from trainables.cli.compose import compose, configs_of, load_run_config


def _run_args(command: str) -> list[str]:
    args = shlex.split(command)
    assert args[:3] == ["python", "-m", "trainables.run"]
    return args[3:]


def _value_at(cfg, key: str):
    """What the composed run config holds at a command-line key (``criterion`` is a group)."""
    if key == "criterion":
        return cfg.criterion.name
    value = OmegaConf.select(cfg, key)
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


@pytest.fixture(scope="module")
def search_out(tiny_fmnist, tmp_path_factory, ray_session):
    tmp = tmp_path_factory.mktemp("front_command")
    assert launch([
        f"data.root={tiny_fmnist}", "data.val_size=100", "data.batch_size=32", "data.eval_batch_size=100",
        "model.pretrain.epochs=1", f"cache_dir={tmp / 'cache'}", f"output_root={tmp / 'out'}", "name=fc",
        "search.num_trials=4", "search.max_concurrent_trials=2", "search.sampler=random", "search.seed=3",
        "search.schedules=[uniform,differential,per_layer]", "measure.latency=false", "num_cpus=2",
    ]) == 0
    return tmp / "out" / "fc"


def test_every_trial_command_composes_to_its_settings(search_out, tiny_fmnist):
    rows = read_trials(search_out / "trials.parquet")
    done = [r for r in rows if r["status"] == "COMPLETED"]
    assert len(done) == 4 and any(r["pareto"] for r in done)
    assert "proxy_trial_id" not in rows[0]  # not a blended (proxy) search: no always-empty columns
    for row in done:
        # the default groups (Fashion-MNIST, small_cnn) need no choice on the line
        assert not {"data=", "model=", "task=", "data.name=", "model.name="} & {a[:a.find("=") + 1] for a in
                                                                              _run_args(row["command"])}
        cfg = load_run_config(_run_args(row["command"]))  # what `python -m trainables.run` composes and checks
        prune, finetune, _, _ = configs_of(cfg)
        assert (prune.criterion, prune.schedule, prune.method) == (row["criterion"], row["schedule"], row["method"])
        assert (prune.p, prune.q, finetune.lr) == (row["p"], row["q"], row["lr"])
        assert prune.score_batches == 2 and finetune.evals_per_stage == 1  # the search's own run settings
        assert (cfg.data.root, cfg.data.val_size, cfg.model.pretrain.epochs) == (str(tiny_fmnist), 100, 1)
        # config_json holds the sampled values under the command's keys, with the values it sets
        sampled = json.loads(row["config_json"])
        assert "finetune.lr" in sampled and not any(k.startswith("ratio") for k in sampled)
        assert all(_value_at(cfg, k) == v for k, v in sampled.items()), (sampled, row["command"])
        if row["schedule"] == "per_layer":
            assert prune.ratios == row["prune_ratios"]
        assert 0 < row["prune_ratio"] < 1 and 0 < row["flops_kept"] < 1


def test_front_command_rebuilds_the_trial(search_out, tmp_path):
    """The front trial's record (logged to MLflow by the search) holds the prune and fine-tune
    settings the trial ran with; its command composes to the same, and running it on the same
    tiny data and cached base model gives the same model and accuracy."""
    import mlflow

    from trainables.run import run

    rows = read_trials(search_out / "trials.parquet")
    front = [r for r in rows if r["pareto"]]
    state = json.loads((search_out / "launch_state.json").read_text())
    client = mlflow.MlflowClient(state["tracking_uri"])
    text = (search_out / "pareto.txt").read_text()
    assert "hypervolume" in text and "against flops_kept" in text and "reference point val_acc=0, flops_kept=1" in text
    for row in front:
        assert f"command:  {row['command']}" in text
        assert client.get_run(row["mlflow_run_id"]).data.tags["command"] == row["command"]
        record = json.loads(open(client.download_artifacts(row["mlflow_run_id"], "record.json", str(tmp_path))).read())
        cfg = load_run_config(_run_args(row["command"]))
        prune, finetune, _, _ = configs_of(cfg)
        assert asdict(prune) == record["config"]["prune"] and asdict(finetune) == record["config"]["finetune"]
    cheapest = front[0]
    cfg = load_run_config([*_run_args(cheapest["command"]), f"output_dir={tmp_path / 'runs'}", "progress=false"])
    rebuilt, _ = run(cfg, log=lambda *_: None)
    assert rebuilt["ratios"] == cheapest["prune_ratios"]
    assert rebuilt["flops_after"] == cheapest["flops"]
    assert rebuilt["final_val_acc"] == pytest.approx(cheapest["val_acc"], abs=1e-9)


# ---- the mapping on its own ---------------------------------------------------------------------


def test_searched_keys_are_the_run_command_keys():
    config = {"criterion": "apoz", "schedule": "per_layer", "ratio_1": 0.4, "ratio_0": 0.2, "p": 0.01, "q": 0.3,
              "lr": 0.002, "weight_l1": 0.5, "weight_g1_fpgm": 0.25, "seed": 2, "fraction": 0.5, "cell": 7}
    assert searched_keys(config) == {
        "criterion": "apoz", "prune.schedule": "per_layer", "prune.ratios": [0.2, 0.4], "prune.p": 0.01,
        "prune.q": 0.3, "finetune.lr": 0.002, "criterion.weights": {"l1": 0.5},
        "criterion.options.groups.1.weights": {"fpgm": 0.25}, "seed": 2, "data.fraction": 0.5, "cell": 7,
    }
    assert searched_keys({"front_config": {"ratio": 0.3}}) == {"prune.ratio": 0.3}


@pytest.mark.parametrize("value", [None, True, 0, 3, 0.1, 1e-05, 2.5e-12, float("inf"), "l1", "a b", "1", "true",
                                   "null", "1e5", "", "/tmp/x-y/z_1.gz", "~/data", "C:\\dir\\", "it's", [0.1, 0.25],
                                   ["Ankle boot", "3"], {"l1": 1.0, "apoz": 0.5},
                                   {"groups": [{"units": ["features.0", "layer1.0.conv1"], "weights": {"l1": 0.5}}]}])
def test_hydra_value_reads_back_as_the_same_value(value):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    back = OverridesParser.create().parse_override(f"key={hydra_value(value)}").value()  # Hydra's own grammar
    assert back == value and type(back) is type(value)


def test_command_of_a_blended_detection_trial(tmp_path):
    """The task group and a criterion with its own keys (the blend's weights) go on the line too."""
    from trainables.ray_trainable import TrialContext, trial_configs

    cfg = compose("launch", ["task=detection", f"cache_dir={tmp_path}"])
    prune, finetune, measure, _ = configs_of(cfg)
    # as the blended search hands it to its trials (search._session.trial_prune)
    blend = {**asdict(prune), "criterion_options": {"normalize": "zscore"}}
    ctx = TrialContext("small_frcnn", {}, 11, {}, {}, prune=blend, finetune=asdict(finetune),
                       measure=asdict(measure), seed=0)
    trial = {"criterion": "blended", "schedule": "uniform", "ratio": 0.35, "p": 0.01, "q": 0.2, "lr": 0.004,
             "weight_l1": 0.7, "weight_fpgm": 0.2}
    want = trial_configs(ctx, trial)
    command = RunCommand(cfg).command(*want, seed=0, trial=trial)
    args = _run_args(command)
    assert args[0] == "task=detection" and "criterion=blended" in args
    assert "criterion.weights={l1:0.7,fpgm:0.2}" in args and "criterion.normalize=zscore" in args
    assert "data=" not in command and "model=" not in command  # the task's own choices are its defaults
    got = configs_of(load_run_config(args))[:3]
    assert got[0].criterion_options["weights"] == want[0].criterion_options["weights"]
    assert got == want
