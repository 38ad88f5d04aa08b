"""How much to prune where: per-unit ratios from a schedule or a FLOPs target, and which filters stay."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import Tensor, nn

from trainables.core.metrics import count_flops_by_layer
from trainables.core.models import input_shape_of
from trainables.core.surgery import Unit
from trainables.protocol.config import PruneConfig
from trainables.protocol.schedules import GLOBAL, global_floors, kept_count, make_ratios

__all__ = ["FlopsModel", "plan_ratios", "select_keep"]

# A FLOPs target is met when the reduction is within this of it (absolute, in [0, 1]) ...
_TOLERANCE = 0.02
# ... and the bisection stops early once it is within this.
_CLOSE_ENOUGH = 0.005
_MAX_BISECTIONS = 30
_MAX_UNIT_RATIO = 0.95  # no unit may lose more than 95% of its filters to a FLOPs target


def select_keep(scores: Tensor, k: int) -> list[int]:
    """Indices of the ``k`` highest scores, ties broken towards the lower index, sorted."""
    order = torch.sort(-scores.double(), stable=True).indices
    return sorted(order[:k].tolist())


@dataclass(frozen=True)
class _Layer:
    """One conv or linear layer of the FLOPs model: FLOPs = ``per_pair`` x kept out x kept in.

    A side's kept channels = its full count - sum, over the units owning part of it, of
    channels per filter x the unit's removed filters (more than one channel per filter where
    a flatten feeds a Linear: one filter is H x W features; several units where a concatenation
    feeds a layer). A depthwise conv (in = out = groups) has one side: FLOPs = ``per_pair`` x
    kept channels, with ``n_in`` = 1 and no input units.
    """

    name: str
    per_pair: int  # FLOPs per (output channel, input channel) pair at full size
    n_out: int
    n_in: int
    out_units: tuple[tuple[int, int], ...]  # (unit index, channels per filter)
    in_units: tuple[tuple[int, int], ...]


class FlopsModel:
    """FLOPs of ``model`` with each unit pruned to a given kept count, without pruning it.

    Conv and linear FLOPs (all that ``count_flops`` counts) are bilinear in a layer's output
    and input channel counts, and each side's count is linear in the kept filters of the units
    that own it (torch-pruning's groups, as ``prune_layer`` follows them). So the FLOPs after
    pruning are a sum over layers of full-size FLOPs per channel pair x kept out x kept in,
    exact in integers: equal to ``count_flops`` of the physically pruned model. Built once per
    (model, units) from a forward pass and a dependency graph on a weightless ("meta") copy;
    an evaluation then costs microseconds. FLOPs = 2 x MACs, per image of ``input_shape``
    (the model's own by default), as in ``count_flops``.
    """

    def __init__(self, model: nn.Module, units: Sequence[Unit], input_shape: Sequence[int] | None = None):
        self.units = tuple(units)
        shape = tuple(input_shape) if input_shape is not None else input_shape_of(model)
        probe, device = _weightless_copy(model), "meta"
        try:
            per_layer, total = count_flops_by_layer(probe, shape)
        except (NotImplementedError, RuntimeError):  # a forward that reads values (if x.sum() > 0) cannot run on meta
            probe, device = model, next(model.parameters()).device
            per_layer, total = count_flops_by_layer(probe, shape)
        elsewhere = total - sum(per_layer.values())
        if elsewhere:
            raise ValueError(
                f"FLOPs-target planning models conv and linear layers only, but {elsewhere} of the model's "
                f"{total} FLOPs are counted outside them (a functional matmul or attention in a forward); "
                "set prune.target_flops_reduction=null and choose the ratios instead"
            )
        self.base = total
        self.layers = _bilinear_layers(probe, _graph(probe, shape, device), self.units, per_layer)

    def flops(self, kept: Sequence[int]) -> int:
        """FLOPs after pruning unit ``i`` (of ``units``) to ``kept[i]`` filters, whichever ones."""
        removed = [u.n_filters - k for u, k in zip(self.units, kept, strict=True)]
        total = 0
        for layer in self.layers:
            k_out = layer.n_out - sum(c * removed[i] for i, c in layer.out_units)
            k_in = layer.n_in - sum(c * removed[i] for i, c in layer.in_units)
            total += layer.per_pair * k_out * k_in
        return total

    def flops_with_ratios(self, ratios: Sequence[float], round_to: int = 1) -> int:
        """FLOPs after pruning ``ratios[i]`` of unit ``i``'s filters (kept counts by ``kept_count``)."""
        return self.flops([kept_count(u.n_filters, r, round_to) for u, r in zip(self.units, ratios, strict=True)])


def _weightless_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers live on the meta device: shapes only,
    no memory and no arithmetic. Counting FLOPs and tracing the graph need only shapes, and a
    real forward of ResNet-50 (224 x 224) alone costs more than the rest of the plan."""
    memo: dict[int, object] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def _is_layer(module: nn.Module) -> bool:
    return isinstance(module, (nn.modules.conv._ConvNd, nn.Linear))


def _graph(model: nn.Module, shape: tuple, device: str | torch.device) -> tp.DependencyGraph:
    was_training = model.training
    # The tracer reads autograd history, so the graph must be built with grad enabled.
    with torch.enable_grad():
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=(torch.zeros(1, *shape, device=device),))
    model.train(was_training)
    return graph


def _bilinear_layers(
    model: nn.Module, graph: tp.DependencyGraph, units: Sequence[Unit], per_layer: dict[nn.Module, int]
) -> tuple[_Layer, ...]:
    """The layers with FLOPs, each with the units owning its output and input channels."""
    sides: dict[tuple[nn.Module, str], dict[int, int]] = {}
    for i, u in enumerate(units):
        # The group prune_layer removes: every layer whose channels follow this unit's filters.
        group = graph.get_pruning_group(
            model.get_submodule(u.name), tp.prune_conv_out_channels, idxs=list(range(u.n_filters))
        )
        for dep, idxs in group:
            module = dep.target.module
            if module not in per_layer:
                continue
            if _is_depthwise(module) or graph.is_out_channel_pruning_fn(dep.handler):
                side = "out"
            elif graph.is_in_channel_pruning_fn(dep.handler):
                side = "in"
            else:
                continue
            sides.setdefault((module, side), {})[i] = _channels_per_filter(len(idxs), u)
    names = {m: n for n, m in model.named_modules()}
    layers = []
    for module, flops in per_layer.items():
        n_out, n_in = _channels(module)
        if flops % (n_out * n_in):
            raise ValueError(
                f"FLOPs of layer '{names[module]}' ({flops}) are not a multiple of its {n_out} x {n_in} "
                "channel pairs: they do not scale with its channels, so a FLOPs target cannot be planned"
            )
        layers.append(_Layer(
            name=names[module], per_pair=flops // (n_out * n_in), n_out=n_out, n_in=n_in,
            out_units=tuple(sides.get((module, "out"), {}).items()),
            in_units=tuple(sides.get((module, "in"), {}).items()),
        ))
    return tuple(layers)


def _is_depthwise(module: nn.Module) -> bool:
    """In = out = groups: torch-pruning removes its in and out channels together."""
    return (isinstance(module, nn.modules.conv._ConvNd)
            and 1 < module.groups == module.in_channels == module.out_channels)


def _channels(module: nn.Module) -> tuple[int, int]:
    """(output channels, input channels per group) of a layer; a depthwise conv counts once."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if _is_depthwise(module):
        return module.out_channels, 1
    return module.out_channels, module.in_channels // module.groups


def _channels_per_filter(n_idxs: int, unit: Unit) -> int:
    if n_idxs % unit.n_filters:
        raise ValueError(
            f"unit '{unit.name}' maps its {unit.n_filters} filters onto {n_idxs} channels of a layer, not a whole "
            "number per filter, so a FLOPs target cannot be planned"
        )
    return n_idxs // unit.n_filters


def plan_ratios(model: nn.Module, units: list[Unit], prune: PruneConfig,
                scorer: Callable[[Unit], Tensor] | None = None) -> list[float]:
    """One ratio (share of filters removed) per unit, input to output, from the schedule, or
    scaled to meet a FLOPs target.

    With ``target_flops_reduction`` the schedule's shape is kept and scaled by a bisection
    until the pruned FLOPs are within 2 points of the target reduction; each step evaluates
    a ``FlopsModel`` (exact, microseconds) instead of pruning a copy.

    ``prune.schedule=global`` needs ``scorer`` (the criterion on ``model``, higher = keep): every
    unit is scored once, and a FLOPs target is met by bisecting the overall ratio of that one
    ranking instead of scaling a shape.
    """
    if prune.schedule == GLOBAL:
        return _plan_global(model, units, prune, scorer)
    ratios = make_ratios(
        prune.schedule, [u.n_filters for u in units], ratio=prune.ratio, ratio_low=prune.ratio_low,
        ratio_high=prune.ratio_high, ratios=prune.ratios,
    )
    if prune.target_flops_reduction is None:
        return ratios
    # A schedule of zeros has no shape to scale: spread the target evenly instead.
    shape = ratios if max(ratios) > 0 else [1.0] * len(units)
    flops = FlopsModel(model, units)

    def reduction(scale: float) -> float:
        return 1.0 - flops.flops_with_ratios([s * scale for s in shape], prune.round_to) / flops.base

    scale = _bisect_scale(reduction, prune.target_flops_reduction, _MAX_UNIT_RATIO / max(shape), prune.round_to)
    return [s * scale for s in shape]


def _plan_global(model: nn.Module, units: list[Unit], prune: PruneConfig,
                 scorer: Callable[[Unit], Tensor] | None) -> list[float]:
    """``global``'s ratios: the unpruned model's scores ranked once, at ``prune.ratio`` overall
    or at the overall ratio whose FLOPs meet the target."""
    if scorer is None:
        raise ValueError(f"prune.schedule=global ranks the criterion's scores, but prune.method={prune.method} "
                         "scores no filters; use layer_by_layer or one_shot")
    scores = [scorer(u).detach().cpu() for u in units]
    n_filters = [u.n_filters for u in units]

    def ratios_at(ratio: float) -> list[float]:
        return make_ratios(GLOBAL, n_filters, ratio=ratio, scores=scores, min_keep=prune.global_min_keep)

    if prune.target_flops_reduction is None:
        return ratios_at(prune.ratio)
    flops = FlopsModel(model, units)
    # The largest overall ratio the per-unit floors allow (global_kept's own limit), kept below 1.
    floors = sum(global_floors(n_filters, prune.global_min_keep))
    cap = min(1.0 - floors / sum(n_filters), _MAX_UNIT_RATIO)

    def reduction(ratio: float) -> float:
        return 1.0 - flops.flops_with_ratios(ratios_at(ratio), prune.round_to) / flops.base

    return ratios_at(_bisect_scale(reduction, prune.target_flops_reduction, cap, prune.round_to))


def _bisect_scale(reduction: Callable[[float], float], target: float, cap: float, round_to: int) -> float:
    """The scale in [0, ``cap``] whose FLOPs ``reduction`` is within 2 points of ``target``;
    ``reduction`` grows with the scale (more pruning, fewer FLOPs)."""
    most = reduction(cap)
    if most < target - _TOLERANCE:
        raise ValueError(f"prune.target_flops_reduction={target} is out of reach: at most {most:.3f} with this schedule")
    lo, hi = 0.0, cap
    for _ in range(_MAX_BISECTIONS):
        mid = (lo + hi) / 2
        got = reduction(mid)
        if abs(got - target) <= _CLOSE_ENOUGH:
            return mid
        lo, hi = (mid, hi) if got < target else (lo, mid)
    # Kept counts are whole (and multiples of round_to): the reduction moves in jumps that may skip
    # the target. The bisection then closes in on that jump from both sides, and as the reduction
    # only grows with the scale, the nearer of its two sides is the nearest reachable reduction.
    scale = min((lo, hi), key=lambda s: abs(reduction(s) - target))
    if abs(reduction(scale) - target) > _TOLERANCE:
        raise ValueError(f"prune.target_flops_reduction={target} cannot be met within 2% with round_to={round_to}")
    return scale
