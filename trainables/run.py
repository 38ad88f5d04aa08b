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

import sys
from pathlib import Path
from typing import Any

from trainables.cli import run_cli, save_run
from trainables.cli.compose import configs_of, load_run_config

__all__ = ["format_summary", "main", "run"]


# How the summary names each task's headline score (record["score_name"]).
_SCORE_NAMES = {"top1": "acc", "map50": "mAP@0.5", "miou": "mIoU"}


def _recovery_phrase(record: dict) -> str:
    """When the run came back within ``recovery_delta`` of the base model's val score (records.py's
    run-level ``steps_to_recover``, counted from the last pruning step through the final fine-tuning)."""
    within = f"within {100 * record.get('recovery_delta', 0):.1f} points of the base val score"
    n = record.get("steps_to_recover")
    if n is None:
        return f"not back {within} by the end of fine-tuning"
    return f"back {within} {'without fine-tuning' if n == 0 else f'after {n} fine-tuning steps'}"


def format_summary(record: dict) -> str:
    """A plain-text table of a run record."""
    pct = lambda v: "   -  " if v is None else f"{100 * v:6.2f}"  # noqa: E731
    steps = lambda v: "never" if v is None else str(v)  # noqa: E731
    lines = [f"{'unit':<22} {'filters':>11} {'pre':>7} {'damage':>7} {'recovered':>9} {'steps_to_recover':>16}"]
    for u in record["units"]:
        lines.append(f"{u['name']:<22} {u['filters_before']:>4} -> {u['filters_after']:<4} {pct(u.get('pre_prune_val_acc')):>7} "
                     f"{pct(u['damage_val_acc']):>7} {pct(u['recovered_val_acc']):>9} "
                     f"{steps(u.get('steps_to_recover')) if u.get('damage_val_acc') is not None else '-':>16}")
    fr = record["flops_after"] / record["flops_before"]
    auc = record.get("recovery_auc")
    score = _SCORE_NAMES.get(record.get("score_name", "top1"), record.get("score_name"))
    lines += [
        f"method {record.get('method', '?')}: {_recovery_phrase(record)}, recovery AUC {'-' if auc is None else f'{auc:.3f}'}",
        f"base val {score:<9}{pct(record['base_val_acc'])}%",
        f"final val {score:<8}{pct(record['final_val_acc'])}%   test {score} {pct(record['final_test_acc'])}%",
    ]
    extra = record.get("final_test_metrics") or {}
    if extra:
        lines.append("test metrics    " + "  ".join(f"{k}={100 * v:.2f}%" for k, v in extra.items()))
    lines += [
        f"FLOPs           {record['flops_before'] / 1e6:.2f}M -> {record['flops_after'] / 1e6:.2f}M  (x{fr:.3f})",
        f"params          {record['params_before'] / 1e3:.1f}k -> {record['params_after'] / 1e3:.1f}k",
    ]
    if record.get("backbone_flops_before"):
        before, after = record["backbone_flops_before"], record["backbone_flops_after"]
        lines.append(f"backbone FLOPs  {before / 1e6:.2f}M -> {after / 1e6:.2f}M  (x{after / before:.3f})")
    if record.get("latency_ms_before") is not None:
        lines.append(f"latency (b={record['latency_batch_size']}) {record['latency_ms_before']:.2f} ms -> "
                     f"{record['latency_ms_after']:.2f} ms (x{record['latency_ms_after'] / record['latency_ms_before']:.3f})")
    lines.append(f"wall time       {record['wall_s']:.1f}s")
    return "\n".join(lines)


def run(cfg: Any, report=None, log=print) -> tuple[dict, Path]:
    """Run one composed config end to end; returns the record and the path it was written to."""
    from omegaconf import OmegaConf

    from trainables.cli.base_model import prepare, train_base_model
    from trainables.protocol.stages import resolve_classes, run_protocol

    prune, finetune, measure, pretrain = configs_of(cfg)
    model, splits, base_path, _ = prepare(cfg, log=log)
    if cfg.data.root is None and splits.data_root is not None:  # say where a fallback read from
        log(f"data.root=null: {cfg.data.name} read from {splits.data_root}")
    resolve_classes(prune.target_classes, splits.class_names)  # fail before any training
    resolved = OmegaConf.to_container(cfg, resolve=True)
    # The scratch baseline trains with the base model's recipe; the protocol is handed it
    # rather than importing base_model (which would close a circle through compose).
    record = run_protocol(model, splits, prune, finetune, measure=measure, seed=cfg.seed, report=report,
                          progress=cfg.progress, config=resolved, pretrain=pretrain, pretrainer=train_base_model)
    record["base_model"] = str(base_path)
    record["data_root"] = splits.data_root  # the folder actually read (config.yaml keeps what was given)
    # the folder names what chose the filters: greedy_car scores by CAR, control and scratch score nothing
    chooser = {"greedy_car": "car", "control": "none", "scratch": "none"}.get(prune.method, prune.criterion)
    out = save_run(cfg, record, f"{cfg.model.name}-{chooser}-{prune.method}")
    # The fine-tuned weights: the record rebuilds the pruned architecture, these fill it
    # (python -m trainables.export <run folder> exports them for deployment).
    import torch

    torch.save(model.state_dict(), out / "model.pt")
    return record, out / "record.json"


def main(argv: list[str] | None = None) -> int:
    return run_cli(__doc__, argv, load_run_config, run, format_summary)


if __name__ == "__main__":
    sys.exit(main())
