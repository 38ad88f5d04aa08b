"""CAR: classification accuracy reduction when one filter is removed (Abbasi-Asl and Yu 2017).

Removing a filter is the same as zeroing its channel after the unit's BN (the surgery tests
prove pruned == masked), so we never copy or prune the model. The naive method runs one
full evaluation per filter. Ours expands the batch inside the network: a hook at the unit
repeats the unit's output k times along the batch dimension and zeroes filter j in copy j,
so the layers before the unit run once per batch and k ablations share every later forward.
No library offers batched single-filter ablation, hence this hand-written hook.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from trainables.criteria._base import ScoringContext, device_of, hooked, register_criterion
from trainables.surgery import Unit, mask_filters


def _correct(logits: Tensor, y: Tensor) -> Tensor:
    return (logits.argmax(dim=-1) == y).sum(dim=-1)


def _expand(t: Tensor, k: int) -> Tensor:
    return t.repeat(k, *([1] * (t.dim() - 1)))  # (k*B, ...): copy j is rows j*B..(j+1)*B


@torch.no_grad()
def _ablated_correct(
    model: nn.Module, unit: Unit, x: Tensor, y: Tensor, filters: list[int], expand_input: bool = False
) -> Tensor:
    """Correct predictions on (x, y) with each of ``filters`` removed in turn: (len(filters),).

    The batch is expanded where the unit's activation first appears, or at the model input
    with ``expand_input`` (needed when a branch that skips the unit meets it again, e.g. a
    conv inside a residual block: the skip path would stay at batch B).
    """
    k, b = len(filters), x.shape[0]
    mask = torch.ones(k, unit.n_filters, device=x.device)
    mask[torch.arange(k), torch.as_tensor(filters)] = 0

    def hook(_: int, out: Tensor) -> Tensor:
        if out.shape[0] == b and k > 1:  # first point reached: expand; later points see expanded tensors
            out = _expand(out, k)
        shaped = out.view(k, b, *out.shape[1:])
        return (shaped * mask.view(k, 1, -1, 1, 1)).view_as(out)

    with hooked(model, unit.act_points, hook):
        logits = model(_expand(x, k) if expand_input else x)  # (k*B, classes)
    return _correct(logits.view(k, b, -1), y)


@register_criterion("car", needs_data=True)
def car(model: nn.Module, unit: Unit, ctx: ScoringContext) -> Tensor:
    """Classification accuracy reduction when the filter alone is removed (Abbasi-Asl and Yu 2017, CAR)."""
    device = device_of(model)
    base, ablated, n = 0, torch.zeros(unit.n_filters, dtype=torch.long), 0
    expand_input = False
    with torch.no_grad():
        for x, y in ctx.batches:
            x, y = x.to(device), y.to(device)
            base += int(_correct(model(x), y))
            chunk = max(1, ctx.car_max_batch // len(y))
            for start in range(0, unit.n_filters, chunk):
                filters = list(range(start, min(start + chunk, unit.n_filters)))
                try:
                    correct = _ablated_correct(model, unit, x, y, filters, expand_input)
                except RuntimeError:
                    if expand_input:
                        raise
                    # A skip path met the expanded batch (batch sizes disagree): expand the
                    # input instead; the results are the same, the prefix just runs k times.
                    expand_input = True
                    correct = _ablated_correct(model, unit, x, y, filters, expand_input)
                ablated[filters] += correct.cpu()
            n += len(y)
    return (base - ablated).double() / n


@torch.no_grad()
def car_naive(model: nn.Module, unit: Unit, ctx: ScoringContext) -> Tensor:
    """Reference CAR: one masked copy and one full evaluation per filter (for tests and benchmarks)."""
    device = device_of(model)
    model.eval()
    batches = [(x.to(device), y.to(device)) for x, y in ctx.batches]
    n = sum(len(y) for _, y in batches)
    base = sum(int(_correct(model(x), y)) for x, y in batches)
    scores = torch.zeros(unit.n_filters, dtype=torch.double)
    for j in range(unit.n_filters):
        ablated = copy.deepcopy(model)
        mask_filters(ablated, unit, [i for i in range(unit.n_filters) if i != j])
        scores[j] = (base - sum(int(_correct(ablated(x), y)) for x, y in batches)) / n
    return scores
