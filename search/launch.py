"""``python -m search.launch [key=value ...]``: the distributed criterion search.

Reads the config (``conf/launch.yaml``), trains or loads the base model once, runs a Ray Tune
search with Optuna over criteria, ratio schedules, p, q and the learning rate, logs every
trial to MLflow, and writes ``trials.parquet``, ``pareto.png`` and the Pareto table into the
output folder, whose path is the last line printed.

    python -m search.launch                                   # the embedded default (laptop)
    python -m search.launch search.num_trials=64 search.sampler=nsga2
    python -m search.launch resume=outputs/search/20261122-031500   # continue an interrupted search
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

__all__ = ["main", "load_search_config"]

from search._session import STATE_FILE as _STATE
from search._session import objective_of, retime_settings

SAMPLERS = ("tpe", "nsga2", "cmaes", "random")
TRAIN_PATHS = ("auto", "fast", "torch_trainer")


# Overrides that do not change what a resumed search computes, only where it runs.
RESUME_SAFE = ("num_cpus", "ray_address")


def _resumed_config(folder_arg: str, others: list[str]):
    """The saved config of the search in ``folder_arg``, with only the overrides in ``RESUME_SAFE``."""
    import yaml
    from omegaconf import OmegaConf

    folder = Path(folder_arg).expanduser().resolve()
    if not (folder / _STATE).exists():
        raise ValueError(f"resume must be the output folder of an earlier search (holding {_STATE}), "
                         f"but got {folder_arg}")
    keys = [a.split("=", 1)[0].lstrip("+~") for a in others]
    refused = [k for k in keys if k not in RESUME_SAFE]
    if refused:
        raise ValueError(f"resume={folder_arg} continues the saved search as it was; these overrides would change "
                         f"it: {', '.join(refused)} (allowed with resume: {', '.join(RESUME_SAFE)})")
    cfg = OmegaConf.load(folder / "config.yaml")
    for arg in others:
        key, _, value = arg.partition("=")
        OmegaConf.update(cfg, key.lstrip("+~"), yaml.safe_load(value) if value else None, force_add=True)
    cfg.resume = str(folder)
    return cfg


def check_trial_resources(cfg) -> None:
    """``train.*`` and ``trial_threads``: how each trial runs (shared by the search and the study)."""
    from omegaconf import OmegaConf

    from trainables.protocol.config import require, require_int

    require(cfg.train.path in TRAIN_PATHS, "train.path", f"one of {', '.join(TRAIN_PATHS)}", cfg.train.path)
    for key in ("train.num_workers", "trial_threads"):
        require_int(key, OmegaConf.select(cfg, key), 1)
    require(isinstance(cfg.train.use_gpu, bool), "train.use_gpu", "true or false", cfg.train.use_gpu)


def _check_choices(cfg) -> None:
    from trainables.protocol.config import require, require_int

    for key, value, allowed in (
        ("search.sampler", cfg.search.sampler, SAMPLERS),
        ("search.scheduler", cfg.search.scheduler, ("asha", "none")),
        ("search.fidelity", cfg.search.get("fidelity", "full"), ("full", "proxy")),
    ):
        require(value in allowed, key, f"one of {', '.join(allowed)}", value)
    for key, low in (("num_trials", 1), ("max_concurrent_trials", 1), ("max_failures", 0),
                     ("finetune_front", 0), ("population_size", 2)):
        value = cfg.search.get(key)
        if key in ("finetune_front", "population_size") and value is None:
            continue
        require_int(f"search.{key}", value, low)
    check_trial_resources(cfg)
    objective_of(cfg)
    if cfg.search.scheduler == "asha":
        require_int("search.asha.grace_period", cfg.search.asha.grace_period, 1)
        require_int("search.asha.reduction_factor", cfg.search.asha.reduction_factor, 2)
    retime_settings(cfg)  # search.retime.*: refused here, before any training
    every = cfg.get("checkpoint_every_s", 0.0)
    require(isinstance(every, (int, float)) and not isinstance(every, bool) and every >= 0, "checkpoint_every_s",
            "a number of seconds >= 0", every)
    if cfg.search.sampler == "cmaes":
        import importlib.util

        if importlib.util.find_spec("cmaes") is None:
            raise ValueError("search.sampler='cmaes' needs the cmaes package: pip install cmaes")


def load_search_config(argv: list[str]):
    """Compose ``conf/launch.yaml`` with overrides and check it all, before any work; a resumed
    search reuses its saved config (see ``RESUME_SAFE`` for the overrides it still accepts)."""
    from trainables.cli.compose import compose

    resume = next((a.split("=", 1)[1] for a in argv if a.startswith("resume=")), None)
    if resume:
        return _resumed_config(resume, [a for a in argv if not a.startswith("resume=")])
    cfg = compose("launch", argv)  # keys, unread settings and data settings: refused before torch loads
    from omegaconf import OmegaConf

    from search._session import trial_prune
    from search.space import check_global_choice, check_space
    from trainables.cli.compose import check_config, configs_of
    from trainables.criteria import list_criteria

    check_config(cfg)
    _narrow_criteria(cfg)
    check_space(OmegaConf.to_container(cfg.search, resolve=True), list_criteria())
    _check_choices(cfg)
    trial, _ = trial_prune(cfg, configs_of(cfg)[0])  # prune_overrides and the proxy settings are valid
    check_global_choice(OmegaConf.to_container(cfg.search, resolve=True), trial)
    return cfg


def _narrow_criteria(cfg) -> None:
    """Keep only the criteria that apply to the run's task in ``search.criteria`` (a detector has
    no class logits for taylor or car), saying which were left out; none left is an error."""
    from search.space import GREEDY_CAR
    from trainables.cli.compose import config_task
    from trainables.criteria import list_criteria

    task = config_task(cfg)
    if task.criteria is None:
        return
    # The blended search scores its candidate pool with classification's loss and plans FLOPs
    # targets; neither is wired for the dense tasks yet.
    if cfg.search.get("blend"):
        raise ValueError(f"search must not be blended for {task.name} (the blended search is classification-only), "
                         "but got search=blended")
    listed = list(cfg.search.criteria or [c for c in list_criteria() if c != "blended"])
    kept = [c for c in listed if c in task.criteria and c != GREEDY_CAR]
    dropped = [c for c in listed if c not in kept]
    if not kept:
        raise ValueError(f"search.criteria must include a criterion that applies to {task.name} "
                         f"({', '.join(task.criteria)}), but got {listed}")
    if dropped:
        print(f"search.criteria: {', '.join(dropped)} do not apply to {task.name}; searching {', '.join(kept)}",
              file=sys.stderr)
        cfg.search.criteria = kept


# bench/RESULTS.md, "search end to end" (2 CPU cores, empty cache): the embedded default search,
# 16 trials 2 at a time, took 5 min 23 s, of which about 2.5 min trained the base model and 136 s
# ran the trials.
_DEFAULT_WALL_S, _DEFAULT_BASE_S, _DEFAULT_TRIALS_S, _DEFAULT_TRIALS = 323, 150, 136, 16


def duration_hint(cfg) -> str:
    """One line: how long the default search took where it was measured, and this search's
    size beside it (a trial's cost depends on the model, data and budgets, so no forecast)."""
    per_trial = _DEFAULT_TRIALS_S / _DEFAULT_TRIALS * 2  # each of the 2 concurrent trials
    return (f"duration: the default search ({_DEFAULT_TRIALS} trials, 2 at a time, small_cnn on Fashion-MNIST) takes "
            f"about {_DEFAULT_WALL_S / 60:.1f} min on 2 CPU cores from an empty cache ({_DEFAULT_BASE_S / 60:.1f} min "
            f"of it training the base model, once; about {per_trial:.0f} s per trial); this one runs "
            f"{cfg.search.num_trials} trials, {cfg.search.max_concurrent_trials} at a time")


def _output_folder(cfg) -> Path:
    if cfg.get("resume"):
        return Path(cfg.resume)
    name = cfg.name or time.strftime("%Y%m%d-%H%M%S")
    folder = Path(cfg.output_root).expanduser().resolve() / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _sampler(cfg):
    import warnings

    import optuna

    seed = cfg.search.seed
    population = cfg.search.get("population_size") or 50
    samplers = {
        # group=True: the space is conditional (ratio_low/high only for differential, ratio_<i> only
        # for per_layer, weights only for blended); grouped TPE models each branch's parameters jointly
        # instead of falling back to independent sampling for the ones not always present.
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True),
        "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=seed, population_size=population),
        # CMA-ES is single-objective: the search then maximises val_acc alone (see _tuner).
        "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=seed, popsize=cfg.search.get("population_size")),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
    }
    with warnings.catch_warnings():
        # Optuna flags multivariate/group TPE as experimental on every construction; the choice is
        # deliberate and pinned in constraints.txt, so the warning would only be noise in the output.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return samplers[cfg.search.sampler]()


def _trainable(fn, ctx):
    from ray import tune

    from trainables.ray_trainable import uses_fast_path

    # The trial's Tune-side driver needs almost no CPU on the TorchTrainer path (its workers
    # hold the resources); a whole CPU per driver deadlocked two trials on 2 CPUs.
    resources = {"cpu": 1} if uses_fast_path(ctx) else {"cpu": 0.01}
    return tune.with_resources(tune.with_parameters(fn, ctx=ctx), resources)


def _finetune_tuner(cfg, session):
    """A function ``configs -> ResultGrid`` running each config at full fidelity as a Tune
    trial (same MLflow parent, checkpoints under ``<storage>/tune_finetune``)."""
    from dataclasses import replace

    from ray import tune
    from ray.tune import FailureConfig, RunConfig

    from trainables.ray_trainable import front_trial_fn

    ctx = replace(session.ctx, prune=session.full_prune)

    def run(configs: list[dict]):
        return tune.Tuner(
            _trainable(front_trial_fn, ctx),
            param_space={"front_config": tune.grid_search(configs)},
            tune_config=tune.TuneConfig(max_concurrent_trials=cfg.search.max_concurrent_trials, reuse_actors=True),
            run_config=RunConfig(name="tune_finetune", storage_path=str(session.storage), callbacks=[session.callback],
                                 failure_config=FailureConfig(max_failures=cfg.search.max_failures), verbose=0),
        ).fit()

    return run


def _tuner(cfg, ctx, n_units: int, storage: Path, callback, restore: str | None, candidates: list[str] | None = None):
    from omegaconf import OmegaConf
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from search.searcher import FinishedOnlyOptunaSearch
    from search.space import define_space
    from search.tune_callback import ProgressCallback
    from trainables.criteria import list_criteria
    from trainables.ray_trainable import trial_fn

    trainable = _trainable(trial_fn, ctx)
    if restore:
        return tune.Tuner.restore(restore, trainable=trainable, resume_unfinished=True, resume_errored=True)
    single = cfg.search.sampler == "cmaes"
    # `cost`: every result carries the chosen cost (TrialContext.cost_metric); for latency, the
    # trial's own timing (taken beside other trials), the only one there is while the search runs;
    # the front is built on the driver's serial re-timing.
    searcher = FinishedOnlyOptunaSearch(
        space=define_space(OmegaConf.to_container(cfg.search, resolve=True), n_units, list_criteria(), candidates),
        metric="val_acc" if single else ["val_acc", "cost"], mode="max" if single else ["max", "min"],
        sampler=_sampler(cfg),  # seeded itself: OptunaSearch ignores its own seed for a built sampler
    )
    scheduler = None
    if cfg.search.scheduler == "asha":
        # Rungs at fine-tuning optimiser steps (the protocol's `step`), ranked on recovery points
        # only (evaluations after fine-tuning, never a damage point right after a cut); see
        # trainables.ray_trainable.with_recovery_acc.
        scheduler = ASHAScheduler(time_attr="step", metric="recovery_acc", mode="max",
                                  grace_period=cfg.search.asha.grace_period,
                                  reduction_factor=cfg.search.asha.reduction_factor, max_t=10**9)
    from ray.tune import FailureConfig, RunConfig

    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher, scheduler=scheduler, num_samples=cfg.search.num_trials,
            max_concurrent_trials=cfg.search.max_concurrent_trials, reuse_actors=True,
        ),
        run_config=RunConfig(
            name="tune", storage_path=str(storage), callbacks=[callback, ProgressCallback(cfg.search.num_trials)],
            failure_config=FailureConfig(max_failures=cfg.search.max_failures), verbose=0,
        ),
    )


def main(argv: list[str] | None = None) -> int:
    from search._session import start_search
    from search.results import finish_search
    from trainables.cli import cli_config

    cfg, code = cli_config(__doc__, argv, load_search_config, config_name="launch")
    if cfg is None:
        return code
    print(duration_hint(cfg))
    out = _output_folder(cfg)
    session = start_search(cfg, out)
    import ray

    try:
        tuner = _tuner(cfg, session.ctx, session.n_units, session.storage, session.callback, session.restore_path,
                       session.candidates)
        results = tuner.fit()
        finetune = None
        if cfg.search.get("fidelity", "full") == "proxy" and cfg.search.get("finetune_front", 0) > 0:
            finetune = _finetune_tuner(cfg, session)
        finish_search(cfg, out, session, results, finetune=finetune)
    finally:
        if session.owns_ray:
            ray.shutdown()
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
