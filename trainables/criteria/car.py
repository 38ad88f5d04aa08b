"""CAR: classification accuracy reduction when one filter is removed (Abbasi-Asl and Yu 2017).

Removing a filter is the same as zeroing its channel after the unit's BN (the surgery tests
prove pruned == masked), so we never copy or prune the model. The naive method runs one
full evaluation per filter. Ours expands the batch inside the network: a hook at the unit
repeats the unit's output k times along the batch dimension and zeroes filter j in copy j,
so the layers before the unit run once per batch and k ablations share every later forward.
No library offers batched single-filter ablation, hence this hand-written hook.

The score orders filters by (accuracy drop, loss increase), lexicographically. Accuracy
over n images moves in steps of 1/n, so many filters tie on it; the mean loss increase of
the same ablation (same forward, ``ScoringContext.loss_fn``) breaks those ties, instead of
the filter index. One float carries both:

    score_j = (m_j + atan(d_j) / pi) / n

with m_j the integer drop in correct predictions when filter j is removed and d_j the mean
loss increase per image. atan(d)/pi lies in (-1/2, 1/2), so ``round(score_j * n) = m_j``, a
filter with no loss change scores exactly its accuracy drop m_j / n, and a larger m always
wins. The scores are rounded to float32 (what every criterion returns); rounding can
merge near-equal scores into ties, never swap two of them.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from trainables.core.surgery import Unit, mask_filters
from trainables.criteria._base import ScoringContext, device_of, hooked, register_criterion

LossFn = Callable[[Tensor, Tensor], Tensor]


def _correct(logits: Tensor, y: Tensor) -> Tensor:
    return (logits.argmax(dim=-1) == y).sum(dim=-1)


def _loss_sum(loss_fn: LossFn, logits: Tensor, y: Tensor) -> float:
    # The loss of a batch is a mean; times its size it adds up over batches of any size.
    return float(loss_fn(logits, y)) * len(y)


def _expand(t: Tensor, k: int) -> Tensor:
    return t.repeat(k, *([1] * (t.dim() - 1)))  # (k*B, ...): copy j is rows j*B..(j+1)*B


def combine(drops: Tensor, loss_increase: Tensor, n: int) -> Tensor:
    """One float per filter ordered as (accuracy drop, loss increase); see the module docstring.

    ``drops`` are integer drops in correct predictions, ``loss_increase`` the mean loss
    increase per image, both over the same ``n`` images.
    """
    score = (drops.double() + torch.atan(loss_increase.double()) / math.pi) / n
    # Held at float32 precision (rounding is monotone, so the order survives up to ties):
    # every criterion returns float32, and the double scores then survive that cast intact.
    return score.float().double()


def _needs_input_expansion(model: nn.Module, unit: Unit, x: Tensor) -> bool:
    """Whether some op mixes the unit's activation with a tensor that bypasses the unit.

    Such an op (a residual add around a conv inside the block, a concat) would meet the
    expanded (k*B) activation and an unexpanded (B) skip tensor. One probe forward with
    autograd on one image marks the unit's outputs; walking the graph back from the logits,
    a node with one input derived from the unit and another derived from the model input
    only through paths that avoid the unit is such an op. (A batch-sized tensor built inside
    ``forward`` with no autograd history is invisible here; such a forward fails loudly.)
    """
    marks: set = set()

    def mark(_: int, out: Tensor) -> Tensor:
        out = out * 1  # a fresh autograd node, so the unit's output is recognisable
        marks.add(out.grad_fn)
        return out

    probe = x[:1].detach().requires_grad_(True)
    with hooked(model, unit.act_points, mark), torch.enable_grad():
        root = model(probe).grad_fn
    flags: dict = {}  # node -> (derived from the unit, derived from the input)
    stack = [root] if root is not None else []
    while stack:  # iterative post-order: deep nets overflow Python's recursion limit
        node = stack[-1]
        if node in flags:
            stack.pop()
            continue
        if node in marks:
            flags[node] = (True, False)
            stack.pop()
            continue
        children = [c for c, _ in node.next_functions if c is not None]
        pending = [c for c in children if c not in flags]
        if pending:
            stack.extend(pending)
            continue
        stack.pop()
        if getattr(node, "variable", None) is probe:
            flags[node] = (False, True)
            continue
        child_flags = [flags[c] for c in children]
        if any(u for u, _ in child_flags) and any(i and not u for u, i in child_flags):
            return True
        flags[node] = (any(u for u, _ in child_flags), any(i for _, i in child_flags))
    return False


@torch.no_grad()
def _ablated(
    model: nn.Module, unit: Unit, x: Tensor, y: Tensor, filters: list[int], loss_fn: LossFn, expand_input: bool
) -> tuple[Tensor, Tensor]:
    """Correct predictions (long) and summed loss (double) on (x, y) with each of ``filters``
    removed in turn, each of shape (len(filters),).

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
        logits = model(_expand(x, k) if expand_input else x).view(k, b, -1)  # (k, B, classes)
    # Exactly _loss_sum per copy (float loss widened, then scaled), with one device sync.
    losses = torch.stack([loss_fn(logits[j], y) for j in range(k)]).double().cpu() * b
    return _correct(logits, y).cpu(), losses


@register_criterion("car", needs_data=True)
def car(model: nn.Module, unit: Unit, ctx: ScoringContext) -> Tensor:
    """Classification accuracy reduction when the filter alone is removed, ties broken by loss increase (Abbasi-Asl and Yu 2017, CAR)."""
    device = device_of(model)
    base_correct, base_loss, n = 0, 0.0, 0
    correct = torch.zeros(unit.n_filters, dtype=torch.long)
    loss = torch.zeros(unit.n_filters, dtype=torch.float64)
    expand_input = None
    with torch.no_grad():
        for x, y in ctx.batches:
            x, y = x.to(device), y.to(device)
            if expand_input is None:
                expand_input = _needs_input_expansion(model, unit, x)
            logits = model(x)
            base_correct += int(_correct(logits, y))
            base_loss += _loss_sum(ctx.loss_fn, logits, y)
            chunk = max(1, ctx.car_max_batch // len(y))
            for start in range(0, unit.n_filters, chunk):
                filters = list(range(start, min(start + chunk, unit.n_filters)))
                c, l_sum = _ablated(model, unit, x, y, filters, ctx.loss_fn, expand_input)
                correct[filters] += c
                loss[filters] += l_sum
            n += len(y)
    return combine(base_correct - correct, (loss - base_loss) / n, n)


@torch.no_grad()
def car_naive(model: nn.Module, unit: Unit, ctx: ScoringContext) -> Tensor:
    """Reference CAR: one masked copy and one full evaluation per filter (for tests and benchmarks).

    Same score as ``car`` (accuracy drop, ties broken by loss increase), computed without hooks.
    """
    device = device_of(model)
    model.eval()
    batches = [(x.to(device), y.to(device)) for x, y in ctx.batches]
    n = sum(len(y) for _, y in batches)

    def evaluate(m: nn.Module) -> tuple[int, float]:
        correct, loss = 0, 0.0
        for x, y in batches:
            logits = m(x)
            correct, loss = correct + int(_correct(logits, y)), loss + _loss_sum(ctx.loss_fn, logits, y)
        return correct, loss

    base_correct, base_loss = evaluate(model)
    drops = torch.zeros(unit.n_filters, dtype=torch.long)
    loss_increase = torch.zeros(unit.n_filters, dtype=torch.float64)
    for j in range(unit.n_filters):
        ablated = copy.deepcopy(model)
        mask_filters(ablated, unit, [i for i in range(unit.n_filters) if i != j])
        correct, loss = evaluate(ablated)
        drops[j], loss_increase[j] = base_correct - correct, (loss - base_loss) / n
    return combine(drops, loss_increase, n)
