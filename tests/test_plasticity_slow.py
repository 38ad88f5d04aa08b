"""Mittal et al.'s qualitative result on the real Fashion-MNIST (slow: `pytest -m slow`)."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest

from trainables.cli.base_model import prepare
from trainables.cli.compose import configs_of, load_run_config
from trainables.protocol.stages import run_protocol

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="needs dataset-fashion-mnist"),
]


def test_random_and_l1_both_recover_while_their_damage_differs():
    cfg = load_run_config(["progress=false", "measure.latency=false"])
    base, splits, _, _ = prepare(cfg)
    prune, finetune, measure, _ = configs_of(cfg)
    results = {}
    for crit in ("random", "l1"):
        # The budget of bench/plasticity.py, whose table is in bench/RESULTS.md.
        p = dataclasses.replace(prune, criterion=crit, ratio=0.5, p=0.5, q=3.0)
        raw = run_protocol(copy.deepcopy(base), splits, dataclasses.replace(p, method="one_shot", q=0.0), finetune, measure=measure)
        rec = run_protocol(copy.deepcopy(base), splits, p, finetune, measure=measure)
        results[crit] = (raw["final_val_acc"], rec["final_val_acc"], rec["base_val_acc"])
    for crit, (_, final, base_acc) in results.items():
        assert final >= base_acc - 0.015, f"{crit}: recovered to {final:.4f}, base {base_acc:.4f}"
    # Damage before any fine-tuning differs between the criteria.
    assert abs(results["random"][0] - results["l1"][0]) > 0.01, results
