"""Gradient-based criteria: one forward/backward per scoring batch per unit.

Gradients are taken functionally (``torch.autograd.grad``, ``torch.func.grad``) so the
model's ``.grad`` fields, which a caller's optimizer may own, are never touched.
Sensitivity needs one gradient per image: ``torch.func.vmap`` over ``torch.func.grad``
computes them in one vectorised forward/backward per batch instead of a loop over images.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from trainables.core.surgery import Unit
from trainables.criteria._base import ScoringContext, device_of, hooked, register_criterion

# Per-image weight gradients are (images, *weight shape); this many elements per vmap chunk
# keeps a 64-image batch on a wide conv (512x512x3x3) near 0.6 GB instead of several.
_PER_IMAGE_GRAD_ELEMENTS = 2**27


def _per_image_grad_l1(
    model: nn.Module, unit: Unit, loss_fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, y: Tensor
) -> Tensor:
    """|dL_i/dW_f|_1 for each image i and filter f of the unit: (B, n_filters).

    L_i is the loss of image i alone (the model sees a batch of one, so reshapes written
    for a batch dimension still hold). Only the unit's conv weights are differentiated.
    """
    names = [f"{c}.weight" for c in unit.convs]
    state = {k: v.detach() for k, v in [*model.named_parameters(), *model.named_buffers()]}
    weights = {k: state.pop(k) for k in names}

    def image_loss(w: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        return loss_fn(torch.func.functional_call(model, {**state, **w}, (xi[None],)), yi[None])

    def image_l1(xi: Tensor, yi: Tensor) -> Tensor:
        grads = torch.func.grad(image_loss)(weights, xi, yi)
        return sum(g.abs().flatten(1).sum(dim=1) for g in grads.values())  # (n_filters,)

    per_image = sum(w.numel() for w in weights.values())
    chunk = max(1, _PER_IMAGE_GRAD_ELEMENTS // per_image)
    with torch.enable_grad():
        return torch.func.vmap(image_l1, chunk_size=chunk)(x, y)


def _weight_grad_l1(model: nn.Module, unit: Unit, ctx: ScoringContext, classes: Tensor | None) -> Tensor:
    device = device_of(model)
    total, n_images = torch.zeros(unit.n_filters, dtype=torch.float64), 0
    for x, y in ctx.batches:
        if classes is not None:
            keep = torch.isin(y, classes)
            x, y = x[keep], y[keep]
        if len(y) == 0:
            continue
        total += _per_image_grad_l1(model, unit, ctx.loss_fn, x.to(device), y.to(device)).double().sum(dim=0).cpu()
        n_images += len(y)
    if n_images == 0:
        raise ValueError(
            f"criterion 'class_specific': no scoring image has a label in target_classes={classes.tolist()}"
        )
    return total / n_images


@register_criterion("sensitivity", needs_data=True)
def sensitivity(model: nn.Module, unit: Unit, ctx: ScoringContext) -> Tensor:
    """Mean over images of the l1 norm of the image's loss gradient w.r.t. the filter's weights (Mittal et al. 2019, sensitivity).

    score_f = (1/N) sum_i |dL_i/dW_f|_1 over the N scoring images, L_i the loss of image i
    alone, W_f the filter's weights in every conv of the unit. Per-image gradients make the
    score independent of how the images are batched; the norm of a batch-mean gradient is
    not (opposite-signed image gradients cancel more in bigger batches).
    """
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
