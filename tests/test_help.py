"""``--help`` teaches the keys: generated from conf/ (keys, defaults, comments, group choices),
accepted anywhere on the line, fast (no torch), and ``--cfg job`` prints the resolved config.

The keys come from ``trainables.cli.confdoc``'s own reading of conf/; the first test proves that
reading composes exactly what Hydra composes, for every config and every group option."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from trainables.cli.confdoc import (
    CONF_DIR,
    compose_light,
    describe_config,
    describe_groups,
    flatten,
    group_options,
)

ROOT = Path(__file__).resolve().parent.parent


def _hydra(config_name: str, overrides: list[str]) -> dict:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return OmegaConf.to_container(compose(config_name=config_name, overrides=overrides), resolve=False)


def _cases() -> list[tuple[str, dict]]:
    cases = [(name, {}) for name in ("config", "launch", "study", "compress")]
    for group in ("data", "model", "criterion", "task"):
        cases += [("config", {group: option}) for option in group_options(group)]
    cases += [(name, {"task": t}) for name in ("launch", "study") for t in ("detection", "segmentation")]
    cases += [("launch", {"search": "blended"}), ("compress", {"data": "fashion_mnist"})]
    return cases


@pytest.mark.parametrize("config_name, choices", _cases(), ids=lambda v: v if isinstance(v, str) else
                         ",".join(f"{k}={o}" for k, o in v.items()) or "defaults")
def test_light_composition_is_hydras(config_name, choices):
    light = compose_light(config_name, choices).values
    assert flatten(light) == flatten(_hydra(config_name, [f"{k}={o}" for k, o in choices.items()]))


def _flat_text(text: str) -> str:
    return " ".join(text.split())


def test_help_lists_every_key_with_default_and_comment(capsys):
    from trainables import run

    assert run.main(["--help"]) == 0
    out = capsys.readouterr().out
    keys = describe_config("config")
    assert len(keys) > 60  # data, model, criterion, prune, finetune, measure and the top-level keys
    flat = _flat_text(out)
    for k in keys:
        assert f"\n  {k.key} = " in out, k.key
        assert _flat_text(k.comment) in flat, k.key
    ratio = next(k for k in keys if k.key == "prune.ratio")
    assert ratio.default == 0.5 and "share of filters removed" in ratio.comment and ratio.source == "config.yaml"
    for group in describe_groups("config"):
        assert all(option in out for option in group.options)
        assert f"*{group.choice}" in out  # the default choice is marked


def test_help_works_anywhere_and_follows_group_choices(capsys):
    from trainables import run

    assert run.main(["--help"]) == 0
    plain = capsys.readouterr().out
    assert run.main(["prune.ratio=0.3", "--help"]) == 0  # was Hydra's LexerNoViableAltException
    assert capsys.readouterr().out == plain
    assert run.main(["data=coloured_fashion_mnist", "-h", "prune.ratio=0.3"]) == 0
    coloured = capsys.readouterr().out
    assert "data.colour = random" in coloured and "data.colour" not in plain


@pytest.mark.parametrize("module, key", [
    ("search.launch", "search.num_trials = 16"), ("search.study", "study.criteria = "),
    ("search.blend.__main__", "search.blend.n_clusters = 4"), ("trainables.compress", "compress.bits = "),
    ("trainables.pretrain", "model.pretrain.epochs = "),
])
def test_every_command_lists_its_own_keys(module, key, capsys):
    import importlib

    assert importlib.import_module(module).main(["--help"]) == 0
    assert key in capsys.readouterr().out


def test_cfg_job_prints_the_resolved_config_and_runs_nothing(capsys, tmp_path):
    from trainables import run

    code = run.main(["prune.ratio=0.3", f"output_dir={tmp_path}/out", f"cache_dir={tmp_path}/cache", "--cfg", "job"])
    assert code == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["prune"]["ratio"] == 0.3 and cfg["cache_dir"] == f"{tmp_path}/cache"  # resolved
    assert list(tmp_path.iterdir()) == []


_PROBE = """
import contextlib, io, json, sys, importlib
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    code = importlib.import_module(sys.argv[1]).main(sys.argv[2:])
print(json.dumps({"code": code, "loaded": sorted({m.split(".")[0] for m in sys.modules} & {"torch", "ray", "mlflow", "optuna"})}))
"""


@pytest.mark.parametrize("module, args, code", [
    ("trainables.run", ["--help"], 0),
    ("trainables.run", ["prune.ratio=0.3", "--help"], 0),
    ("trainables.run", ["ratio=0.5"], 2),
    ("trainables.run", ["+ratio=0.9"], 2),
    ("trainables.run", ["data.fraction=0"], 2),
    ("trainables.run", ["prune.ratios=[0.1,0.2,0.3,0.4,0.5]"], 2),
    ("trainables.run", ["prune.ratio=1.5"], 2),  # values out of range: refused before any registry
    ("trainables.run", ["finetune.lr=0"], 2),
    ("trainables.run", ["model.pretrain.epochs=-1"], 2),
    ("search.launch", ["--help"], 0),
    ("search.launch", ["+search.num_trial=8"], 2),
    ("search.study", ["--help"], 0),
    ("trainables.pretrain", ["--help"], 0),
])
def test_help_and_refused_keys_import_no_heavy_package(module, args, code):
    """What makes a command take seconds to start (torch, ray, mlflow, optuna) is not imported
    to answer --help or a refused key (bench/startup.py times it)."""
    out = subprocess.run([sys.executable, "-c", _PROBE, module, *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"code": code, "loaded": []}, out.stderr


def test_the_configuration_guide_lists_every_refused_pair():
    from trainables.cli.keycheck import SEARCHED, UNREAD_RULES

    page = (ROOT / "docs" / "guides" / "configuration.md").read_text()
    for rule in UNREAD_RULES:
        assert f"| `{rule.key}` | {rule.goes_with.replace('|', chr(92) + '|')}" in page, rule.key
    for key, sampler in SEARCHED:
        assert f"`{key}`" in page and f"`{sampler}=null`" in page


def test_the_search_says_how_long_the_default_takes():
    from search.launch import duration_hint, load_search_config

    text = duration_hint(load_search_config(["search.num_trials=40", "search.max_concurrent_trials=4"]))
    assert "the default search (16 trials, 2 at a time" in text and "5.4 min on 2 CPU cores" in text
    assert text.endswith("this one runs 40 trials, 4 at a time")
