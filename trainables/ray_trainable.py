"""The Ray adapter: the only module of ``trainables/`` that imports ray.

One per-worker function, ``train_loop_per_worker``, runs the protocol for one trial. It is
launched in one of two ways from the Tune function trainable ``trial_fn``:

- the TorchTrainer path (GPUs and/or several workers): a Ray Train ``TorchTrainer`` with
  ``ScalingConfig(num_workers, use_gpu)``, DDP fine-tuning, results forwarded to Tune by
  ``TuneReportCallback``. Launching it costs ~15 s per trial on 2 CPUs.
- the fast path (one CPU worker): the very same function runs inside the trial process and
  reports through ``tune.report``; ~1-3 s of overhead per trial.

Checkpoints are written at the end of a protocol stage (one per pruned unit, then the final
fine-tuning) when ``checkpoint_every_s`` have passed since the last one, and always at the end:
the pruned model's weights, the protocol state and the record so far.
A restarted trial rebuilds the pruned model from the base weights and the prune log, and
continues after the last finished stage.
"""

from __future__ import annotations

import functools
import json
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from trainables.core.models import build_model
from trainables.criteria.blended import with_factors
from trainables.protocol.config import FinetuneConfig, MeasureConfig, PruneConfig
from trainables.protocol.stages import run_protocol

__all__ = [
    "RECOVERY_PHASES", "TrialContext", "front_trial_fn", "load_trial_model", "read_trial_record", "train_loop_per_worker", "trial_configs",
    "trial_fn",
    "checkpoint_progress", "last_recovery_acc", "newest_checkpoint", "trial_base_model", "uses_fast_path", "with_cost",
    "with_recovery_acc",
]

_STATE_FILE = "state.pt"
_RECORD_FILE = "record.json"
# How far the protocol had got when the checkpoint was taken, and the sizes of the files beside
# it: a restored trial compares checkpoints on storage by it without loading their weights, and a
# checkpoint whose upload was cut short (sizes differ) is never chosen.
_PROGRESS_FILE = "progress.json"


@dataclass
class TrialContext:
    """What every trial shares: the base model, the data, the fixed protocol settings."""

    model_name: str
    model_kwargs: dict
    num_classes: int
    base_state: dict  # the base model's state_dict: every trial starts from these weights
    data_args: dict  # keyword arguments of data.get_data
    prune: dict  # PruneConfig fields the search does not set
    finetune: dict  # FinetuneConfig fields the search does not set
    measure: dict  # MeasureConfig fields
    seed: int = 0
    threads: int | None = 1  # torch threads per worker: concurrent trials must not oversubscribe cores
    num_workers: int = 1
    use_gpu: bool = False
    storage_path: str | None = None  # Ray Train run storage (TorchTrainer path)
    path: str = "auto"  # auto | fast | torch_trainer (auto: TorchTrainer only for GPUs or several workers)
    evaluate_test: bool = False  # read the test split at the end of each trial: a study, never a search
    input_shape: tuple[int, int, int] | None = None  # (C, H, W) of the data; None: the model's registered one
    pretrain: dict | None = None  # the base model's PretrainConfig fields: prune.method=scratch trains with them
    reuse_data: bool = True  # keep the loaded data in the worker for its next trial (False: load per trial)
    # a stage's checkpoint is written only if this many seconds passed since the last one (the
    # final one always is); 0: after every stage. A restored trial redoes what was not saved.
    checkpoint_every_s: float = 0.0
    cost_metric: str = "flops"  # the searched cost (flops | params | latency_ms): every result carries it as `cost`


def uses_fast_path(ctx: TrialContext) -> bool:
    """Whether a trial runs the protocol in its own process (one CPU worker) rather than in a
    Ray Train ``TorchTrainer``; the one place this is decided (resources follow from it too)."""
    return ctx.path == "fast" or (ctx.path == "auto" and ctx.num_workers == 1 and not ctx.use_gpu)


# PruneConfig fields a trial config may set; a study cell also sets method and target_flops_reduction
# (its `seed` and `fraction` are read by train_loop_per_worker).
_SEARCHED = {"criterion", "schedule", "ratio", "ratio_low", "ratio_high", "p", "q", "method", "target_flops_reduction"}


def trial_configs(ctx: TrialContext, config: dict) -> tuple[PruneConfig, FinetuneConfig, MeasureConfig]:
    """Merge a sampled trial config (flat: criterion, ratio_0..ratio_k, weight_<candidate>, p, q,
    lr, ...) into the fixed ones."""
    prune = {**ctx.prune, **{k: v for k, v in config.items() if k in _SEARCHED}}
    ratios = [config[f"ratio_{i}"] for i in range(len(config)) if f"ratio_{i}" in config]
    if ratios:
        prune.update(schedule="per_layer", ratios=ratios)
    weights = {k[len("weight_"):]: float(v) for k, v in config.items() if k.startswith("weight_")}
    if weights:  # the blended criterion's calibration factors (weight_g<i>_<c>: group i of a layerwise blend)
        prune["criterion_options"] = with_factors(prune.get("criterion_options", {}), weights)
    finetune = {**ctx.finetune, **({"lr": config["lr"]} if "lr" in config else {})}
    known = {f.name for f in fields(PruneConfig)}
    return PruneConfig(**{k: v for k, v in prune.items() if k in known}), FinetuneConfig(**finetune), MeasureConfig(**ctx.measure)


def trial_base_model(ctx: TrialContext) -> torch.nn.Module:
    """The unpruned base model every trial of ``ctx`` starts from."""
    model = build_model(ctx.model_name, num_classes=ctx.num_classes, **ctx.model_kwargs)
    model.load_state_dict(ctx.base_state)
    if ctx.input_shape is not None:  # the data's image size, as the driver's base model has it
        model.input_shape = tuple(ctx.input_shape)
    return model


def load_trial_model(ctx: TrialContext, checkpoint_dir: str | Path) -> tuple[torch.nn.Module, dict]:
    """The pruned, fine-tuned model of a trial checkpoint and its record (or state)."""
    state = torch.load(Path(checkpoint_dir) / _STATE_FILE, map_location="cpu", weights_only=True)
    model = trial_base_model(ctx)
    from trainables.core.surgery import prune_layer

    for rec in state["prune_log"]:
        prune_layer(model, rec["unit"], rec["keep_idxs"])
    model.load_state_dict(state["model_state"])
    record_path = Path(checkpoint_dir) / _RECORD_FILE
    return model, json.loads(record_path.read_text()) if record_path.exists() else state


def read_trial_record(checkpoint) -> dict | None:
    """The run record a trial's Tune checkpoint holds (written with its final result), or None
    for a checkpoint from before the protocol ended (or no checkpoint)."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        path = Path(d) / _RECORD_FILE
        return json.loads(path.read_text()) if path.exists() else None


# Curve phases measured after fine-tuning (not right after a cut), plus the unpruned start: the
# only points an early-stopping scheduler may compare, at equal optimiser-step counts.
RECOVERY_PHASES = frozenset({"base", "recovery", "final_finetune", "final", "control", "scratch", "init"})


def last_recovery_acc(curve: list[dict]) -> float | None:
    """The accuracy of the latest curve point in ``RECOVERY_PHASES`` (None: there is none)."""
    return next((p["val_acc"] for p in reversed(curve) if p.get("phase") in RECOVERY_PHASES), None)


def with_recovery_acc(metrics: dict, carried: float | None = None) -> dict:
    """``metrics`` plus ``recovery_acc``: its ``val_acc`` if the point was measured after
    fine-tuning, else ``carried`` (the latest such accuracy). ASHA (``search.scheduler=asha``)
    ranks trials on it at rungs of ``step``, so a damage point, taken right after a cut, never
    meets a recovered one at a rung. Every result carries the key because Tune requires a
    scheduler's metric in each result."""
    if metrics.get("phase") in RECOVERY_PHASES and metrics.get("val_acc") is not None:
        return {**metrics, "recovery_acc": metrics["val_acc"]}
    return metrics if carried is None else {**metrics, "recovery_acc": carried}


def with_cost(metrics: dict, cost_metric: str, carried: float = float("nan")) -> dict:
    """``metrics`` plus ``cost``: the searched cost (``cost_metric``) if this result has it, else
    ``carried``. Tune wants a searcher's metrics in every result, but params and latency are
    measured only at the end; Optuna hears only a finished trial's (search.searcher), whose last
    result has the final value."""
    return {**metrics, "cost": metrics.get(cost_metric, carried)}


class _Reporter:
    """Adapts the protocol's ``report``/``checkpoint`` callbacks to Tune or Train reports.

    The protocol calls ``checkpoint(state)`` right after a stage's last evaluation; holding
    back each report until the next one arrives lets that evaluation carry the checkpoint,
    so every evaluation is exactly one Tune result.
    """

    def __init__(self, report_fn, checkpoint_cls, write_checkpoints: bool, recovery_acc: float | None = None,
                 every_s: float = 0.0, cost_metric: str = "flops"):
        self.report_fn, self.checkpoint_cls, self.write = report_fn, checkpoint_cls, write_checkpoints
        self.every_s, self.last_write = every_s, time.monotonic()
        self.pending: dict | None = None
        self.last_state: dict = {}
        self.recovery_acc = recovery_acc  # carried forward between recovery points (see with_recovery_acc)
        self.checkpoint_s, self.n_checkpoints = 0.0, 0  # what writing checkpoints cost this trial
        self.cost_metric, self.cost = cost_metric, float("nan")  # carried forward (see with_cost)

    def report(self, metrics: dict) -> None:
        self.flush()
        self.pending = with_recovery_acc({k: v for k, v in metrics.items() if v is not None}, self.recovery_acc)
        self.recovery_acc = self.pending.get("recovery_acc", self.recovery_acc)
        self.pending = with_cost(self.pending, self.cost_metric, self.cost)
        self.cost = self.pending["cost"]

    def checkpoint(self, state: dict, record: dict | None = None) -> None:
        metrics, self.pending = self.pending or {}, None
        self.last_state = state
        if not metrics:
            # A stage that evaluated nothing (the final stage with q=0): no result to attach the
            # checkpoint to; a trial restored before the next one just redoes that empty stage.
            return
        final = record is not None
        if not self.write or (not final and time.monotonic() - self.last_write < self.every_s):
            # non-zero DDP ranks report metrics only; so does a stage too soon after the last save
            self.report_fn(metrics)
            return
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(state, Path(tmp) / _STATE_FILE)
            if record is not None:
                (Path(tmp) / _RECORD_FILE).write_text(json.dumps(record))
            sizes = {f.name: f.stat().st_size for f in Path(tmp).iterdir()}
            progress = {**checkpoint_progress(state, done=final), "sizes": sizes}
            (Path(tmp) / _PROGRESS_FILE).write_text(json.dumps(progress))
            self.report_fn(metrics, checkpoint=self.checkpoint_cls.from_directory(tmp))
        self.checkpoint_s += time.perf_counter() - t0
        self.n_checkpoints += 1
        self.last_write = time.monotonic()

    def flush(self) -> None:
        if self.pending is not None:
            self.report_fn(self.pending)
            self.pending = None


def train_loop_per_worker(config: dict) -> dict:
    """Run one trial's protocol in this worker; the same function serves both paths."""
    ctx: TrialContext = config["ctx"]
    trial = config["trial"]
    if ctx.threads:
        torch.set_num_threads(ctx.threads)
    in_train = config.get("path") == "torch_trainer"
    if in_train:
        import ray.train as api

        rank, world = api.get_context().get_world_rank(), api.get_context().get_world_size()
        checkpoint_cls = api.Checkpoint
    else:
        import ray.tune as api

        rank, world = 0, 1
        checkpoint_cls = api.Checkpoint
    # A study cell may set its own fine-tuning data fraction and seed (scoring, fine-tuning, `random`).
    t0 = time.perf_counter()
    if not ctx.reuse_data:
        _data.cache_clear()
    splits = _data(json.dumps({**ctx.data_args, **({"fraction": trial["fraction"]} if "fraction" in trial else {})},
                              sort_keys=True, default=str))
    data_s = time.perf_counter() - t0
    seed = int(trial.get("seed", ctx.seed))
    prune, finetune, measure = trial_configs(ctx, trial)
    model = trial_base_model(ctx)
    device = torch.device("cuda", torch.cuda.current_device()) if ctx.use_gpu and torch.cuda.is_available() else torch.device("cpu")
    model.to(device)
    resume = None
    loaded = api.get_checkpoint()
    if not in_train:  # Train runs keep their own checkpoint bookkeeping (the TorchTrainer path)
        loaded = newest_checkpoint(loaded, _trial_storage())
    if loaded is not None:
        with loaded.as_directory() as d:
            resume = torch.load(Path(d) / _STATE_FILE, map_location="cpu", weights_only=True)
            record_file = Path(d) / _RECORD_FILE
            if resume.get("done") and record_file.exists():
                # Killed after its final checkpoint: the protocol is finished, report it again.
                record = json.loads(record_file.read_text())
                final = with_recovery_acc({k: v for k, v in _final_metrics(record).items() if v is not None})
                final["resumed_stage"] = int(resume.get("stage", 0))
                _on_this_node(api.report)(with_cost(final, ctx.cost_metric))
                return {k: record[k] for k in ("final_val_acc", "flops_after", "params_after", "wall_s")}
    # Every result says which protocol stage this run of the trial continued from (0: its
    # start), so a restart from a checkpoint can be told from one from scratch (bench/cluster_faults.py).
    resumed = {"resumed_stage": int(resume.get("stage", 0)) if resume else 0}
    report_fn = _on_this_node(api.report)
    reporter = _Reporter(lambda metrics, **kw: report_fn({**metrics, **resumed}, **kw), checkpoint_cls,
                         write_checkpoints=rank == 0,
                         recovery_acc=last_recovery_acc(resume.get("curve", [])) if resume else None,
                         every_s=ctx.checkpoint_every_s, cost_metric=ctx.cost_metric)
    record = run_protocol(
        model, splits, prune, finetune, measure=measure, seed=seed, report=reporter.report,
        checkpoint=reporter.checkpoint, resume=resume, evaluate_test=ctx.evaluate_test,
        config={"trial": trial, "prune": asdict(prune), "finetune": asdict(finetune)},
        shard=(rank, world), wrap_ddp=world > 1, **_scratch_args(ctx),
        q_points=trial.get("q_points") or (),  # a study's shorter budgets (study.continue_budgets)
    )
    final = dict(reporter.pending or {})
    reporter.pending = None
    # data_s and checkpoint_s: the framework's share of the trial (bench/trial_overhead.py)
    final.update(trial_done=True, wall_s=record["wall_s"], params=record["params_after"], data_s=data_s,
                 checkpoint_s=reporter.checkpoint_s, n_checkpoints=reporter.n_checkpoints)
    final = with_cost(final, ctx.cost_metric)  # params joined only now
    # The final result carries the last checkpoint: the finished protocol state, the pruned
    # weights and the full record; a trial restored from it only reports it again.
    state = {**reporter.last_state, "done": True, "prune_log": record["prune_log"],
             "model_state": {k: v.cpu() for k, v in model.state_dict().items()}}
    reporter.pending = final
    reporter.checkpoint(state, record={**record, "curve": record["curve"]})
    return {k: record[k] for k in ("final_val_acc", "flops_after", "params_after", "wall_s")}


def checkpoint_progress(state: dict, done: bool = False) -> dict:
    """How far a protocol state had got: finished or not, stages done, optimiser steps taken."""
    return {"done": bool(done or state.get("done")), "stage": int(state.get("stage", 0)),
            "step": int(state.get("step", 0))}


def _progress_key(progress: dict) -> tuple[bool, int, int]:
    return bool(progress.get("done")), int(progress.get("stage", 0)), int(progress.get("step", 0))


def _read_progress(fs, path: str) -> dict | None:
    """A checkpoint folder's progress on ``fs`` (a pyarrow filesystem), or None when the folder
    is not a complete checkpoint of ours: no progress file, or a file missing or of another
    size than when it was written (an upload cut short by a kill)."""
    from pyarrow.fs import FileType

    try:
        with fs.open_input_stream(f"{path}/{_PROGRESS_FILE}") as f:
            progress = json.loads(f.read().decode())
        for name, size in progress.get("sizes", {}).items():
            info = fs.get_file_info(f"{path}/{name}")
            if info.type != FileType.File or info.size != size:
                return None
    except (OSError, ValueError):
        return None
    return progress


def newest_checkpoint(known, storage: tuple | None):
    """The checkpoint a (re)started trial continues from: the furthest-advanced complete one of
    ``known`` (what Tune restored, possibly None) and those in the trial's folder on storage.

    Why look beyond ``known``: after a driver crash Tune restores each trial from the newest
    checkpoint the experiment state it last synced knows, and that state is uploaded at most
    every ``SyncConfig.sync_period`` (300 s by default), so later stage checkpoints already on
    storage would be redone from an older one, or from scratch. Checkpoints are compared by
    protocol progress, not folder number: a trial restored from checkpoint j writes its next one
    into folder j+1 again, over an older stage's. ``storage`` is ``(pyarrow filesystem, trial
    folder)``; None keeps ``known``."""
    if storage is None:
        return known
    from pyarrow.fs import FileSelector, FileType
    from ray.tune import Checkpoint

    fs, trial_path = storage
    best, best_key = known, (False, -1, -1)
    if known is not None:
        progress = _read_progress(known.filesystem, known.path)
        # a checkpoint from before progress files (or not readable): keep it unless storage has a newer one
        best_key = _progress_key(progress) if progress else (False, 0, 0)
    try:
        infos = fs.get_file_info(FileSelector(trial_path, allow_not_found=True))
    except OSError:
        return known
    for info in sorted(infos, key=lambda i: i.path):
        if info.type != FileType.Directory or not info.base_name.startswith("checkpoint_"):
            continue
        progress = _read_progress(fs, info.path)
        if progress is not None and _progress_key(progress) > best_key:
            best, best_key = Checkpoint(info.path, filesystem=fs), _progress_key(progress)
    return best


def _trial_storage() -> tuple | None:
    """``(filesystem, trial folder)`` of this Tune trial on its storage, or None if not known.

    Ray exposes it only through a developer API (``TuneContext.get_storage``, documented to
    change without notice), hence the guard: without it a restored trial keeps what Tune
    restored, as before."""
    try:
        import ray.tune

        storage = ray.tune.get_context().get_storage()
        return storage.storage_filesystem, storage.trial_fs_path
    except Exception:  # noqa: BLE001 - any failure of a private API means "not known"
        return None


@functools.lru_cache(maxsize=1)
def _data(args_json: str):
    """``data.get_data`` once per worker process for the same arguments: Tune reuses a trial's
    actor for the next trial (``reuse_actors=True``), so a search loads and normalises its data
    once per concurrent slot instead of once per trial (1-5 s each on 2 cores). One entry: a
    study whose cells change the data fraction keeps only the latest in memory. The tensors are
    read, never written, by the protocol."""
    from data import get_data

    return get_data(**json.loads(args_json))


def _on_this_node(report_fn):
    """``report_fn`` adding ``node_id``, the Ray node this worker runs on, to every result:
    trials.parquet records where each trial ran (a trial retried elsewhere: where it ended)."""
    import ray

    node = {"node_id": ray.get_runtime_context().get_node_id()}
    return lambda metrics, **kwargs: report_fn({**metrics, **node}, **kwargs)


def _scratch_args(ctx: TrialContext) -> dict:
    """``run_protocol``'s pretraining recipe for ``prune.method=scratch`` (when the context has one)."""
    if ctx.pretrain is None:
        return {}
    from trainables.cli.base_model import train_base_model
    from trainables.protocol.config import PretrainConfig

    return {"pretrain": PretrainConfig(**ctx.pretrain), "pretrainer": train_base_model}


def _final_metrics(record: dict) -> dict:
    last = record["curve"][-1]
    return {"step": last["step"], "epoch": last["epoch"], "phase": "final", "val_acc": record["final_val_acc"],
            "flops": record["flops_after"], "params": record["params_after"], "latency_ms": record["latency_ms_after"],
            "flops_before": record["flops_before"], "wall_s": record["wall_s"], "trial_done": True}


def trial_fn(config: dict, ctx: TrialContext) -> None:
    """The Tune function trainable: fast path in-process, or a TorchTrainer per trial.

    Returns nothing: Tune would take a returned dict for one more result.
    """
    payload = {"ctx": ctx, "trial": config}
    if uses_fast_path(ctx):
        train_loop_per_worker({**payload, "path": "fast"})
        return
    import ray.tune
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = ray.tune.get_context().get_trial_id()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={**payload, "path": "torch_trainer"},
        scaling_config=ScalingConfig(num_workers=ctx.num_workers, use_gpu=ctx.use_gpu),
        # Named after the Tune trial, so a restored trial finds its Train run and checkpoints again.
        run_config=RunConfig(name=f"train-{trial_id}", storage_path=ctx.storage_path, callbacks=[TuneReportCallback()]),
    )
    trainer.fit()


def front_trial_fn(config: dict, ctx: TrialContext) -> None:
    """Re-runs a searched trial's config (``config["front_config"]``) under ``ctx``: the
    full-fidelity fine-tuning of a proxy search's best trials, one Tune trial each."""
    trial_fn(dict(config["front_config"]), ctx)
