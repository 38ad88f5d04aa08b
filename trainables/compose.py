"""The run config: Hydra composition of ``conf/``, its checks, and the typed configs it holds.

Every check runs here, before any data is read or any model is trained, and raises a
one-line ``ValueError`` naming the key, the value and what is allowed. The command lines
(``trainables.run``, ``trainables.pretrain``, ``search.launch``, ``search.blend``) and the
search's driver all read their configs through this module.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

from trainables.config import FinetuneConfig, MeasureConfig, PretrainConfig, PruneConfig

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

__all__ = ["CONF_DIR", "check_config", "compose", "configs_of", "data_args", "load_run_config"]


def _group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def compose(config_name: str, overrides: list[str]) -> Any:
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


def _dataclass_from(cls: type, key: str, values: dict, **extra: Any) -> Any:
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown key {key}.{unknown[0]}; valid: {', '.join(sorted(names - set(extra)))}")
    return cls(**{**values, **extra})


def configs_of(cfg: Any) -> tuple[PruneConfig, FinetuneConfig, MeasureConfig, PretrainConfig]:
    """The typed configs of a composed config; each validates itself on construction."""
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


def check_config(cfg: Any) -> None:
    """Validate names, ranges and lengths; builds the (untrained) model to count its units."""
    from data import list_datasets
    from trainables.models import build_model, list_models
    from trainables.schedules import check_ratio_count
    from trainables.surgery import describe_units

    if cfg.model.name not in list_models():
        raise ValueError(f"unknown model '{cfg.model.name}'; valid: {', '.join(list_models())}")
    if cfg.data.name not in list_datasets():
        raise ValueError(f"unknown dataset '{cfg.data.name}'; valid: {', '.join(list_datasets())}")
    for key in ("seed", "data.num_workers"):
        value = _select(cfg, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{key} must be an integer >= 0, but got {value!r}")
    if cfg.get("threads") is not None and (isinstance(cfg.threads, bool) or not isinstance(cfg.threads, int)
                                           or cfg.threads < 1):
        raise ValueError(f"threads must be null or an integer >= 1, but got {cfg.threads!r}")
    data_args(cfg)  # an unknown class subset fails here
    prune, _, _, _ = configs_of(cfg)  # constructing the configs validates every field
    _check_target_classes(cfg, prune)
    if prune.schedule == "per_layer":
        model = build_model(cfg.model.name, **(cfg.model.kwargs or {}))
        check_ratio_count(prune.ratios, len(describe_units(model)), model=cfg.model.name)


def _check_target_classes(cfg: Any, prune: PruneConfig) -> None:
    """Unknown ``prune.target_classes`` fail here when the data set's class names are known
    without reading it (else once the data is loaded, still before any training)."""
    from data import known_class_names
    from trainables.protocol import resolve_classes

    names = known_class_names(cfg.data.name)
    if not prune.target_classes or names is None:
        return
    args = data_args(cfg)
    if args["classes"] is not None and args["remap_labels"]:  # labels are renumbered within the subset
        names = [c if isinstance(c, str) else names[c] for c in args["classes"]]
    resolve_classes(prune.target_classes, names)


def _select(cfg: Any, key: str) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.select(cfg, key)


def data_args(cfg: Any, fraction: float | None = None) -> dict:
    """Keyword arguments of ``data.get_data`` for a composed config (``fraction`` overrides ``data.fraction``)."""
    from data import load_class_subset

    d = cfg.data
    classes = list(d.classes) if d.classes is not None else None
    if cfg.get("subset"):
        classes = load_class_subset(cfg.subset)
    return {"name": d.name, "root": d.root, "download": d.download, "val_size": d.val_size, "seed": d.seed,
            "classes": classes, "remap_labels": d.remap_labels, "fraction": d.fraction if fraction is None else fraction,
            "num_workers": d.get("num_workers", 0)}
