"""Gradient-based criteria: one forward/backward per scoring batch per unit.

Gradients are taken with ``torch.autograd.grad`` so the model's ``.grad`` fields, which a
caller's optimizer may own, are never touched.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from trainables.criteria._base import ScoringContext, device_of, hooked, register_criterion
from trainables.surgery import Unit


def _weight_grad_l1(model: nn.Module, unit: Unit, ctx: ScoringContext, classes: Tensor | None) -> Tensor:
    weights = [model.get_submodule(c).weight for c in unit.convs]
    device = device_of(model)
    total, n_images = torch.zeros(unit.n_filters), 0
    for x, y in ctx.batches:
        if classes is not None:
            keep = torch.isin(y, classes)
            x, y = x[keep], y[keep]
        if len(y) == 0:
            continue
        with torch.enable_grad():
            loss = ctx.loss_fn(model(x.to(device)), y.to(device))
            grads = torch.autograd.grad(loss, weights)
        l1 = sum(g.abs().flatten(1).sum(dim=1) for g in grads).cpu()
        total += l1 * len(y)  # weighted by batch size: the mean over images of batch gradients
        n_images += len(y)
    if n_images == 0:
        raise ValueError(
            f"criterion 'class_specific': no scoring image has a label in target_classes={classes.tolist()}"
        )
    return total / n_images


@register_criterion("sensitivity", needs_data=True)
def sensitivity(model: nn.Module, unit: Unit, ctx: ScoringContext) -> Tensor:
    """L1-norm of the loss gradient w.r.t. the filter's weights (Mittal et al. 2019's sensitivity)."""
    return _weight_grad_l1(model, unit, ctx, classes=None)


@register_criterion("class_specific", needs_data=True)
def class_specific(model: nn.Module, unit: Unit, ctx: ScoringContext) -> Tensor:
    """Sensitivity averaged only over images of ``ctx.target_classes`` (Mittal et al. 2019, class-specific pruning)."""
    if not ctx.target_classes:
        raise ValueError("criterion 'class_specific' needs target classes (ScoringContext.target_classes / prune.target_classes)")
    return _weight_grad_l1(model, unit, ctx, classes=torch.as_tensor(list(ctx.target_classes)))


@register_criterion("taylor", needs_data=True)
def taylor(model: nn.Module, unit: Unit, ctx: ScoringContext) -> Tensor:
    """|mean over positions of activation x gradient|, averaged over images (Molchanov et al. 2017, first-order Taylor)."""
    device = device_of(model)
    captured: dict[int, Tensor] = {}

    def hook(k: int, out: Tensor) -> Tensor:
        captured[k] = out
        # Hand a copy downstream so in-place ReLUs and residual adds leave `out` intact.
        return out.clone()

    total, n_images = torch.zeros(unit.n_filters), 0
    with hooked(model, unit.act_points, hook):
        for x, y in ctx.batches:
            captured.clear()
            with torch.enable_grad():
                logits = model(x.to(device))
                # Sum over images so each image's gradient is its own, independent of batch size.
                loss = ctx.loss_fn(logits, y.to(device)) * len(y)
                acts = [captured[k] for k in range(len(unit.act_points))]
                grads = torch.autograd.grad(loss, acts)
            per_image = sum((a * g).mean(dim=(2, 3)).abs() for a, g in zip(acts, grads, strict=True)) / len(acts)  # (B, C)
            total += per_image.detach().sum(dim=0).cpu()
            n_images += len(y)
    return total / n_images
