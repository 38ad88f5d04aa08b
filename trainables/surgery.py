"""Prunable units and physical filter removal, on top of torch-pruning's DependencyGraph.

A *unit* is a set of convolutions whose output filters must be removed together: an
independent conv on its own, or every conv feeding one residual stream (a ResNet stage's
last convs plus its downsample). A unit is named after its first conv in module order and
listed in network order, input to output. The classifier head is never a unit. A unit with
declared followers (``pruning_couplings`` below) lists their convs after its own.

Pitfalls of torch-pruning 1.6.1 handled here:
- ``example_inputs`` must be a tuple ``(x,)``; a bare batch-1 tensor crashes the tracer.
- ``build_dependency`` switches the model to eval mode; we restore the caller's mode.
- pruning replaces Parameter objects, so optimizers must be rebuilt after ``prune_layer``.
- indices always refer to the *current* numbering of the unit's filters.
- it prunes grouped convs (1 < groups, not depthwise) channel by channel, breaking the
  groups (wrong outputs or a crash on the next forward), so units touching one are refused.
- it does not prune the buffers of torchvision's ``FrozenBatchNorm2d`` (pretrained detectors
  use it), so the forward fails after pruning; models holding one are refused until
  ``unfreeze_batchnorm(model)`` turns them into ordinary BatchNorm2d. It is not done silently
  because it changes the caller's model beyond the filters pruned (new trainable parameters,
  batch statistics in training mode).

Optional declarations a model may carry (plain data, or a method, so that models stay
deep-copyable and picklable; ``trainables.dense_models`` uses all of them):
- ``pruning_trace(x) -> tensor(s)``: the forward torch-pruning traces instead of ``forward``.
  Needed where the forward hides a path from autograd: torchvision's R-CNNs detach the
  proposals, so tracing their eval forward never reaches the RPN head and pruning the last
  backbone conv would leave ``rpn.head.conv`` with too many input channels.
- ``pruning_ignored: tuple[str, ...]``: module names (each with its submodules) whose output
  channels are never pruned, so no unit contains them (a detector's RPN and box heads, a
  segmenter's classifier conv). Their input channels still follow the units feeding them.
  Every ``nn.Linear`` is ignored in this sense anyway (classifier heads).
- ``pruning_couplings: dict[str, tuple[str, ...]]``: leader conv -> follower convs that must
  keep the same filters, for couplings autograd cannot show. SegNet's decoder unpools with its
  encoder's max-pool indices, which carry no gradient, so torch-pruning puts an encoder
  stage's last conv and the decoder conv whose output is unpooled with that stage's indices
  in different groups, and pruning one alone fails on the next forward ("Expected shape of
  indices to be same as that of the input tensor"). Followers are not units of their own:
  the leader's ``Unit`` lists their convs after its own (and their BNs in ``bns`` and
  ``act_points``), so criteria and ``mask_filters`` see them, and ``prune_layer`` removes the
  same indices from the followers' groups.
- ``unit_parts: dict[str, str]``: part name -> module-name prefix, for ``prune.units``
  (``select_units``). A unit belongs to the part of its leader conv, so in SegNet the
  decoder convs that feed an unpool follow their encoder stage and count as encoder.
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch_pruning as tp
from torch import nn

from trainables.models import input_shape_of

__all__ = [
    "Unit", "dependency_graph", "describe_units", "example_inputs_for", "mask_filters", "prunable_layers",
    "prune_layer", "pruning_groups", "select_units", "unfreeze_batchnorm",
]


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


def _is_frozen_bn(module: nn.Module) -> bool:
    # By name, so that surgery does not import torchvision for models that never use it.
    return type(module).__name__ == "FrozenBatchNorm2d" and hasattr(module, "running_var")


def _as_batchnorm(frozen: nn.Module) -> nn.BatchNorm2d:
    """A BatchNorm2d computing in eval mode what ``frozen`` computes: (x - mean) / sqrt(var + eps) * w + b."""
    w = frozen.weight
    bn = nn.BatchNorm2d(w.numel(), eps=getattr(frozen, "eps", 1e-5), device=w.device, dtype=w.dtype)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(bn, name).copy_(getattr(frozen, name))
    return bn.train(frozen.training)


def unfreeze_batchnorm(model: nn.Module) -> int:
    """Replace every ``FrozenBatchNorm2d`` of ``model`` by an ordinary ``BatchNorm2d`` with the
    same statistics and affine values, in place; returns how many were replaced.

    In eval mode the model computes what it did (up to float rounding), and torch-pruning can
    then prune those layers. The new layers are ordinary ones: trainable weight and bias, and
    batch statistics in training mode; keep them in eval mode to fine-tune them as frozen.
    Rebuild any optimizer afterwards. A layer shared by several parents stays shared.
    """
    replaced: dict[nn.Module, nn.BatchNorm2d] = {}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if _is_frozen_bn(child):
                if child not in replaced:
                    replaced[child] = _as_batchnorm(child)
                setattr(parent, name, replaced[child])
    return len(replaced)


def _refuse_frozen_bn(model: nn.Module) -> None:
    n = sum(1 for m in model.modules() if _is_frozen_bn(m))
    if n:
        raise ValueError(
            f"the model has {n} FrozenBatchNorm2d layers (as torchvision's pretrained detectors do), whose buffers "
            "torch-pruning does not prune, so the pruned model would fail; convert them first with "
            "trainables.surgery.unfreeze_batchnorm(model)"
        )


def _trace_fn(model: nn.Module) -> Callable | None:
    """torch-pruning's ``forward_fn`` for a model declaring ``pruning_trace``, else None (its forward)."""
    if not callable(getattr(model, "pruning_trace", None)):
        return None
    return lambda m, inputs: m.pruning_trace(*inputs)


def dependency_graph(model: nn.Module, example_inputs: tuple | None = None) -> tp.DependencyGraph:
    """torch-pruning's dependency graph of ``model``, traced through its ``pruning_trace`` if it
    declares one, on zeros of its input shape by default; the model's train/eval mode is kept."""
    _refuse_frozen_bn(model)
    was_training = model.training
    inputs = example_inputs if example_inputs is not None else example_inputs_for(model)
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    # The tracer reads autograd history, so the graph must be built with grad enabled.
    try:
        with torch.enable_grad():
            graph = tp.DependencyGraph().build_dependency(model, example_inputs=inputs, forward_fn=_trace_fn(model))
    finally:
        model.train(was_training)
    return graph



def _submodule(model: nn.Module, name: str, what: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"the model declares {what} '{name}', but it has no such module") from None


def _fixed_output_layers(model: nn.Module) -> list[nn.Module]:
    """Modules whose output channels are never pruned: every Linear and ``pruning_ignored``."""
    ignored = [m for m in model.modules() if isinstance(m, nn.Linear)]
    for name in getattr(model, "pruning_ignored", ()):
        ignored += list(_submodule(model, name, "pruning_ignored").modules())
    return ignored


def _couplings(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """The model's ``pruning_couplings`` (leader conv -> follower convs), checked to name convs."""
    couplings = {k: tuple(v) for k, v in dict(getattr(model, "pruning_couplings", None) or {}).items()}
    for leader, followers in couplings.items():
        for name in (leader, *followers):
            if not isinstance(_submodule(model, name, "pruning_couplings"), nn.Conv2d):
                raise ValueError(f"pruning_couplings must name Conv2d modules, but '{name}' is not one")
    return couplings


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


def _conv_groups(model: nn.Module, graph: tp.DependencyGraph) -> list[tuple[list[nn.Module], str | None]]:
    """torch-pruning's conv groups, each as (its out-pruned convs in module order, why refused
    or None), with declared couplings merged: a follower group's convs join its leader's
    group, after the leader's own, and the follower group disappears."""
    order = {m: i for i, (_, m) in enumerate(model.named_modules())}
    names = {m: n for n, m in model.named_modules()}
    groups: list[list] = []
    for group in graph.get_all_groups(root_module_types=[nn.Conv2d], ignored_layers=_fixed_output_layers(model)):
        convs = sorted(
            {
                dep.target.module
                for dep, _ in group
                if isinstance(dep.target.module, nn.Conv2d) and graph.is_out_channel_pruning_fn(dep.handler)
            },
            key=order.__getitem__,
        )
        if convs:
            groups.append([convs, _refusal(graph, group, names[convs[0]], names)])
    home = {c: g for g in groups for c in g[0]}
    for leader, followers in _couplings(model).items():
        for follower in followers:
            lead_conv, follow_conv = model.get_submodule(leader), model.get_submodule(follower)
            if lead_conv not in home or follow_conv not in home:
                missing = leader if lead_conv not in home else follower
                raise ValueError(f"pruning_couplings names '{missing}', whose filters are never pruned "
                                 "(an ignored layer, or not reached by the traced forward)")
            lead, follow = home[lead_conv], home[follow_conv]
            if lead is follow:
                continue  # already coupled through the graph
            if follow_conv.out_channels != lead_conv.out_channels:
                raise ValueError(f"pruning_couplings: '{follower}' has {follow_conv.out_channels} filters but its "
                                 f"leader '{leader}' has {lead_conv.out_channels}; coupled convs need the same count")
            lead[0] = lead[0] + follow[0]
            lead[1] = lead[1] or follow[1]
            for c in follow[0]:
                home[c] = lead
            groups = [g for g in groups if g is not follow]
    return [(convs, why) for convs, why in groups]


def _units_from_graph(model: nn.Module, graph: tp.DependencyGraph) -> tuple[list[Unit], dict[str, str]]:
    """The prunable units in network order, and the refused or following ones: name -> why."""
    order = {m: i for i, (_, m) in enumerate(model.named_modules())}
    names = {m: n for n, m in model.named_modules()}
    units, refused = [], {}
    for convs, why in _conv_groups(model, graph):
        if why is not None:
            refused[names[convs[0]]] = why
            continue
        for follower in convs[1:]:
            refused.setdefault(names[follower], f"'{names[follower]}' keeps the filters of unit '{names[convs[0]]}' "
                                                f"(pruned with it); prune '{names[convs[0]]}' instead")
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
    depthwise) are left out, as are declared followers; ``prune_layer`` says why when asked
    for one. The model's declarations (module docstring) are honoured; a model holding a
    ``FrozenBatchNorm2d`` is refused (see ``unfreeze_batchnorm``).
    """
    return _units_from_graph(model, dependency_graph(model, example_inputs))[0]


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


def select_units(model: nn.Module, units: list[Unit], part: str) -> list[Unit]:
    """The units of ``units`` in the part ``part`` of the model (``prune.units``), in their order.

    ``all`` is always valid; other parts are the model's ``unit_parts`` (name -> module-name
    prefix). A unit belongs to the part of its leader conv (its name): SegNet's decoder convs
    that feed an unpool follow their encoder stage, so they are pruned as encoder units.
    """
    parts = dict(getattr(model, "unit_parts", None) or {})
    if part == "all":
        return list(units)
    if part not in parts:
        model_name = getattr(model, "model_name", type(model).__name__)
        raise ValueError(f"prune.units must be one of {', '.join(['all', *sorted(parts)])} for {model_name}, "
                         f"but got {part!r}")
    prefix = parts[part]
    return [u for u in units if u.name == prefix or u.name.startswith(prefix + ".")]


def pruning_groups(model: nn.Module, graph: tp.DependencyGraph, unit: Unit, idxs: Iterable[int]) -> list[tp.Group]:
    """torch-pruning's groups removing filters ``idxs`` of ``unit``: its own group, then one per
    declared follower not already in it (``pruning_couplings``); ``prune_layer`` prunes them all."""
    couplings = _couplings(model)
    idxs = list(idxs)
    groups, covered = [], set()
    for root in (unit.name, *(f for c in unit.convs for f in couplings.get(c, ()))):
        module = model.get_submodule(root)
        if module in covered:
            continue
        group = graph.get_pruning_group(module, tp.prune_conv_out_channels, idxs=idxs)
        covered |= {dep.target.module for dep, _ in group if graph.is_out_channel_pruning_fn(dep.handler)}
        groups.append(group)
    return groups


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
    enough to replay the pruning on a fresh copy of the base model. Declared followers
    (``pruning_couplings``) lose the same filters.
    """
    graph = dependency_graph(model, example_inputs)
    u = _find_unit(*_units_from_graph(model, graph), unit)
    keep = _check_keep(u, keep_idxs)
    drop = sorted(set(range(u.n_filters)) - set(keep))
    if drop:
        # All groups are taken before any is pruned: they index the filters as they are now.
        for group in pruning_groups(model, graph, u, drop):
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
