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

from trainables.cli.keycheck import check_data, check_keys, check_unread
from trainables.protocol.config import (
    FinetuneConfig,
    MeasureConfig,
    PretrainConfig,
    PruneConfig,
    require,
    require_int,
)

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

# subset_base: what the base model of a class-specific run is trained on (all: every class, as in
# Mittal et al.; subset: only the subset's classes). subset_head: keep the all-class head and
# predict within the subset, or cut the head to the subset's classes.
SUBSET_BASES = ("all", "subset")
SUBSET_HEADS = ("keep", "cut")
NO_WEIGHTS_FOR_EPOCHS_0 = ("an integer >= 1 when model.weights is null (give model.weights=<checkpoint or "
                           "state_dict file> to use given weights; epochs=0 then means no training)")

__all__ = [
    "CONF_DIR", "NO_WEIGHTS_FOR_EPOCHS_0", "SUBSET_BASES", "SUBSET_HEADS", "base_data_args", "check_config", "compose",
    "config_task",
    "configs_of", "data_args", "load_run_config",
]


def _group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def compose(config_name: str, overrides: list[str]) -> Any:
    """Hydra's compose with its multi-line errors turned into one-line ``ValueError``s.

    Before Hydra (and long before torch) is imported, every key is checked against those
    ``conf/`` declares (``check_keys``), so a misspelt key, with or without ``+``, is refused
    with its close matches instead of being added and ignored; after composing, a setting the
    chosen schedule or method does not read, and a bad data setting, are refused
    (``check_unread``, ``check_data``)."""
    keys = check_keys(config_name, overrides)
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException, MissingConfigException

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = hydra_compose(config_name=config_name, overrides=keys.hydra_overrides)
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
    from omegaconf import OmegaConf

    values = OmegaConf.to_container(cfg, resolve=False)
    check_data(values)
    check_unread(config_name, values, keys.changed(values))
    from trainables.core.sources import apply_sources

    apply_sources(cfg)  # model=torchvision|timm|custom, data=custom: one qualified name each
    return cfg


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
    # prune last: its criterion-name check is the only one that imports a registry (and torch)
    finetune = _dataclass_from(FinetuneConfig, "finetune", c["finetune"], batch_size=c["data"]["batch_size"],
                               eval_batch_size=c["data"]["eval_batch_size"])
    measure = _dataclass_from(MeasureConfig, "measure", c["measure"])
    pretrain = _dataclass_from(PretrainConfig, "model.pretrain", c["model"]["pretrain"], batch_size=c["data"]["batch_size"])
    prune = _dataclass_from(PruneConfig, "prune", c["prune"], criterion=crit["name"], criterion_options=options)
    return prune, finetune, measure, pretrain


def check_config(cfg: Any) -> None:
    """Validate names, ranges and lengths; builds the (untrained) model to count its units."""
    # The typed configs' values first: they need no registry, so a value out of range is
    # refused before torch is imported (the registries below import it).
    configs_of(cfg)
    from data import dataset_task
    from trainables.core.models import MODELS, build_model
    from trainables.core.sources import check_sources
    from trainables.core.surgery import describe_units
    from trainables.protocol.schedules import check_ratio_count

    # Registered names and qualified ones (torchvision:<name>, custom:<module>:<callable>) alike;
    # an unknown one is a one-line error listing the valid names or the close matches.
    check_sources(cfg)
    MODELS.get(cfg.model.name)
    dataset_task(cfg.data.name)
    for key in ("seed", "data.num_workers"):
        require_int(key, _select(cfg, key), 0)
    threads = cfg.get("threads")
    require(threads is None or (isinstance(threads, int) and not isinstance(threads, bool) and threads >= 1),
            "threads", "null or an integer >= 1", threads)
    _check_subset(cfg)
    data_args(cfg)  # an unknown class subset fails here
    prune, _, _, pretrain = configs_of(cfg)  # constructing the configs validates every field
    _check_task(cfg, prune)
    _check_weights(cfg, pretrain)
    # Scratch's budget is the base model's pretraining plus the fine-tuning: with no
    # pretraining epochs it would be compared on the fine-tuning budget alone.
    require(prune.method != "scratch" or pretrain.epochs >= 1, "model.pretrain.epochs",
            "an integer >= 1 for prune.method=scratch (its budget is pretraining + fine-tuning)", pretrain.epochs)
    _check_target_classes(cfg, prune)
    if prune.schedule == "per_layer" or prune.units != "all":
        from trainables.core.surgery import select_units

        model = build_model(cfg.model.name, **(cfg.model.kwargs or {}))
        units = select_units(model, describe_units(model), prune.units)
        if prune.schedule == "per_layer":
            check_ratio_count(prune.ratios, len(units), model=cfg.model.name)


def config_task(cfg: Any) -> Any:
    """The ``trainables.protocol.tasks.Task`` of a composed config, after checking that its model and its
    data set solve the same one (both registries stamp the task on the entry)."""
    from data import dataset_task
    from trainables.core.models import MODELS
    from trainables.protocol.tasks import check_pairing, get_task

    task = get_task(MODELS.get(cfg.model.name).task)
    check_pairing(cfg.model.name, task.name, cfg.data.name, dataset_task(cfg.data.name))
    return task


def _check_task(cfg: Any, prune: PruneConfig) -> None:
    """The model and the data solve the same task, and the pruning settings apply to it."""
    from trainables.protocol.tasks import check_criterion

    task = config_task(cfg)
    if task.name == "classification":
        return
    if prune.method not in ("control", "scratch", "greedy_car"):  # those score no filters
        check_criterion(task, prune.criterion)
    if prune.criterion == "blended" and prune.method not in ("control", "scratch", "greedy_car"):
        for name in (prune.criterion_options.get("weights") or {}):
            check_criterion(task, name)
    require(prune.method != "greedy_car", "prune.method",
            f"not greedy_car for {task.name} (greedy CAR ranks filters by classification accuracy)", prune.method)
    require(cfg.get("subset") is None, "subset", f"null for {task.name} (class subsets are for classification)",
            cfg.get("subset"))
    classes = cfg.data.get("classes")
    require(classes is None, "data.classes", f"null: {cfg.data.name} is a {task.name} data set (a scene holds "
            "several classes)", None if classes is None else list(classes))
    # The FLOPs planner follows classification graphs; a detector's heads and SegNet's coupled
    # decoder convs are outside what it models.
    require(prune.target_flops_reduction is None, "prune.target_flops_reduction",
            f"null for {task.name} (set prune.ratio or prune.ratios instead)", prune.target_flops_reduction)


def _check_subset(cfg: Any) -> None:
    subset, base, head = cfg.get("subset"), cfg.get("subset_base", "all"), cfg.get("subset_head", "keep")
    require(base in SUBSET_BASES, "subset_base", f"one of {', '.join(SUBSET_BASES)}", base)
    require(head in SUBSET_HEADS, "subset_head", f"one of {', '.join(SUBSET_HEADS)}", head)
    require(subset is None or isinstance(subset, str), "subset", "null or the name of a file in conf/classes", subset)
    if not subset:  # a non-default subset_* without a subset would silently do nothing
        for key, value, default in (("subset_base", base, "all"), ("subset_head", head, "keep")):
            require(value == default, "subset", f"a class subset from conf/classes when {key}={value}", subset)
        return
    # Two sources of classes would leave "all classes" ambiguous for the base model.
    classes = cfg.data.get("classes")
    require(classes is None, "data.classes", f"null when subset={subset} names the classes", classes)
    named = (cfg.model.get("kwargs") or {}).get("weights")
    # Trials rebuild the cut model from its weights, and torchvision refuses named weights for a
    # head that is not 1000 wide.
    require(head != "cut" or named is None, "model.kwargs.weights",
            "null with subset_head=cut (give the weights as a file: model.weights=<path>)", named)


def _check_weights(cfg: Any, pretrain: PretrainConfig) -> None:
    weights = cfg.model.get("weights")
    require(weights is None or (isinstance(weights, str) and Path(weights).expanduser().is_file()), "model.weights",
            "null or the path of an existing checkpoint or state_dict file", weights)
    require(pretrain.epochs >= 1 or weights is not None, "model.pretrain.epochs", NO_WEIGHTS_FOR_EPOCHS_0,
            pretrain.epochs)


def _check_target_classes(cfg: Any, prune: PruneConfig) -> None:
    """Unknown ``prune.target_classes`` fail here when the data set's class names are known
    without reading it (else once the data is loaded, still before any training)."""
    from data import known_class_names
    from trainables.protocol.stages import resolve_classes

    names = known_class_names(cfg.data.name)
    if not prune.target_classes or names is None:
        return
    args = data_args(cfg)
    kept = None if args["classes"] is None else [c if isinstance(c, str) else names[c] for c in args["classes"]]
    if kept is not None and args["remap_labels"]:  # labels are renumbered within the subset
        names = kept
    ids = resolve_classes(prune.target_classes, names)
    # With the all-class head a class outside the subset is a valid name, but no image of it is scored.
    require(kept is None or all(names[i] in kept for i in ids), "prune.target_classes",
            f"classes of the run's data ({', '.join(kept or [])})", list(prune.target_classes))


def _select(cfg: Any, key: str) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.select(cfg, key)


def data_args(cfg: Any, fraction: float | None = None) -> dict:
    """Keyword arguments of ``data.get_data`` for the run's data (``fraction`` overrides ``data.fraction``).

    With ``subset=``: the subset's classes, labels remapped 0..k-1 only with ``subset_head=cut``
    (``keep`` keeps the ids, and ``eval_classes`` restricts predictions to the subset), and
    with ``subset_base=all`` validation carved from all classes (``split_before_subset``), so
    no validation image trained the all-class base model. ``data.remap_labels`` applies to
    ``data.classes`` only.
    """
    from data import dataset_options, load_class_subset

    d = cfg.data
    classes = list(d.classes) if d.classes is not None else None
    remap, extra = d.remap_labels, {}
    if cfg.get("subset"):
        classes = load_class_subset(cfg.subset)
        remap = cfg.get("subset_head", "keep") == "cut"
        if cfg.get("subset_base", "all") == "all":
            extra = {"split_before_subset": True}  # only here, so the keys of every other config stay as they were
    # A data set's own settings (coloured_fashion_mnist's data.colour) only where it has them,
    # so the keys (and cached base models) of every other data set stay as they were.
    # Options are strings (data.size=256 arrives from the command line as an int).
    own = {key: str(d.get(key)) for key in dataset_options(d.name) if d.get(key) is not None}
    for key, value in own.items():
        allowed = dataset_options(d.name)[key]
        require(value in allowed, f"data.{key}", f"one of {', '.join(allowed)}", value)
    if own:
        extra = {**extra, "options": own}
    return {"name": d.name, "root": d.root, "download": d.download, "val_size": d.val_size, "seed": d.seed,
            "classes": classes, "remap_labels": remap, "fraction": d.fraction if fraction is None else fraction,
            "num_workers": d.get("num_workers", 0), **extra}


def base_data_args(cfg: Any) -> dict:
    """Keyword arguments of ``data.get_data`` for the data the base model is trained on: the
    run's data at ``fraction=1``, but all classes for a subset with ``subset_base=all`` (the
    same arguments, hence the same cached base model, as the config without ``subset=``)."""
    args = data_args(cfg, fraction=1.0)
    if cfg.get("subset") and cfg.get("subset_base", "all") == "all":
        args.pop("split_before_subset")
        args.update(classes=None, remap_labels=cfg.data.remap_labels)
    return args
