"""Base models: trained once, cached by what determines them, loaded by every run and trial.

The cache key hashes the model, the data that trains it, the training settings and the
weights it starts from (``model.weights``), so changing any of them trains a new base model.
Given weights with ``model.pretrain.epochs=0`` are loaded as they are: no training, no cache.
``prepare(cfg)`` is what the command lines and the search's driver call: the data of a run
config and its (cached) base model. With a class subset (``subset=``) the base model is
trained on all classes by default (``subset_base=all``, Mittal et al.'s class-specific
setting): its cache key does not depend on the subset, so every subset shares one base
model, and only the run's data (scoring, pruning, fine-tuning, evaluation) are the subset's.
``python -m trainables.pretrain`` is the command line in front of it.

Faults lose little: training keeps its state in ``<entry>.partial`` after every epoch and a
killed training resumes from it to the weights an uninterrupted one reaches; a cache entry
torch.load cannot read is moved aside (``<entry>.damaged-<time>``) and trained again; writers
of one entry (two studies sharing a cache) each write their own temporary file, and the first
finished entry is the one everybody loads.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from data import dataset_fingerprint, iterate_batches
from trainables.cli.compose import NO_WEIGHTS_FOR_EPOCHS_0, base_data_args, configs_of, data_args
from trainables.core.models import build_model, check_model_fits, cut_head
from trainables.protocol.config import PretrainConfig
from trainables.protocol.tasks import task_of

__all__ = [
    "DamagedCheckpointError", "base_model_key", "base_model_path", "file_digest", "get_base_model", "load_checkpoint",
    "load_weights", "partial_checkpoint_path", "prepare", "save_checkpoint", "train_base_model",
]


class DamagedCheckpointError(ValueError):
    """A checkpoint file that torch.load cannot read (truncated, or not a checkpoint at all)."""

    reason: str = ""  # torch.load's own first line, when that is what failed

def base_model_key(model: str, model_kwargs: dict, data_key: dict, pretrain: PretrainConfig, seed: int,
                   init: str | None = None, code: str | None = None) -> str:
    """A short hash of everything that determines the base model's weights.

    ``init`` identifies the weights training starts from (``file_digest`` of ``model.weights``);
    ``code`` the source of a user's network (``model_code``), whose name does not say what it
    builds. None, for either, leaves the key as it was before they existed.
    """
    what = {"model": model, "kwargs": model_kwargs, "data": data_key, "pretrain": asdict(pretrain), "seed": seed}
    if init is not None:
        what["init"] = init
    if code is not None:
        what["code"] = code
    blob = json.dumps(what, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def model_code(model: str) -> str | None:
    """The digest of a ``custom:<module>:<callable>`` network's module source (editing the
    network then trains a new base model, as editing a data factory does); None for the
    registry's, torchvision's and timm's networks, whose name and version say what they build."""
    if not model.startswith("custom:"):
        return None
    from data import source_digest

    return source_digest(model.partition(":")[2])


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes: the same weights under another name or path give the same key."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def base_model_path(cache_dir: str | Path, model: str, key: str) -> Path:
    return Path(cache_dir).expanduser() / "base_models" / f"{model}-{key}.pt"


def partial_checkpoint_path(path: Path) -> Path:
    """Where the training of cache entry ``path`` keeps its per-epoch state until the entry is written.

    Not ``*.pt``, so a glob over the cache's entries never mistakes it for a finished base model.
    """
    return path.with_name(path.name + ".partial")


def train_base_model(
    model: nn.Module, splits: Any, pretrain: PretrainConfig, *, seed: int = 0, progress: bool = True, log=print,
    checkpoint: Path | None = None, finished_elsewhere: Callable[[], bool] | None = None,
) -> dict | None:
    """Train ``model`` in place with SGD + one-cycle LR on ``splits.train``; returns a summary.

    ``checkpoint``: a file that keeps the training state after every epoch but the last (model,
    optimizer, LR schedule, RNG state; the data order is a function of seed and epoch) and that
    training resumes from when it exists, reaching the same weights as a run never stopped.
    ``finished_elsewhere``: asked after every epoch; True (another process wrote the base model)
    stops training and returns None, leaving ``model`` half trained.
    """
    if pretrain.epochs < 1:  # epochs=0 means "use the given weights", which is get_base_model's business
        raise ValueError(f"model.pretrain.epochs must be an integer >= 1 to train, but got {pretrain.epochs!r}")
    steps_per_epoch = max(1, len(splits.train) // pretrain.batch_size)
    total = pretrain.epochs * steps_per_epoch
    opt = torch.optim.SGD(
        model.parameters(), lr=pretrain.lr, momentum=pretrain.momentum, weight_decay=pretrain.weight_decay, nesterov=True
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=pretrain.lr, total_steps=total)
    device = next(model.parameters()).device
    task = task_of(model)  # its loss and evaluation (trainables.protocol.tasks)
    shape = {"epochs": pretrain.epochs, "steps_per_epoch": steps_per_epoch, "seed": seed}
    # Fork the RNG of the device trained on too: manual_seed below reseeds every device.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        state = _resume_state(checkpoint, shape, log) if checkpoint is not None else None
        history: list[dict] = []
        first, before = 0, 0.0  # first epoch to run; seconds spent by the runs resumed from
        if state is not None:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["rng"]["cpu"])
            if device.type == "cuda" and state["rng"].get("cuda") is not None:
                torch.cuda.set_rng_state(state["rng"]["cuda"], device)
            history, first = list(state["history"]), int(state["epoch"])
            before = history[-1]["elapsed_s"] if history else 0.0
            log(f"resuming base-model training from epoch {first} of {pretrain.epochs} ({checkpoint})")
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, initial=first * steps_per_epoch, desc="pretrain", unit="step", leave=False)
        t0 = time.perf_counter() - before
        for epoch in range(first, pretrain.epochs):
            model.train()
            # The order depends on (seed, epoch) only, so a resumed epoch sees the same batches.
            for x, y in iterate_batches(splits.train, pretrain.batch_size, shuffle=True, seed=seed * 7_919 + epoch,
                                        drop_last=True, num_workers=splits.num_workers):
                loss = task.loss(model, x.to(device), y.to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(f"epoch {epoch + 1}/{pretrain.epochs} loss={loss.item():.3f}")
            batches = iterate_batches(splits.val, task.eval_batch_size, shuffle=False,
                                      num_workers=splits.num_workers)
            val = task.evaluate(model, batches, classes=splits.eval_classes)["score"]
            history.append({"epoch": epoch + 1, "val_acc": val, "elapsed_s": time.perf_counter() - t0})
            log(f"pretrain epoch {epoch + 1}/{pretrain.epochs}: val_acc={val:.4f} ({time.perf_counter() - t0:.0f}s)")
            if finished_elsewhere is not None and finished_elsewhere():
                if bar is not None:
                    bar.close()
                return None
            # Not after the last epoch: the cache entry written next supersedes it.
            if checkpoint is not None and epoch + 1 < pretrain.epochs:
                rng = {"cpu": torch.get_rng_state(),
                       "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
                _atomic_save({**shape, "epoch": epoch + 1, "model": model.state_dict(), "optimizer": opt.state_dict(),
                              "scheduler": sched.state_dict(), "rng": rng, "history": history}, checkpoint)
    if bar is not None:
        bar.close()
    return {"history": history, "val_acc": history[-1]["val_acc"], "train_s": time.perf_counter() - t0}


def _resume_state(checkpoint: Path, shape: dict, log) -> dict | None:
    """The training state kept in ``checkpoint``, or None to start from zero (none there, or unusable)."""
    if not checkpoint.exists():
        return None
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except FileNotFoundError:  # another writer of the same base model finished and removed it
        return None
    except Exception as err:  # a truncated file fails in many types
        aside = _move_aside(checkpoint)
        log(f"base-model training checkpoint {checkpoint} is damaged ({_first_line(err)}); "
            f"moved it to {aside}, training from epoch 0")
        return None
    if not isinstance(state, dict) or {k: state.get(k) for k in shape} != shape:
        aside = _move_aside(checkpoint)
        log(f"base-model training checkpoint {checkpoint} is for other settings; moved it to {aside}, "
            f"training from epoch 0")
        return None
    return state


def _first_line(err: BaseException) -> str:
    """The error's first sentence: torch.load appends a paragraph of advice to a damaged file's."""
    line = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return line.split(". ", 1)[0].rstrip(".")


def _temp_beside(path: Path) -> Path:
    """A temporary name next to ``path`` that is this writer's alone: host, pid and a random tag,
    so two processes (two studies sharing a cache on shared storage) never write one file."""
    host = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"
    return path.with_name(f"{path.name}.{host}-{os.getpid()}-{secrets.token_hex(4)}.tmp")


def _write_temp(obj: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_beside(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())  # the rename must not outlive the bytes if the machine goes down
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _atomic_save(obj: Any, path: Path) -> None:
    os.replace(_write_temp(obj, path), path)  # atomic: a concurrent reader never sees half a file


def _save_if_absent(obj: Any, path: Path) -> bool:
    """Write ``obj`` to ``path`` unless a file is there already (written by another process
    meanwhile); True if ours is the one at ``path``. Atomic, like ``_atomic_save``."""
    tmp = _write_temp(obj, path)
    try:
        os.link(tmp, path)  # fails if path exists: the first writer wins, and nobody overwrites it
    except FileExistsError:
        return False
    except OSError:  # a file system without hard links: rename instead (the last writer wins)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return True


def _move_aside(path: Path) -> Path:
    """Rename a damaged file so that nothing reads it again, keeping it to look at."""
    aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}")
    try:
        path.rename(aside)
    except FileNotFoundError:  # another process moved it first
        pass
    return aside


def _remove_stale_temps(path: Path) -> None:
    """Remove the temporary files of writers of ``path`` on this host that were killed mid-write."""
    host = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"
    pattern = re.compile(re.escape(path.name) + r"(\.partial)?\." + re.escape(host) + r"-(\d+)-[0-9a-f]{8}\.tmp")
    for tmp in path.parent.glob(f"{path.name}*.tmp"):
        match = pattern.fullmatch(tmp.name)
        if match and not _alive(int(match.group(2))):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def save_checkpoint(model: nn.Module, path: Path, meta: dict) -> None:
    _atomic_save({"state_dict": model.state_dict(), "meta": meta}, path)


def load_checkpoint(model: nn.Module, path: str | Path) -> dict:
    """Load weights saved by ``save_checkpoint`` into ``model`` (``weights_only=True``); returns meta.

    A checkpoint of another architecture raises ``ValueError`` naming the mismatched keys; a
    file torch.load cannot read (truncated) raises ``DamagedCheckpointError`` naming the file.
    """
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # a truncated zip fails in several types (RuntimeError, EOFError, ...)
        damaged = DamagedCheckpointError(f"checkpoint {path} is damaged ({_first_line(err)}); delete it "
                                         f"(a base model in the cache is then trained again)")
        damaged.reason = _first_line(err)
        raise damaged from None
    if not isinstance(blob, dict) or not isinstance(blob.get("state_dict"), dict):
        raise DamagedCheckpointError(f"checkpoint {path} holds no state_dict; it was not written by save_checkpoint")
    _load_state(model, blob["state_dict"], path)
    return blob.get("meta", {})


def load_weights(model: nn.Module, path: str | Path) -> dict:
    """Load a weights file into ``model``: a ``save_checkpoint`` checkpoint, a checkpoint of
    torchvision's reference scripts (``{"model": state_dict, ...}``) or a plain ``state_dict``
    (e.g. torchvision's ``vgg16-397923af.pth``). Read with ``weights_only=True``: a file that
    would run code when unpickled is refused. Returns the checkpoint's meta (``{}`` if none).
    """
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types; report one line
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"model.weights {str(path)!r} is not a weights file torch.load can read safely ({reason})") from None
    meta: dict = {}
    if isinstance(blob, dict) and isinstance(blob.get("state_dict"), dict):
        blob, meta = blob["state_dict"], blob.get("meta") or {}
    elif isinstance(blob, dict) and isinstance(blob.get("model"), dict):
        blob = blob["model"]
    if not isinstance(blob, dict) or not all(isinstance(v, torch.Tensor) for v in blob.values()):
        raise ValueError(f"model.weights {str(path)!r} holds no state_dict (a mapping of names to tensors)")
    _load_state(model, blob, path)
    return dict(meta)


def _load_state(model: nn.Module, state: dict, path: str | Path) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        parts = [f"{name}: {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}"
                 for name, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)) if keys]
        raise ValueError(f"checkpoint {path} does not match the model; " + "; ".join(parts))
    model.load_state_dict(state)


def get_base_model(
    model_name: str, model_kwargs: dict, num_classes: int, load_data: Callable[[], Any], data_key: dict,
    pretrain: PretrainConfig, cache_dir: str | Path, *, seed: int = 0, weights: str | Path | None = None,
    progress: bool = True, log=print,
) -> tuple[nn.Module, Path, dict]:
    """The base model for this config: ``num_classes`` wide, trained on ``load_data()``.

    With ``weights`` and ``pretrain.epochs=0``: those weights, loaded as they are (the
    returned path is the weights file; nothing is cached or trained). Otherwise the cached
    model, trained first if needed (from ``weights`` when given, else from a seeded
    initialisation); ``load_data`` is only called then, so a cached base model never reads
    its training data (all of ImageNet for a class subset's all-class base model).
    """
    if pretrain.epochs == 0 and weights is None:
        raise ValueError(f"model.pretrain.epochs must be {NO_WEIGHTS_FOR_EPOCHS_0}, but got 0")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(model_name, num_classes=num_classes, **model_kwargs)
    source = Path(weights).expanduser() if weights is not None else None
    if source is not None and pretrain.epochs == 0:
        meta = load_weights(model, source)
        log(f"base model: {source} (given weights, not trained)")
        return model, source, meta
    init = file_digest(source) if source is not None else None
    key = base_model_key(model_name, model_kwargs, data_key, pretrain, seed, init=init, code=model_code(model_name))
    path = base_model_path(cache_dir, model_name, key)
    cached = _load_cached(model, path, log)
    if cached is not None:
        return model, path, cached
    if source is not None:
        load_weights(model, source)
    start = f" from {source}" if source is not None else ""
    log(f"base model: training {model_name}{start} on {data_key.get('name')} for {pretrain.epochs} epochs -> {path}")
    partial = partial_checkpoint_path(path)
    _remove_stale_temps(path)
    summary = train_base_model(model, load_data(), pretrain, seed=seed, progress=progress, log=log, checkpoint=partial,
                               finished_elsewhere=path.exists)
    if summary is not None:
        meta = {"model": model_name, "data": data_key, "pretrain": asdict(pretrain), "seed": seed,
                **({"init": init, "weights": str(source)} if source is not None else {}), **summary}
        if _save_if_absent({"state_dict": model.state_dict(), "meta": meta}, path):
            partial.unlink(missing_ok=True)
            log(f"base model: trained in {summary['train_s']:.0f}s, val_acc={summary['val_acc']:.4f}, saved to {path}")
            return model, path, meta
    # Another process training the same base model wrote it first: every user gets those weights.
    partial.unlink(missing_ok=True)
    meta = load_checkpoint(model, path)
    log(f"base model: another process wrote {path} first; using it (val_acc={meta.get('val_acc', float('nan')):.4f})")
    return model, path, meta


def _load_cached(model: nn.Module, path: Path, log) -> dict | None:
    """Load the cache entry ``path`` into ``model`` and return its meta; None if there is none to
    load: missing, or damaged (then moved aside, saying so, and the caller trains it again)."""
    try:
        before = path.stat()
        meta = load_checkpoint(model, path)
    except FileNotFoundError:
        return None
    except DamagedCheckpointError as err:
        now = path.stat() if path.exists() else None
        # Move only the file that failed, not one that another process has written there since.
        if now is not None and (now.st_ino, now.st_mtime_ns) == (before.st_ino, before.st_mtime_ns):
            aside = _move_aside(path)
            log(f"base model: cache entry {path} is damaged ({err.reason or err}); moved it to {aside} "
                f"and training it again")
            return None
        return _load_cached(model, path, log)
    log(f"base model: {path} (cached, val_acc={meta.get('val_acc', float('nan')):.4f})")
    return meta


def prepare(cfg: Any, log=print) -> tuple[nn.Module, Any, Path, dict]:
    """Load the data and the base model of a composed run config (training it first if needed).

    Returns ``(model, splits, base_path, base_meta)``; ``splits.train`` is the fine-tuning
    set (``data.fraction`` of it), while the base model is always trained on all of it.
    With ``subset=`` and ``subset_base=all`` the base model is the all-class one (trained, or
    loaded from the cache or ``model.weights``) and ``splits`` are the subset's; with
    ``subset_head=cut`` the returned model's head is cut to the subset's classes (the cached
    base model is untouched). ``base_meta["val_acc"]`` is the returned model's accuracy on
    ``splits.val``; where that differs from the data the base model was trained on, its own
    validation accuracy there is kept as ``base_meta["base_data_val_acc"]``.
    """
    from data import get_data, iterate_batches

    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    _, _, _, pretrain = configs_of(cfg)
    run_args, base_args = data_args(cfg, fraction=1.0), base_data_args(cfg)
    run = get_data(**run_args)
    own_data = base_args == run_args  # False: an all-class base model for a class subset
    # What determines the weights; where the files are and how they are loaded does not.
    data_key = {k: v for k, v in base_args.items() if k not in ("root", "download", "fraction", "num_workers")}
    content = dataset_fingerprint(base_args["name"], base_args["root"])
    if content is not None:  # a folder of the user's images, a user's factory: the name does not say what it holds
        data_key["content"] = content
    head = run.num_classes if own_data else run.source_num_classes
    # Before any training: channels (and, for a model from outside, one probe forward pass).
    check_model_fits(cfg.model.name, dict(cfg.model.kwargs or {}), run.input_shape, head, data_name=cfg.data.name,
                     declared=cfg.model.get("input_shape"))
    model, path, meta = get_base_model(
        cfg.model.name, dict(cfg.model.kwargs or {}), head,
        (lambda: run) if own_data else (lambda: get_data(**base_args)), data_key, pretrain, cfg.cache_dir,
        seed=cfg.seed, weights=cfg.model.get("weights"), progress=cfg.progress, log=log,
    )
    # Count FLOPs, trace and time at the size the data is served at (VOC's data.size), not the
    # size the model was registered with (a channel mismatch was refused above).
    model.input_shape = tuple(run.input_shape)
    if not own_data and run.num_classes != run.source_num_classes:  # subset_head=cut
        cut_head(model, run.class_ids)
        log(f"base model: head cut to the {run.num_classes} classes of subset {cfg.subset}")
    splits = run if cfg.data.fraction == 1.0 else get_data(**data_args(cfg))
    given = cfg.model.get("weights") is not None and pretrain.epochs == 0  # a checkpoint's val_acc may be anybody's
    if not own_data or given or "val_acc" not in meta:
        batches = iterate_batches(splits.val, int(cfg.data.eval_batch_size), shuffle=False,
                                  num_workers=splits.num_workers)
        val = task_of(model).evaluate(model, batches, classes=splits.eval_classes)["score"] if len(splits.val) else float("nan")
        meta = {**meta, "base_data_val_acc": meta.get("val_acc"), "val_acc": val}
        log(f"base model: val_acc={val:.4f} on this run's validation split")
    return model, splits, path, meta
