"""Setting a search up: output folder state, Ray, the base model, MLflow, the trial context."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

__all__ = ["Session", "objective_of", "retime_rounds", "retime_settings", "start_search", "tune_storage"]

STATE_FILE = "launch_state.json"


@dataclass
class Session:
    ctx: Any  # trainables.ray_trainable.TrialContext
    n_units: int
    storage: str  # Ray Tune's storage of this search (tune_storage): a local path or a URI
    callback: Any
    tracker: Any
    parent_run_id: str
    restore_path: str | None
    base_val_acc: float
    base_flops: int
    base_params: int = 0  # the unpruned model's parameters (params_kept)
    splits: Any = None  # the driver's data: the front's test accuracy is measured on its test split
    candidates: list[str] | None = None  # blended search: the criteria whose factors are searched
    full_prune: dict | None = None  # proxy search: the full-fidelity prune settings (front fine-tuning)
    artifacts: list[Path] = field(default_factory=list)  # extra files for the parent MLflow run
    owns_ray: bool = True  # this search started Ray, so it shuts Ray down at the end


def objective_of(cfg) -> str:
    """The cost the search trades accuracy against (``search.objectives: [val_acc, <cost>]``)."""
    from omegaconf import OmegaConf

    from search.pareto import check_objective
    from trainables.protocol.config import require

    objectives = OmegaConf.select(cfg, "search.objectives", default=["val_acc", "flops"])
    objectives = OmegaConf.to_object(objectives) if OmegaConf.is_config(objectives) else objectives
    require(isinstance(objectives, list) and len(objectives) == 2 and objectives[0] == "val_acc",
            "search.objectives", "[val_acc, <cost>] with <cost> one of flops, params, latency", objectives)
    check_objective(objectives[1])
    require(objectives[1] != "latency" or cfg.measure.latency, "measure.latency",
            "true when search.objectives=[val_acc, latency]", cfg.measure.latency)
    return objectives[1]


def retime_rounds(cfg) -> int:
    """``search.retime.rounds``: interleaved rounds of the serial re-timing (search.retime)."""
    from omegaconf import OmegaConf

    return OmegaConf.select(cfg, "search.retime.rounds", default=6)


# What a search config without these keys (saved before they existed, or search=blended) gets.
RETIME_DEFAULTS = {"rounds": 6, "scope": "auto", "layers": 2, "all_up_to": 100}


def retime_settings(cfg) -> dict[str, Any]:
    """``search.retime``, checked (one-line ValueError): rounds, scope (search.retime.SCOPES),
    layers (non-dominated layers re-timed with scope front) and all_up_to (scope auto re-times
    every completed trial up to this many, else the front's layers)."""
    from search.retime import SCOPES
    from trainables.protocol.config import require, require_int

    given = OmegaConf.select(cfg, "search.retime", default=None)
    settings = {**RETIME_DEFAULTS, **(OmegaConf.to_container(given) if given is not None else {})}
    unknown = sorted(set(settings) - set(RETIME_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown key search.retime.{unknown[0]}; valid: {', '.join(RETIME_DEFAULTS)}")
    require_int("search.retime.rounds", settings["rounds"], 2)
    require(settings["scope"] in SCOPES, "search.retime.scope", f"one of {', '.join(SCOPES)}", settings["scope"])
    require_int("search.retime.layers", settings["layers"], 1)
    require_int("search.retime.all_up_to", settings["all_up_to"], 0)
    return settings


def mlflow_ui_command(tracking_uri: str) -> str:
    return f"mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port 5000"


def trial_prune(cfg, prune, steps_per_epoch: int | None = None) -> tuple[dict, dict]:
    """``(trial_prune, full_prune)``: the run config's prune settings with the search's
    ``prune_overrides``; with ``fidelity=proxy`` trials prune in one shot, recalibrate BN and
    take ``search.proxy.finetune_steps`` optimiser steps (0: none), while ``full_prune`` keeps
    the fine-tuning for the front. ``steps_per_epoch`` (``search.blend.proxy.steps_per_epoch``
    on the loaded data) turns those steps into the protocol's epochs; without it (checking a
    config before the data is loaded) the proxy's ``q`` is 0."""
    from dataclasses import fields

    from trainables.protocol.config import PruneConfig

    overrides = dict(cfg.search.get("prune_overrides") or {})
    known = {f.name for f in fields(PruneConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown key search.prune_overrides.{unknown[0]}; valid: {', '.join(sorted(known))}")
    full = {**asdict(prune), **overrides}
    if cfg.search.get("blend"):
        # layerwise: recorded with every trial (a stage / unit search adds its groups in start_search)
        full["criterion_options"] = {**full.get("criterion_options", {}), "normalize": cfg.search.blend.get("normalize", "rank"),
                                     "layerwise": cfg.search.blend.get("layerwise", "global")}
    trial = dict(full)
    if cfg.search.get("fidelity", "full") == "proxy":
        from search.blend.proxy import proxy_epochs
        from trainables.protocol.config import require_int

        proxy = {"adapt_bn_batches": 50, "adapt_bn_batch_size": 128, "finetune_steps": 0,
                 **dict(cfg.search.get("proxy") or {})}
        for key, low in (("adapt_bn_batches", 0), ("adapt_bn_batch_size", 1), ("finetune_steps", 0)):
            require_int(f"search.proxy.{key}", proxy[key], low)
        q = proxy_epochs(proxy["finetune_steps"], steps_per_epoch) if steps_per_epoch else 0.0
        trial.update(method="one_shot", p=0.0, q=q, adapt_bn_batches=proxy["adapt_bn_batches"],
                     adapt_bn_batch_size=proxy["adapt_bn_batch_size"])
    for values in (full, trial):
        probe = {**values, "criterion": "l1"}  # the searched criterion is checked by the space
        PruneConfig(**probe)  # validates on construction
    return trial, full


def blend_candidates(cfg, base, splits, base_path: Path, prune: dict, out: Path,
                     log=print) -> tuple[list[str] | dict, list[Path]]:
    """The blended search's candidates: ``search.blend.candidates`` if given, else the
    representatives of the criteria clustering (scores cached next to the base models).

    With ``search.blend.layerwise`` = stage or unit: a layout (``search.blend.layout``), one
    clustering and set of candidates per group of units, instead of one list."""
    from search.blend.clustering import (
        cluster_groups,
        cluster_pool,
        format_clustering,
        pool_scores,
        write_clustering,
        write_groups,
    )
    from search.blend.layout import make_layout, unit_groups
    from trainables.core.surgery import describe_units
    from trainables.protocol.config import PruneConfig
    from trainables.protocol.stages import resolve_classes, scoring_batches

    blend = cfg.search.blend
    mode = blend.get("layerwise", "global")
    groups = unit_groups([u.name for u in describe_units(base)], mode, blend.get("stages"))
    if blend.get("candidates"):
        if mode == "global":
            return list(blend.candidates), []
        return make_layout(mode, groups, [list(blend.candidates)] * len(groups)), []
    p = PruneConfig(**{**prune, "criterion": "l1", "criterion_options": {}})
    scores = pool_scores(base, list(blend.pool), scoring_batches(splits, p, cfg.seed), seed=cfg.seed,
                         target_classes=resolve_classes(p.target_classes, splits.class_names),
                         cache_dir=cfg.cache_dir, model_key=Path(base_path).stem, log=log)
    cut = {"n_clusters": blend.get("n_clusters"), "distance_threshold": blend.get("distance_threshold")}
    result = cluster_pool(scores, list(blend.pool), **cut)
    title = f"{cfg.model.name} on {cfg.data.name}: criteria clustering"
    if mode == "global":
        write_clustering(result, out / "clustering", title=title, extra={"layerwise": "global"})
        log(format_clustering(result))
        log(f"candidates (cluster representatives): {', '.join(result.representatives)}")
        return result.representatives, [out / "clustering"]  # a folder: MLflow keeps its name
    per_group = cluster_groups(scores, list(blend.pool), groups, **cut)
    write_groups(result, per_group, groups, mode, out / "clustering", title=title)
    for i, (units, res) in enumerate(zip(groups, per_group, strict=True)):
        log(f"{mode} {i} ({', '.join(units)}): candidates (cluster representatives): {', '.join(res.representatives)}")
    return make_layout(mode, groups, [r.representatives for r in per_group]), [out / "clustering"]


def _init_ray(cfg, log=print) -> bool:
    """Attach to a cluster when ``ray_address`` or RAY_ADDRESS says so, else start a private local
    Ray; return whether this call started Ray (only then may the search shut it down).

    A Ray session already running in this process (a notebook, a test session) is used as it
    is: shutting Ray down and starting it again in one process can crash it (ray#31145).
    """
    import ray

    if ray.is_initialized():
        log("Ray:           using the Ray session already running in this process")
        return False
    address = cfg.get("ray_address") or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        # "local": never attach to somebody else's Ray on this machine.
        ray.init(address="local", num_cpus=cfg.get("num_cpus"), include_dashboard=False, log_to_driver=False)
    return True


def tune_storage(storage_path: str | None, out: Path) -> str:
    """Where Ray Tune keeps this search's checkpoints and results: ``<storage_path>/<output folder
    name>``, so searches sharing one storage path (a cluster's NFS or S3 prefix) never share an
    experiment folder (each would write, and a resume restore, ``<storage_path>/tune``); without
    ``storage_path``, ``<output folder>/ray``. A URI (``s3://bucket/prefix``) stays a URI: made
    a local path it would become ``<cwd>/s3:/bucket/prefix``."""
    if not storage_path:
        return str(out / "ray")
    root = str(storage_path).rstrip("/")
    if "://" not in root:
        root = str(Path(root).expanduser().resolve())
    return f"{root}/{out.name}"


def _restorable(experiment_path: str) -> bool:
    from ray import tune

    return tune.Tuner.can_restore(experiment_path)  # reads a URI too, unlike Path.exists


def start_search(cfg, out: Path, log=print) -> Session:
    """Everything before ``Tuner.fit``; on resume, the saved state of the earlier start."""
    from search.pareto import check_objective
    from search.tracking import SearchTracker, default_tracking_uri
    from search.tune_callback import MLflowTuneCallback
    from trainables.cli.base_model import prepare
    from trainables.cli.compose import configs_of, data_args
    from trainables.core.metrics import count_flops, count_params
    from trainables.core.surgery import describe_units, select_units
    from trainables.ray_trainable import TrialContext

    state_path = out / STATE_FILE
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    tracking_uri = cfg.mlflow.tracking_uri or state.get("tracking_uri") or default_tracking_uri(out.parent)
    log(f"output folder: {out}")
    log(f"MLflow UI:     {mlflow_ui_command(tracking_uri)}")
    # The runs table's address now, not only at the end: it stays the same for the whole search.
    tracker = SearchTracker(tracking_uri, cfg.mlflow.experiment)
    log(f"then open:     {tracker.ui_url()}")
    if not state:
        OmegaConf.save(cfg, out / "config.yaml", resolve=True)

    base, splits, base_path, meta = prepare(cfg, log=log)  # trained once, here, before any trial
    prune, finetune, measure, _ = configs_of(cfg)
    units = select_units(base, describe_units(base), prune.units)  # what the trials prune (prune.units)
    from trainables.protocol.finetune import steps_per_epoch

    prune_trial, prune_full = trial_prune(cfg, prune, steps_per_epoch(splits, finetune, cfg.train.num_workers))
    candidates, artifacts = state.get("candidates"), []
    if cfg.search.get("blend") and candidates is None:
        candidates, artifacts = blend_candidates(cfg, base, splits, base_path, prune_full, out, log=log)
    if isinstance(candidates, dict):  # a layerwise blend: the criterion learns which units share factors
        from search.blend.layout import criterion_groups

        prune_trial, prune_full = ({**p, "criterion_options": {**p["criterion_options"], **criterion_groups(candidates)}}
                                   for p in (prune_trial, prune_full))
    storage = tune_storage(cfg.storage_path, out)
    ctx = TrialContext(
        model_name=cfg.model.name, model_kwargs=dict(cfg.model.kwargs or {}), num_classes=splits.num_classes,
        input_shape=tuple(splits.input_shape),
        base_state={k: v.clone() for k, v in base.state_dict().items()}, data_args=data_args(cfg),
        prune=prune_trial, finetune=asdict(finetune), measure=asdict(measure), seed=cfg.seed,
        threads=cfg.trial_threads, num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
        storage_path=str(storage), path=cfg.train.path, checkpoint_every_s=float(cfg.get("checkpoint_every_s", 0.0)),
        cost_metric=check_objective(objective_of(cfg))[0],
    )
    parent = tracker.start_search(out.name, OmegaConf.to_container(cfg, resolve=True), run_id=state.get("parent_run_id"))
    restore = state.get("experiment_path") if state else None
    experiment_path = state.get("experiment_path") or f"{storage}/tune"  # a resumed search keeps its own
    state_path.write_text(json.dumps({"tracking_uri": tracking_uri, "parent_run_id": parent,
                                      "experiment_path": experiment_path, "base_model": str(base_path),
                                      "candidates": candidates}, indent=1))
    owns_ray = _init_ray(cfg, log=log)
    callback = MLflowTuneCallback(tracking_uri, cfg.mlflow.experiment, parent)
    return Session(
        ctx=ctx, n_units=len(units), splits=splits, storage=storage, callback=callback,
        tracker=tracker, parent_run_id=parent, restore_path=restore if restore and _restorable(restore) else None,
        base_val_acc=float(meta.get("val_acc", float("nan"))), base_flops=count_flops(base), base_params=count_params(base),
        candidates=candidates, full_prune=prune_full, artifacts=artifacts, owns_ray=owns_ray,
    )
