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

SAMPLERS = ("tpe", "nsga2", "cmaes", "random")


def load_search_config(argv: list[str]):
    """Compose ``conf/launch.yaml`` with overrides; a resumed search reuses its saved config."""
    from omegaconf import OmegaConf

    from trainables.run import check_config, compose

    resume = next((a.split("=", 1)[1] for a in argv if a.startswith("resume=")), None)
    if resume:
        folder = Path(resume).expanduser().resolve()
        if not (folder / _STATE).exists():
            raise ValueError(f"resume={resume}: no {_STATE} in {folder}; give the output folder of an earlier search")
        cfg = OmegaConf.load(folder / "config.yaml")
        cfg.resume = str(folder)
        return cfg
    cfg = compose("launch", argv)
    check_config(cfg)
    from search.space import check_space
    from trainables.criteria import list_criteria

    check_space(OmegaConf.to_container(cfg.search, resolve=True), list_criteria())
    for key, value, allowed in (
        ("search.sampler", cfg.search.sampler, SAMPLERS),
        ("search.scheduler", cfg.search.scheduler, ("asha", "none")),
        ("search.fidelity", cfg.search.get("fidelity", "full"), ("full", "proxy")),
        ("train.path", cfg.train.path, ("auto", "fast", "torch_trainer")),
    ):
        if value not in allowed:
            raise ValueError(f"{key}='{value}' is not one of: {', '.join(allowed)}")
    if cfg.search.num_trials < 1 or cfg.search.max_concurrent_trials < 1:
        raise ValueError(f"search.num_trials={cfg.search.num_trials} and search.max_concurrent_trials="
                         f"{cfg.search.max_concurrent_trials} must be >= 1")
    for key, low in (("finetune_front", 0), ("population_size", 2)):
        value = cfg.search.get(key)
        if value is not None and (not isinstance(value, int) or value < low):
            raise ValueError(f"search.{key}={value!r} must be an integer >= {low}")
    if cfg.search.sampler == "cmaes":
        import importlib.util

        if importlib.util.find_spec("cmaes") is None:
            raise ValueError("search.sampler='cmaes' needs the cmaes package: pip install cmaes")
    from search._session import trial_prune
    from trainables.run import configs_of

    trial_prune(cfg, configs_of(cfg)[0])  # prune_overrides and the proxy settings are valid
    return cfg


def _output_folder(cfg) -> Path:
    if cfg.get("resume"):
        return Path(cfg.resume)
    name = cfg.name or time.strftime("%Y%m%d-%H%M%S")
    folder = Path(cfg.output_root).expanduser().resolve() / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _sampler(cfg):
    import optuna

    seed = cfg.search.seed
    population = cfg.search.get("population_size") or 50
    return {
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed, multivariate=True),
        "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=seed, population_size=population),
        # CMA-ES is single-objective: the search then maximises val_acc alone (see _tuner).
        "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=seed, popsize=cfg.search.get("population_size")),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
    }[cfg.search.sampler]()


def _trainable(fn, ctx):
    from ray import tune

    # The trial's Tune-side driver needs almost no CPU on the TorchTrainer path (its workers
    # hold the resources); a whole CPU per driver deadlocked two trials on 2 CPUs.
    fast = ctx.path == "fast" or (ctx.path == "auto" and ctx.num_workers == 1 and not ctx.use_gpu)
    return tune.with_resources(tune.with_parameters(fn, ctx=ctx), {"cpu": 1} if fast else {"cpu": 0.01})


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
    from ray.tune.search.optuna import OptunaSearch

    from search.space import define_space
    from trainables.criteria import list_criteria
    from trainables.ray_trainable import trial_fn

    trainable = _trainable(trial_fn, ctx)
    if restore:
        return tune.Tuner.restore(restore, trainable=trainable, resume_unfinished=True, resume_errored=True)
    single = cfg.search.sampler == "cmaes"
    searcher = OptunaSearch(
        space=define_space(OmegaConf.to_container(cfg.search, resolve=True), n_units, list_criteria(), candidates),
        metric="val_acc" if single else ["val_acc", "flops"], mode="max" if single else ["max", "min"],
        sampler=_sampler(cfg),  # seeded itself: OptunaSearch ignores its own seed for a built sampler
    )
    scheduler = None
    if cfg.search.scheduler == "asha":
        # ASHA needs one scalar: validation accuracy, per evaluation (training_iteration).
        scheduler = ASHAScheduler(time_attr="training_iteration", grace_period=cfg.search.asha.grace_period,
                                  reduction_factor=cfg.search.asha.reduction_factor, max_t=10_000)
    from ray.tune import FailureConfig, RunConfig

    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher, scheduler=scheduler, num_samples=cfg.search.num_trials,
            max_concurrent_trials=cfg.search.max_concurrent_trials, metric="val_acc", mode="max",
            reuse_actors=True,
        ),
        run_config=RunConfig(
            name="tune", storage_path=str(storage), callbacks=[callback],
            failure_config=FailureConfig(max_failures=cfg.search.max_failures), verbose=0,
        ),
    )


def main(argv: list[str] | None = None) -> int:
    from search._session import start_search
    from search.results import finish_search
    from trainables.run import cli_config

    cfg, code = cli_config(__doc__, argv, load_search_config)
    if cfg is None:
        return code
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
