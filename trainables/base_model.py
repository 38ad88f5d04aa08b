"""Base models: trained once, cached by what determines them, loaded by every run and trial.

The cache key hashes the model, the data that trains it and the training settings, so
changing any of them trains a new base model. ``prepare(cfg)`` is what the command lines
and the search's driver call: the data of a run config and its (cached) base model.
``python -m trainables.pretrain`` is the command line in front of it.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from data import iterate_batches
from trainables.compose import configs_of, data_args
from trainables.config import PretrainConfig
from trainables.metrics import evaluate
from trainables.models import build_model

__all__ = [
    "base_model_key", "base_model_path", "get_base_model", "load_checkpoint", "prepare", "save_checkpoint",
    "train_base_model",
]


def base_model_key(model: str, model_kwargs: dict, data_key: dict, pretrain: PretrainConfig, seed: int) -> str:
    """A short hash of everything that determines the base model's weights."""
    blob = json.dumps(
        {"model": model, "kwargs": model_kwargs, "data": data_key, "pretrain": asdict(pretrain), "seed": seed},
        sort_keys=True, default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def base_model_path(cache_dir: str | Path, model: str, key: str) -> Path:
    return Path(cache_dir).expanduser() / "base_models" / f"{model}-{key}.pt"


def train_base_model(
    model: nn.Module, splits: Any, pretrain: PretrainConfig, *, seed: int = 0, progress: bool = True, log=print
) -> dict:
    """Train ``model`` in place with SGD + one-cycle LR on ``splits.train``; returns a summary."""
    steps_per_epoch = max(1, len(splits.train) // pretrain.batch_size)
    total = pretrain.epochs * steps_per_epoch
    opt = torch.optim.SGD(
        model.parameters(), lr=pretrain.lr, momentum=pretrain.momentum, weight_decay=pretrain.weight_decay, nesterov=True
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=pretrain.lr, total_steps=total)
    device = next(model.parameters()).device
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="pretrain", unit="step", leave=False)
    t0 = time.perf_counter()
    history = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for epoch in range(pretrain.epochs):
            model.train()
            for x, y in iterate_batches(splits.train, pretrain.batch_size, shuffle=True, seed=seed * 7_919 + epoch,
                                        drop_last=True, num_workers=splits.num_workers):
                loss = F.cross_entropy(model(x.to(device)), y.to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(f"epoch {epoch + 1}/{pretrain.epochs} loss={loss.item():.3f}")
            batches = iterate_batches(splits.val, 1000, shuffle=False, num_workers=splits.num_workers)
            val = evaluate(model, batches, classes=splits.eval_classes)["top1"]
            history.append({"epoch": epoch + 1, "val_acc": val, "elapsed_s": time.perf_counter() - t0})
            log(f"pretrain epoch {epoch + 1}/{pretrain.epochs}: val_acc={val:.4f} ({time.perf_counter() - t0:.0f}s)")
    if bar is not None:
        bar.close()
    return {"history": history, "val_acc": history[-1]["val_acc"], "train_s": time.perf_counter() - t0}


def save_checkpoint(model: nn.Module, path: Path, meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"state_dict": model.state_dict(), "meta": meta}, tmp)
    tmp.replace(path)  # atomic: a concurrent reader never sees half a file


def load_checkpoint(model: nn.Module, path: str | Path) -> dict:
    """Load weights saved by ``save_checkpoint`` into ``model`` (``weights_only=True``); returns meta.

    A checkpoint of another architecture raises ``ValueError`` naming the mismatched keys.
    """
    blob = torch.load(path, map_location="cpu", weights_only=True)
    state = blob["state_dict"]
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        parts = [f"{name}: {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}"
                 for name, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)) if keys]
        raise ValueError(f"checkpoint {path} does not match the model; " + "; ".join(parts))
    model.load_state_dict(state)
    return blob.get("meta", {})


def get_base_model(
    model_name: str, model_kwargs: dict, splits: Any, data_key: dict, pretrain: PretrainConfig,
    cache_dir: str | Path, *, seed: int = 0, progress: bool = True, log=print,
) -> tuple[nn.Module, Path, dict]:
    """The cached base model for this config, training and caching it first if needed."""
    key = base_model_key(model_name, model_kwargs, data_key, pretrain, seed)
    path = base_model_path(cache_dir, model_name, key)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(model_name, num_classes=splits.num_classes, **model_kwargs)
    if path.exists():
        meta = load_checkpoint(model, path)
        log(f"base model: {path} (cached, val_acc={meta.get('val_acc', float('nan')):.4f})")
        return model, path, meta
    log(f"base model: training {model_name} on {data_key.get('name')} for {pretrain.epochs} epochs -> {path}")
    summary = train_base_model(model, splits, pretrain, seed=seed, progress=progress, log=log)
    meta = {"model": model_name, "data": data_key, "pretrain": asdict(pretrain), "seed": seed, **summary}
    save_checkpoint(model, path, meta)
    log(f"base model: trained in {summary['train_s']:.0f}s, val_acc={summary['val_acc']:.4f}, saved to {path}")
    return model, path, meta


def prepare(cfg: Any, log=print) -> tuple[nn.Module, Any, Path, dict]:
    """Load the data and the cached base model of a composed run config (training it first if needed).

    Returns ``(model, splits, base_path, base_meta)``; ``splits.train`` is the fine-tuning
    set (``data.fraction`` of it), while the base model is always trained on all of it.
    """
    from data import get_data

    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    _, _, _, pretrain = configs_of(cfg)
    full_args = data_args(cfg, fraction=1.0)
    full = get_data(**full_args)
    # What determines the weights; where the files are and how they are loaded does not.
    data_key = {k: v for k, v in full_args.items() if k not in ("root", "download", "fraction", "num_workers")}
    model, path, meta = get_base_model(
        cfg.model.name, dict(cfg.model.kwargs or {}), full, data_key, pretrain, cfg.cache_dir,
        seed=cfg.seed, progress=cfg.progress, log=log,
    )
    splits = full if cfg.data.fraction == 1.0 else get_data(**data_args(cfg))
    return model, splits, path, meta
