"""One point of the plasticity study: ``python -m trainables.run [key=value ...]``.

Examples::

    python -m trainables.run                                   # l1, 50% uniform, layer by layer
    python -m trainables.run criterion=random prune.ratio=0.5 prune.p=0.2 prune.q=1
    python -m trainables.run prune.schedule=differential prune.ratio_low=0.2 prune.ratio_high=0.7
    python -m trainables.run prune.method=one_shot prune.target_flops_reduction=0.5

Loads (or trains and caches) the base model, runs the protocol, prints a summary table and,
as its last line, the path of the JSON record.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from trainables.config import FinetuneConfig, MeasureConfig, PretrainConfig, PruneConfig

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

__all__ = ["load_run_config", "prepare", "run", "format_summary", "CONF_DIR"]


def _group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def compose(config_name: str, overrides: list[str]):
    """Hydra's compose with its multi-line errors turned into one-line ``ValueError``s."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException, MissingConfigException

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            return hydra_compose(config_name=config_name, overrides=list(overrides))
    except MissingConfigException as err:
        missing = getattr(err, "missing_cfg_file", "") or ""
        group, _, value = missing.partition("/")
        if group and value and (CONF_DIR / group).is_dir():
            raise ValueError(f"unknown {group} '{value}'; valid: {', '.join(_group_options(group))}") from None
        raise ValueError(str(err).strip().splitlines()[0]) from None
    except HydraException as err:
        text = str(err).strip() or str(err.__cause__ or type(err).__name__)
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        raise ValueError(" ".join(lines[:2])) from None


def load_run_config(overrides: list[str], config_name: str = "config") -> Any:
    """The composed, checked config (an OmegaConf DictConfig); every check runs here, before any work."""
    cfg = compose(config_name, overrides)
    check_config(cfg)
    return cfg


def _dataclass_from(cls, key: str, values: dict, **extra: Any):
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown key {key}.{unknown[0]}; valid: {', '.join(sorted(names - set(extra)))}")
    return cls(**{**values, **extra})


def configs_of(cfg) -> tuple[PruneConfig, FinetuneConfig, MeasureConfig, PretrainConfig]:
    from omegaconf import OmegaConf

    c = OmegaConf.to_container(cfg, resolve=True)
    # Keys of the criterion group besides name/options (e.g. blended's weights) are its options too.
    crit = c["criterion"]
    options = {**(crit.get("options") or {}), **{k: v for k, v in crit.items() if k not in ("name", "options")}}
    prune = _dataclass_from(PruneConfig, "prune", c["prune"], criterion=crit["name"], criterion_options=options)
    finetune = _dataclass_from(FinetuneConfig, "finetune", c["finetune"], batch_size=c["data"]["batch_size"],
                               eval_batch_size=c["data"]["eval_batch_size"])
    measure = _dataclass_from(MeasureConfig, "measure", c["measure"])
    pretrain = _dataclass_from(PretrainConfig, "model.pretrain", c["model"]["pretrain"], batch_size=c["data"]["batch_size"])
    return prune, finetune, measure, pretrain


def check_config(cfg) -> None:
    """Validate names, ranges and lengths; builds the (untrained) model to count its units."""
    from data import list_datasets
    from trainables.models import build_model, list_models
    from trainables.surgery import describe_units

    if cfg.model.name not in list_models():
        raise ValueError(f"unknown model '{cfg.model.name}'; valid: {', '.join(list_models())}")
    if cfg.data.name not in list_datasets():
        raise ValueError(f"unknown dataset '{cfg.data.name}'; valid: {', '.join(list_datasets())}")
    prune, finetune, _, pretrain = configs_of(cfg)
    prune.validate()
    finetune.validate()
    pretrain.validate()
    if prune.schedule == "per_layer":
        n_units = len(describe_units(build_model(cfg.model.name, **(cfg.model.kwargs or {}))))
        if prune.ratios is None or len(prune.ratios) != n_units:
            got = 0 if prune.ratios is None else len(prune.ratios)
            raise ValueError(f"prune.ratios has {got} values; model {cfg.model.name} has {n_units} prunable units")


def _data_args(cfg, fraction: float | None = None) -> dict:
    from data import load_class_subset

    d = cfg.data
    classes = list(d.classes) if d.classes is not None else None
    if cfg.get("subset"):
        classes = load_class_subset(cfg.subset)
    return {"name": d.name, "root": d.root, "download": d.download, "val_size": d.val_size, "seed": d.seed,
            "classes": classes, "remap_labels": d.remap_labels, "fraction": d.fraction if fraction is None else fraction}


def prepare(cfg, log=print):
    """Load the data and the cached base model (training it first if needed).

    Returns ``(model, splits, base_path, base_meta)``; ``splits.train`` is the fine-tuning
    set (``data.fraction`` of it), while the base model is always trained on all of it.
    """
    from data import get_data
    from trainables.pretrain import get_base_model

    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    _, _, _, pretrain = configs_of(cfg)
    full_args = _data_args(cfg, fraction=1.0)
    full = get_data(**full_args)
    data_key = {k: v for k, v in full_args.items() if k not in ("root", "download", "fraction")}
    model, path, meta = get_base_model(
        cfg.model.name, dict(cfg.model.kwargs or {}), full, data_key, pretrain, cfg.cache_dir,
        seed=cfg.seed, progress=cfg.progress, log=log,
    )
    splits = full if cfg.data.fraction == 1.0 else get_data(**_data_args(cfg))
    return model, splits, path, meta


def format_summary(record: dict) -> str:
    """A plain-text table of a run record."""
    pct = lambda v: "   -  " if v is None else f"{100 * v:6.2f}"  # noqa: E731
    lines = [f"{'unit':<22} {'filters':>11} {'damage':>7} {'recovered':>9}"]
    for u in record["units"]:
        lines.append(f"{u['name']:<22} {u['filters_before']:>4} -> {u['filters_after']:<4} "
                     f"{pct(u['damage_val_acc']):>7} {pct(u['recovered_val_acc']):>9}")
    fr = record["flops_after"] / record["flops_before"]
    lines += [
        f"base val acc    {pct(record['base_val_acc'])}%",
        f"final val acc   {pct(record['final_val_acc'])}%   test acc {pct(record['final_test_acc'])}%",
        f"FLOPs           {record['flops_before'] / 1e6:.2f}M -> {record['flops_after'] / 1e6:.2f}M  (x{fr:.3f})",
        f"params          {record['params_before'] / 1e3:.1f}k -> {record['params_after'] / 1e3:.1f}k",
    ]
    if record.get("latency_ms_before") is not None:
        lines.append(f"latency (b={record['latency_batch_size']}) {record['latency_ms_before']:.2f} ms -> "
                     f"{record['latency_ms_after']:.2f} ms (x{record['latency_ms_after'] / record['latency_ms_before']:.3f})")
    lines.append(f"wall time       {record['wall_s']:.1f}s")
    return "\n".join(lines)


def run(cfg, report=None, log=print) -> tuple[dict, Path]:
    """Run one config end to end; returns the record and the path it was written to."""
    from omegaconf import OmegaConf

    from trainables.protocol import run_protocol

    prune, finetune, measure, _ = configs_of(cfg)
    model, splits, base_path, _ = prepare(cfg, log=log)
    from trainables.protocol import resolve_classes

    resolve_classes(prune.target_classes, splits.class_names)  # fail before any training
    resolved = OmegaConf.to_container(cfg, resolve=True)
    record = run_protocol(model, splits, prune, finetune, measure=measure, seed=cfg.seed, report=report,
                          progress=cfg.progress, config=resolved)
    record["base_model"] = str(base_path)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(cfg.output_dir).expanduser().resolve() / f"{stamp}-{cfg.model.name}-{prune.criterion}-{prune.method}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    path = out / "record.json"
    path.write_text(json.dumps(record, indent=1))
    return record, path


def cli_config(doc: str, argv: list[str] | None, load) -> tuple[Any, int]:
    """The shared front of the command lines: ``(cfg, 0)``, or ``(None, exit code)`` after
    ``-h`` (prints ``doc``) or a bad input (one line on stderr, exit code 2)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(doc)
        return None, 0
    try:
        return load(argv), 0
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return None, 2


def main(argv: list[str] | None = None) -> int:
    cfg, code = cli_config(__doc__, argv, load_run_config)
    if cfg is None:
        return code
    try:
        record, path = run(cfg)  # a FLOPs target out of reach is found only once the model is built
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_summary(record))
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
