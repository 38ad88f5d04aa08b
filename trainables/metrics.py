"""The one place where FLOPs, parameters, latency and accuracy are measured."""

from __future__ import annotations

import copy
import statistics
import time
import warnings
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from trainables.models import input_shape_of

__all__ = ["count_flops", "count_params", "measure_latency", "deployment_form", "evaluate"]


def count_flops(model: nn.Module, input_shape: Sequence[int] | None = None) -> int:
    """FLOPs of one forward pass on one image, counted by ``torch.utils.flop_counter``.

    A FLOP here is one multiply or one add, so FLOPs = 2 x MACs (the convention of
    FlopCounterMode; papers that quote MACs report half these numbers). ``input_shape`` is
    (C, H, W); by default the model's own ``input_shape``.
    """
    shape = tuple(input_shape) if input_shape is not None else input_shape_of(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, *shape, device=device))
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in model.parameters())


def deployment_form(model: nn.Module, channels_last: bool = True) -> nn.Module:
    """A copy of ``model`` as it would be deployed: eval mode, BatchNorm folded into the conv.

    Folding uses torch.fx's conv-BN fusion; a model fx cannot trace is kept unfused (with a
    warning). channels_last lets oneDNN/cuDNN pick their fastest convolution layouts.
    """
    from torch.fx.experimental.optimization import fuse

    deployed = copy.deepcopy(model).eval()
    try:
        deployed = fuse(deployed)
    except Exception as err:  # fx cannot trace data-dependent control flow
        warnings.warn(f"BatchNorm not folded ({type(err).__name__}: {err}); timing the unfused model", stacklevel=2)
    if channels_last:
        deployed = deployed.to(memory_format=torch.channels_last)
    shape = getattr(model, "input_shape", None)
    if shape is not None:  # fx's GraphModule drops plain attributes; latency needs the stamp
        deployed.input_shape = tuple(shape)
    return deployed


@torch.no_grad()
def measure_latency(
    model: nn.Module,
    batch_size: int = 1,
    *,
    input_shape: Sequence[int] | None = None,
    device: str | torch.device = "cpu",
    threads: int | None = None,
    warmup: int = 3,
    repeats: int = 10,
    channels_last: bool = True,
    deploy: bool = True,
) -> dict:
    """Median wall time of one forward pass of ``batch_size`` images, in milliseconds.

    The model is timed in its deployment form (see ``deployment_form``) after ``warmup``
    untimed passes; on CUDA with CUDA events. ``deploy=False`` times ``model`` as given (in
    eval mode, its mode restored afterwards): pass a model already put through
    ``deployment_form`` to time it many times without rebuilding it. ``threads`` sets torch's
    intra-op threads for the measurement (restored afterwards). Returns ``{"median_ms",
    "min_ms", "times_ms", "batch_size", "threads", "device"}`` so the conditions travel with
    the number; on a shared machine ``min_ms`` is the least disturbed sample.
    """
    _check_latency_args(batch_size, repeats, warmup, threads)
    device = torch.device(device)
    shape = tuple(input_shape) if input_shape is not None else input_shape_of(model)
    if deploy:
        net = deployment_form(model, channels_last).to(device)
    else:
        net = model if _on_device(model, device) else copy.deepcopy(model).to(device)
    x = torch.randn(batch_size, *shape, device=device)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    was_training, old_threads = net.training, torch.get_num_threads()
    net.eval()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        for _ in range(warmup):
            net(x)
        times = [_time_once(net, x, device) for _ in range(repeats)]
    finally:
        torch.set_num_threads(old_threads)
        net.train(was_training)
    return {
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "times_ms": times,
        "batch_size": batch_size,
        "threads": threads if threads is not None else old_threads,
        "device": str(device),
    }


def _check_latency_args(batch_size: int, repeats: int, warmup: int, threads: int | None) -> None:
    if batch_size < 1 or repeats < 1 or warmup < 0 or (threads is not None and threads < 1):
        raise ValueError(
            f"measure_latency: batch_size={batch_size}, repeats={repeats} and threads={threads} "
            f"must be >= 1 (threads may be None) and warmup={warmup} >= 0"
        )


def _on_device(model: nn.Module, device: torch.device) -> bool:
    tensors = [*model.parameters(), *model.buffers()]
    return all(t.device.type == device.type and (device.index is None or t.device == device) for t in tensors)


def _time_once(net: nn.Module, x: Tensor, device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        net(x)
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    net(x)
    return (time.perf_counter() - t0) * 1e3


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], classes: Sequence[int] | None = None) -> dict:
    """Top-1 and top-5 accuracy (fractions in [0, 1]) and mean cross-entropy over ``batches``.

    ``classes`` restricts scoring to those label ids (a class subset evaluated with the full
    head): images of other classes are skipped and predictions are taken among ``classes`` only.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    subset = torch.as_tensor(sorted(set(classes)), device=device) if classes is not None else None
    top1 = top5 = 0
    loss_sum, n = 0.0, 0
    try:
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            logits = model(x)
            if subset is not None:
                keep = torch.isin(y, subset)
                logits, y = logits[keep][:, subset], torch.searchsorted(subset, y[keep])  # y -> column in subset
            if len(y) == 0:
                continue
            loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
            k = min(5, logits.shape[1])
            pred = logits.topk(k, dim=1).indices  # (B, k)
            hits = pred == y[:, None]
            top1 += int(hits[:, 0].sum())
            top5 += int(hits.any(dim=1).sum())
            n += len(y)
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("evaluate: no image to score (empty batches, or none of the scored classes)")
    return {"top1": top1 / n, "top5": top5 / n, "loss": loss_sum / n, "n": n}
