"""Is a filter colour-selective? Two indices and their thresholds, calibrated on untrained filters.

Abbasi-Asl and Yu (2017) read the filters CAR prunes first in AlexNet's first two layers as
colour filters rather than shape filters. To count them we need a classification that does
not look at the pruning result:

* First layer, from the weights alone (``luminance_colour_index``): the share of a filter's
  energy outside the luminance direction. At each spatial position the filter holds an RGB
  weight vector ``v``; its part along ``l = (1, 1, 1) / sqrt(3)`` responds to brightness only,
  the rest to differences between channels, i.e. to colour. The index is
  ``sum_pos |v - (v.l) l|^2 / sum_pos |v|^2`` in [0, 1]: 0 for a filter with equal weights in
  R, G and B everywhere (pure luminance), 1 for one whose channels sum to zero at every
  position (e.g. red minus green).
* Second layer, from responses (``response_colour_index``): Rafegas and Vanrell's (2018)
  colour selectivity index, ``1 - A_grey / A_colour``: a unit's mean activation on the images
  that excite it most, ``A_colour``, against its mean activation on the greyscale versions
  of the same images, ``A_grey``. Near 0: colour does not matter to it; near 1: it fires only
  for colour.

Thresholds. A random filter is not colourless: with independent weights per channel the
luminance direction holds a third of the energy on average, so the first-layer index of an
untrained filter is about 2/3 (a Beta(P, P/2) for P positions with Gaussian weights). A fixed
cut such as 0.5 would call most random filters colour filters. So each threshold is the
``NULL_QUANTILE`` (0.95) quantile of the index over untrained filters: weights drawn as
PyTorch initialises a conv layer (first layer), or the second-layer units of randomly
initialised networks of the same architecture on the same images (second layer). A filter is
a colour filter when its index exceeds what 95% of random filters reach: chosen once, here,
before any pruning result was seen, and never tuned on one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from trainables.protocol.config import require, require_int

__all__ = [
    "NULL_QUANTILE",
    "colour_threshold",
    "greyscale",
    "luminance_colour_index",
    "response_colour_index",
    "response_threshold",
    "unit_max_activations",
]

NULL_QUANTILE = 0.95  # the share of untrained filters a colour filter must be more chromatic than
NULL_FILTERS = 20_000  # untrained filters drawn for the first-layer threshold (quantile s.e. ~0.002)
NULL_SEED = 0
# ITU-R BT.601 luma weights: what "the greyscale version of an image" means here (as in PIL's convert("L")).
LUMA = (0.299, 0.587, 0.114)


def luminance_colour_index(weight: Tensor) -> Tensor:
    """Per filter: share of its energy orthogonal to the luminance direction, in [0, 1].

    ``weight``: (F, 3, kh, kw), a conv layer reading RGB. An all-zero filter has no colour (0).
    """
    require(weight.dim() == 4 and weight.shape[1] == 3, "weight", "a (filters, 3, kh, kw) tensor of an RGB conv layer",
            tuple(weight.shape))
    w = weight.detach().double().flatten(2)  # (F, 3, P)
    along = w.sum(dim=1) / math.sqrt(3)  # (F, P): the projection v.l at each position
    total = w.square().sum(dim=(1, 2))  # (F,)
    orthogonal = total - along.square().sum(dim=1)
    index = torch.where(total > 0, orthogonal / total.clamp_min(1e-300), torch.zeros_like(total))
    return index.clamp(0.0, 1.0).float()


def colour_threshold(kernel_size: tuple[int, int], *, quantile: float = NULL_QUANTILE, n: int = NULL_FILTERS,
                     seed: int = NULL_SEED) -> float:
    """The first-layer threshold for ``kernel_size`` filters: the ``quantile`` of the index over
    ``n`` untrained filters, drawn as ``nn.Conv2d`` initialises them (Kaiming-uniform, i.e.
    independent uniform weights; the index does not depend on their scale). Seeded: the same
    number every time (about 0.79 for 5x5, 0.86 for 3x3 and 0.72 for 11x11 at 0.95)."""
    require(len(kernel_size) == 2 and all(isinstance(k, int) and k >= 1 for k in kernel_size), "kernel_size",
            "two integers >= 1", kernel_size)
    require(0 < quantile < 1, "quantile", "in (0, 1)", quantile)
    require_int("n", n, 2)
    gen = torch.Generator().manual_seed(seed)
    weights = torch.rand(n, 3, *kernel_size, generator=gen, dtype=torch.float64) * 2 - 1
    return float(torch.quantile(luminance_colour_index(weights).double(), quantile))


def greyscale(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """The greyscale version of normalised RGB images ``x`` (B, 3, H, W), normalised the same way.

    Pixels are un-normalised (``x * std + mean``), reduced to BT.601 luma, copied to the three
    channels and normalised again, so the network sees a colourless image of the same brightness.
    """
    require(x.dim() == 4 and x.shape[1] == 3, "images", "a (batch, 3, H, W) tensor", tuple(x.shape))
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    luma = torch.tensor(LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    grey = ((x * s + m) * luma).sum(dim=1, keepdim=True)  # (B, 1, H, W), pixel units
    return (grey - m) / s


@torch.no_grad()
def unit_max_activations(model: nn.Module, act_point: str, images: Tensor, batch_size: int = 500) -> Tensor:
    """(N, C): each channel's largest response over space at ``act_point`` (a module name: a
    unit's conv, BN or ReLU) after a ReLU, for each image; what Rafegas and Vanrell rank images
    by. (The ReLU commutes with the maximum, so a pre-activation point gives the same numbers.)"""
    out: list[Tensor] = []
    module = model.get_submodule(act_point)
    handle = module.register_forward_hook(lambda _m, _i, o: out.append(o.detach().flatten(2).amax(dim=2).clamp_min(0)))
    was_training = model.training
    model.eval()
    try:
        for s in range(0, len(images), batch_size):
            model(images[s : s + batch_size])
    finally:
        handle.remove()
        model.train(was_training)
    return torch.cat(out).cpu()


def response_colour_index(model: nn.Module, act_point: str, images: Tensor, to_grey: Callable[[Tensor], Tensor], *,
                          top: int = 100) -> Tensor:
    """Per channel of ``act_point``: Rafegas and Vanrell's (2018) colour selectivity index.

    ``1 - A_grey / A_colour`` with ``A_colour`` the channel's mean (spatial-max) activation over
    its ``top`` most exciting ``images`` and ``A_grey`` its mean on ``to_grey`` of the same
    images. Clipped to [0, 1] (a unit that prefers grey is not colour-selective); a unit that
    never fires (``A_colour`` = 0) gets 0. Score on validation images, never test.
    """
    require_int("top", top, 1)
    require(top <= len(images), "top", f"at most the {len(images)} images given", top)
    colour = unit_max_activations(model, act_point, images)  # (N, C)
    best = colour.topk(top, dim=0).indices  # (top, C)
    a_colour = colour.gather(0, best).mean(dim=0)  # (C,)
    grey = unit_max_activations(model, act_point, to_grey(images))  # (N, C); every image once, then pick
    a_grey = grey.gather(0, best).mean(dim=0)
    index = torch.where(a_colour > 0, 1 - a_grey / a_colour.clamp_min(1e-12), torch.zeros_like(a_colour))
    return index.clamp(0.0, 1.0)


def response_threshold(build: Callable[[int], nn.Module], act_point: str, images: Tensor,
                       to_grey: Callable[[Tensor], Tensor], *, seeds: Sequence[int] = (0, 1, 2), top: int = 100,
                       quantile: float = NULL_QUANTILE) -> float:
    """The second-layer threshold: the ``quantile`` of ``response_colour_index`` over the
    units at ``act_point`` of untrained networks ``build(seed)`` on the same ``images``."""
    require(0 < quantile < 1, "quantile", "in (0, 1)", quantile)
    require(len(seeds) >= 1, "seeds", "at least one seed", list(seeds))
    null = torch.cat([response_colour_index(build(s), act_point, images, to_grey, top=top) for s in seeds])
    return float(torch.quantile(null.double(), quantile))
