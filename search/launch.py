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

    check_space(cfg.search, list_criteria())
    for key, value, allowed in (
        ("search.sampler", cfg.search.sampler, ("tpe", "nsga2", "random")),
        ("search.scheduler", cfg.search.scheduler, ("asha", "none")),
        ("train.path", cfg.train.path, ("auto", "fast", "torch_trainer")),
    ):
        if value not in allowed:
            raise ValueError(f"{key}='{value}' is not one of: {', '.join(allowed)}")
    if cfg.search.num_trials < 1 or cfg.search.max_concurrent_trials < 1:
        raise ValueError(f"search.num_trials={cfg.search.num_trials} and search.max_concurrent_trials="
                         f"{cfg.search.max_concurrent_trials} must be >= 1")
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
    return {
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed, multivariate=True),
        "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=seed),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
    }[cfg.search.sampler]()


def _tuner(cfg, ctx, n_units: int, storage: Path, callback, restore: str | None):
    from omegaconf import OmegaConf
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from search.space import define_space
    from trainables.criteria import list_criteria
    from trainables.ray_trainable import trial_fn

    # The trial's Tune-side driver needs almost no CPU on the TorchTrainer path (its workers
    # hold the resources); a whole CPU per driver deadlocked two trials on 2 CPUs.
    fast = ctx.path == "fast" or (ctx.path == "auto" and ctx.num_workers == 1 and not ctx.use_gpu)
    resources = {"cpu": 1} if fast else {"cpu": 0.01}
    trainable = tune.with_resources(tune.with_parameters(trial_fn, ctx=ctx), resources)
    if restore:
        return tune.Tuner.restore(restore, trainable=trainable, resume_unfinished=True, resume_errored=True)
    searcher = OptunaSearch(
        space=define_space(OmegaConf.to_container(cfg.search, resolve=True), n_units, list_criteria()),
        metric=["val_acc", "flops"], mode=["max", "min"], sampler=_sampler(cfg), seed=cfg.search.seed,
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

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    try:
        cfg = load_search_config(argv)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = _output_folder(cfg)
    session = start_search(cfg, out)
    import ray

    try:
        tuner = _tuner(cfg, session.ctx, session.n_units, session.storage, session.callback, session.restore_path)
        results = tuner.fit()
        finish_search(cfg, out, session, results)
    finally:
        ray.shutdown()
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
