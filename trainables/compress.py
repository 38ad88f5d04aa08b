"""Compress pruned layers: ``python -m trainables.compress [key=value ...]``.

Examples::

    python -m trainables.compress                                  # CAR, then Deep Compression, first two convs
    python -m trainables.compress compress.sparsity=[0.6,0.85] compress.bits=3
    python -m trainables.compress criterion=l1 compress.layers=[features.0] compress.sparsity=0.8 compress.bits=3

Loads (or trains and caches) the base model of ``conf/compress.yaml`` (which extends
``conf/config.yaml``), removes filters with the criterion, prunes and shares the remaining
weights, Huffman-codes them (``trainables.experiments.compression``), and prints per stage the layers'
bits, the ratio to the dense float32 layers and the val accuracy. Writes ``record.json``,
``config.yaml`` and ``layers.npz`` (the storage form) to a folder under ``output_dir`` and
prints the record's path last.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

from trainables.cli import run_cli, save_run
from trainables.cli.compose import load_run_config
from trainables.experiments.compression import (
    STAGES,
    CompressConfig,
    check_layers,
    compress_model,
    keep_by_greedy_car,
    keep_by_score,
)
from trainables.protocol.config import require

__all__ = ["compress_config", "format_table", "load_compress_config", "main", "run"]


def compress_config(cfg: Any) -> CompressConfig:
    """The checked ``compress`` section of a composed config."""
    from dataclasses import fields

    from omegaconf import OmegaConf

    values = OmegaConf.to_container(cfg.compress, resolve=True)
    names = {f.name for f in fields(CompressConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown key compress.{unknown[0]}; valid: {', '.join(sorted(names))}")
    return CompressConfig(**values)


def load_compress_config(overrides: list[str]) -> Any:
    """The composed ``conf/compress.yaml`` with every check run: the run config's, the
    ``compress`` section's, and the layers against the (untrained) model's units."""
    from trainables.cli.compose import config_task
    from trainables.core.models import build_model

    cfg = load_run_config(overrides, config_name="compress")
    task = config_task(cfg).name
    require(task == "classification", "task", "classification for trainables.compress (its stages are scored by "
            "top-1 accuracy)", task)
    ccfg = compress_config(cfg)
    base_seed = cfg.get("base_seed")
    require(base_seed is None or (isinstance(base_seed, int) and not isinstance(base_seed, bool) and base_seed >= 0),
            "base_seed", "null or an integer >= 0", base_seed)
    units = check_layers(build_model(cfg.model.name, **(cfg.model.kwargs or {})), ccfg.layers)
    ccfg.ratios_for(len(units))  # a ratio list of the wrong length for the default layers fails here
    return cfg


def format_table(record: dict) -> str:
    """Per stage: val accuracy, and per layer and in total the bits and the ratio to dense float32."""
    rows = record["layers"]
    head = f"{'stage':<16} {'val acc':>8} " + " ".join(f"{r['name'] + ' bits':>18} {'x':>6}" for r in rows)
    lines = [head + f" {'total bits':>11} {'x':>6}"]
    for s in STAGES:
        cells = " ".join(f"{r['bits'][s]:>18} {r['ratio'][s]:>6.1f}" for r in rows)
        lines.append(f"{s:<16} {100 * record['val_acc'][s]:>7.2f}% {cells} "
                     f"{record['total']['bits'][s]:>11} {record['total']['ratio'][s]:>6.1f}")
    lines.append(f"accuracy loss {record['accuracy_loss_points']:.2f} points; wall time {record['wall_s']:.0f}s")
    return "\n".join(lines)


def run(cfg: Any, log=print) -> tuple[dict, Path]:
    """Run one composed config; returns the record and the path it was written to."""
    from omegaconf import OmegaConf

    from trainables.cli.base_model import prepare
    from trainables.cli.compose import configs_of
    from trainables.criteria import ScoringContext, get_criterion
    from trainables.protocol.stages import scoring_batches

    ccfg = compress_config(cfg)
    prune, finetune, _, _ = configs_of(cfg)
    base_cfg = cfg if cfg.get("base_seed") is None else OmegaConf.merge(cfg, {"seed": cfg.base_seed})
    model, splits, base_path, _ = prepare(base_cfg, log=log)
    batches = scoring_batches(splits, prune, cfg.seed)
    if ccfg.greedy:
        choose = keep_by_greedy_car(batches)
    else:
        criterion = get_criterion(prune.criterion)
        ctx = ScoringContext(batches=batches, seed=cfg.seed, options=dict(prune.criterion_options))
        choose = keep_by_score(lambda m, u: criterion(m, u, ctx))
    record, storage = compress_model(model, splits, ccfg, finetune, choose, seed=cfg.seed, progress=cfg.progress,
                                     log=log)
    record.update(base_model=str(base_path), criterion="greedy_car" if ccfg.greedy else prune.criterion,
                  config=OmegaConf.to_container(cfg, resolve=True))
    out = save_run(cfg, record, f"{cfg.model.name}-{record['criterion']}-s{cfg.seed}")
    np.savez(out / "layers.npz", **{f"{conv}/{key}": np.frombuffer(v, dtype=np.uint8) if isinstance(v, bytes) else v
                                    for conv, stored in storage.items() for key, v in stored.items()})
    return record, out / "record.json"


def main(argv: list[str] | None = None) -> int:
    return run_cli(__doc__, argv, load_compress_config, run, format_table, config_name="compress")


if __name__ == "__main__":
    sys.exit(main())
