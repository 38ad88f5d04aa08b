"""Prunable units and physical filter removal, on top of torch-pruning's DependencyGraph.

A *unit* is a set of convolutions whose output filters must be removed together: an
independent conv on its own, or every conv feeding one residual stream (a ResNet stage's
last convs plus its downsample). A unit is named after its first conv in module order and
listed in network order, input to output. The classifier head is never a unit.

Pitfalls of torch-pruning 1.6.1 handled here:
- ``example_inputs`` must be a tuple ``(x,)``; a bare batch-1 tensor crashes the tracer.
- ``build_dependency`` switches the model to eval mode; we restore the caller's mode.
- pruning replaces Parameter objects, so optimizers must be rebuilt after ``prune_layer``.
- indices always refer to the *current* numbering of the unit's filters.
- it prunes grouped convs (1 < groups, not depthwise) channel by channel, breaking the
  groups (wrong outputs or a crash on the next forward), so units touching one are refused.
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch_pruning as tp
from torch import nn

from trainables.models import input_shape_of

__all__ = ["Unit", "describe_units", "prunable_layers", "prune_layer", "mask_filters", "example_inputs_for"]


@dataclass(frozen=True)
class Unit:
    """One prunable unit of a model, described by module names only (plain data)."""

    name: str  # the first conv of the unit, e.g. "features.0" or "layer1.0.conv3"
    convs: tuple[str, ...]  # every conv whose output filters this unit removes
    act_points: tuple[str, ...]  # per conv: the module whose output is the unit's activation (its BN, else the conv)
    bns: tuple[str, ...]  # the BatchNorms directly after the unit's convs (may be empty)
    n_filters: int


def example_inputs_for(model: nn.Module, batch: int = 1) -> tuple[torch.Tensor]:
    """A tuple ``(x,)`` of zeros shaped like the model's input, on the model's device, in its dtype."""
    p = next(model.parameters())
    return (torch.zeros(batch, *input_shape_of(model), device=p.device, dtype=p.dtype),)


def _build_graph(model: nn.Module, example_inputs: tuple | None) -> tp.DependencyGraph:
    was_training = model.training
    inputs = example_inputs if example_inputs is not None else example_inputs_for(model)
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    # The tracer reads autograd history, so the graph must be built with grad enabled.
    with torch.enable_grad():
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=inputs)
    model.train(was_training)
    return graph


def _head_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def _following_bn(graph: tp.DependencyGraph, conv: nn.Module) -> nn.Module | None:
    outs = graph.module2node[conv].outputs
    if len(outs) == 1 and isinstance(outs[0].module, nn.modules.batchnorm._BatchNorm):
        return outs[0].module
    return None


def _breaks_groups(module: nn.Module) -> bool:
    """A grouped conv whose channels cannot be removed one by one.

    Plain (groups=1) and depthwise (groups = in = out channels) convs can lose any channel;
    for 1 < groups the channel counts must stay divisible by the groups and each group's
    filters read only its own slice of the inputs, which torch-pruning does not respect.
    """
    if not isinstance(module, nn.modules.conv._ConvNd) or module.groups == 1:
        return False
    return not module.groups == module.in_channels == module.out_channels


def _refusal(graph: tp.DependencyGraph, group: tp.Group, unit: str, names: dict) -> str | None:
    """Why pruning ``group`` (the unit called ``unit``) is refused, or None if it is safe."""
    for dep, _ in group:
        module = dep.target.module
        if _breaks_groups(module):
            verb = "feeds" if graph.is_in_channel_pruning_fn(dep.handler) else "contains"
            return (
                f"unit '{unit}' {verb} the grouped conv '{names[module]}' (groups={module.groups}); "
                "pruning it would break the groups, so it is not prunable"
            )
    return None


def _units_from_graph(model: nn.Module, graph: tp.DependencyGraph) -> tuple[list[Unit], dict[str, str]]:
    """The prunable units in network order, and the refused ones: name -> why."""
    order = {m: i for i, (_, m) in enumerate(model.named_modules())}
    names = {m: n for n, m in model.named_modules()}
    units, refused = [], {}
    for group in graph.get_all_groups(root_module_types=[nn.Conv2d], ignored_layers=_head_layers(model)):
        convs = sorted(
            {
                dep.target.module
                for dep, _ in group
                if isinstance(dep.target.module, nn.Conv2d) and graph.is_out_channel_pruning_fn(dep.handler)
            },
            key=order.__getitem__,
        )
        if not convs:
            continue
        why = _refusal(graph, group, names[convs[0]], names)
        if why is not None:
            refused[names[convs[0]]] = why
            continue
        bns = [_following_bn(graph, c) for c in convs]
        units.append(
            Unit(
                name=names[convs[0]],
                convs=tuple(names[c] for c in convs),
                act_points=tuple(names[b if b is not None else c] for b, c in zip(bns, convs, strict=True)),
                bns=tuple(names[b] for b in bns if b is not None),
                n_filters=convs[0].out_channels,
            )
        )
    return sorted(units, key=lambda u: order[model.get_submodule(u.name)]), refused


def describe_units(model: nn.Module, example_inputs: tuple | None = None) -> list[Unit]:
    """The prunable units of ``model`` in network order (input to output).

    Units whose removal would change the channels of a grouped conv (1 < groups, not
    depthwise) are left out; ``prune_layer`` says why when asked for one.
    """
    return _units_from_graph(model, _build_graph(model, example_inputs))[0]


def prunable_layers(model: nn.Module, example_inputs: tuple | None = None) -> list[str]:
    """Names of the prunable units of ``model`` in network order (input to output)."""
    return [u.name for u in describe_units(model, example_inputs)]


def _find_unit(units: list[Unit], refused: dict[str, str], unit: str) -> Unit:
    for u in units:
        if u.name == unit:
            return u
    if unit in refused:
        raise ValueError(refused[unit])
    raise ValueError(f"unknown unit '{unit}'; valid: {', '.join(u.name for u in units)}")


def _as_index(value: object) -> int:
    # operator.index accepts exactly the int-like values (int, numpy integers, one-element
    # integer tensors) and rejects floats; bools pass it, so they are refused first.
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        raise ValueError(f"keep_idxs must be integers, but got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"keep_idxs must be integers, but got {value!r}") from None


def _as_indices(keep_idxs: Iterable[int]) -> list[int]:
    """``keep_idxs`` as a list of Python ints, read once (a generator is consumed here)."""
    if isinstance(keep_idxs, (torch.Tensor, np.ndarray)):
        dtype = keep_idxs.dtype
        if isinstance(keep_idxs, torch.Tensor):
            kind, is_int = "tensor", not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)
        else:
            kind, is_int = "numpy array", np.issubdtype(dtype, np.integer)
        if not is_int:
            raise ValueError(f"keep_idxs must be integers, but got a {kind} of dtype {dtype}")
        if keep_idxs.ndim != 1:
            raise ValueError(f"keep_idxs must be one-dimensional, but got a {keep_idxs.ndim}-d {kind}")
        return [int(i) for i in keep_idxs.tolist()]
    if isinstance(keep_idxs, (str, bytes)) or not isinstance(keep_idxs, Iterable):
        raise ValueError(f"keep_idxs must be a sequence of integers, but got {keep_idxs!r}")
    return [_as_index(i) for i in keep_idxs]


def _check_keep(unit: Unit, keep_idxs: Iterable[int], allow_empty: bool = False) -> list[int]:
    """The distinct, in-range integer indices of ``keep_idxs``, sorted; a one-line ValueError otherwise."""
    n = unit.n_filters
    try:
        given = _as_indices(keep_idxs)
    except ValueError as err:
        raise ValueError(f"unit '{unit.name}': {err}") from None
    if not given and not allow_empty:
        raise ValueError(f"unit '{unit.name}': keep_idxs is empty; keep between 1 and {n} of the filters 0..{n - 1}")
    bad = sorted({i for i in given if not 0 <= i < n})
    if bad:
        raise ValueError(f"unit '{unit.name}': keep_idxs {bad} out of range; valid indices are 0..{n - 1}")
    keep = sorted(set(given))
    if len(keep) != len(given):
        dups = sorted(i for i, c in Counter(given).items() if c > 1)
        raise ValueError(f"unit '{unit.name}': keep_idxs has duplicates: {', '.join(map(str, dups))}")
    return keep


def prune_layer(
    model: nn.Module, unit: str, keep_idxs: Iterable[int], example_inputs: tuple | None = None
) -> dict:
    """Physically remove every output filter of ``unit`` not in ``keep_idxs``, in place.

    Dependent layers follow (the next conv's inputs, BatchNorm, the flatten into a Linear,
    residual partners). ``keep_idxs`` index the unit's filters in their current numbering:
    distinct int-like values (Python or numpy integers, an integer tensor or array, any
    iterable of them, read once); floats and bools are refused rather than truncated.
    Returns a plain-data record: ``{"unit", "filters_before", "filters_after", "keep_idxs"}``,
    enough to replay the pruning on a fresh copy of the base model.
    """
    graph = _build_graph(model, example_inputs)
    u = _find_unit(*_units_from_graph(model, graph), unit)
    keep = _check_keep(u, keep_idxs)
    drop = sorted(set(range(u.n_filters)) - set(keep))
    if drop:
        group = graph.get_pruning_group(model.get_submodule(u.name), tp.prune_conv_out_channels, idxs=drop)
        group.prune()
    return {"unit": u.name, "filters_before": u.n_filters, "filters_after": len(keep), "keep_idxs": keep}


@torch.no_grad()
def mask_filters(model: nn.Module, unit: Unit, keep_idxs: Iterable[int]) -> None:
    """Zero the unit's filters not in ``keep_idxs`` (weights, bias, and BN gamma/beta), in place.

    In eval mode the masked model computes exactly what the physically pruned one does:
    a zeroed BN scale and shift make the channel output 0 whatever its running mean.
    ``keep_idxs`` is checked as in ``prune_layer``, except that it may be empty (masking
    every filter has no pruned counterpart, but ablating a one-filter unit needs it).
    """
    drop = sorted(set(range(unit.n_filters)) - set(_check_keep(unit, keep_idxs, allow_empty=True)))
    for name in unit.convs + unit.bns:
        module = model.get_submodule(name)
        module.weight[drop] = 0
        if module.bias is not None:
            module.bias[drop] = 0
