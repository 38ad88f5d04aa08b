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
- it prunes the inputs of a grouped conv (1 < groups, not depthwise) as if every group lost
  the same local channels, whatever indices it is given. Units touching one are therefore
  pruned group-wise (``Unit.channel_groups``): the kept set is rounded to the same positions
  in every block of ``n_filters / channel_groups`` filters, and the record says so. Units
  where that is impossible (groups of one channel, a grouped conv seeing only part of the
  unit's filters) are refused by name.
- its reshape mapping crashes (``ZeroDivisionError``) on a view that splits the channel
  dimension, as ShuffleNetV2's channel shuffle does; the failure is caught per view, and
  units whose filters pass through such a view are refused, since the shuffle permutes them.
- it finds a group for a conv whose filters are the model's output (SqueezeNet's classifier
  conv, through pooling and flatten); those are refused: pruning one changes the output.
- vision transformers (ViT, Swin, MaxViT) are refused as a whole: their features are tokens
  mixed by attention, not conv filters.
- it does not prune the buffers of torchvision's ``FrozenBatchNorm2d`` (pretrained detectors
  use it), so the forward fails after pruning; models holding one are refused until
  ``unfreeze_batchnorm(model)`` turns them into ordinary BatchNorm2d. It is not done silently
  because it changes the caller's model beyond the filters pruned (new trainable parameters,
  batch statistics in training mode).

Optional declarations a model may carry (plain data, or a method, so that models stay
deep-copyable and picklable; ``trainables.core.dense_models`` uses all of them):
- ``pruning_trace(x) -> tensor(s)``: the forward torch-pruning traces instead of ``forward``.
  Needed where the forward hides a path from autograd: torchvision's R-CNNs detach the
  proposals, so tracing their eval forward never reaches the RPN head and pruning the last
  backbone conv would leave ``rpn.head.conv`` with too many input channels.
- ``pruning_ignored: tuple[str, ...]``: module names (each with its submodules) whose output
  channels are never pruned, so no unit contains them (a detector's RPN and box heads, a
  segmenter's classifier conv). Their input channels still follow the units feeding them.
  Every layer whose output is the model's output is ignored in this sense anyway (classifier
  heads), and a conv whose filters reach the output through pooling or flatten is refused.
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

import math
import operator
import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.dependency import index_mapping as _tp_index_mapping

from trainables.core.models import input_shape_of

__all__ = [
    "Unit", "dependency_graph", "describe_units", "example_inputs_for", "mask_filters", "prunable_layers",
    "prune_layer", "pruning_groups", "round_to_groups", "select_units", "unfreeze_batchnorm",
]


@dataclass(frozen=True)
class Unit:
    """One prunable unit of a model, described by module names only (plain data)."""

    name: str  # the first conv of the unit, e.g. "features.0" or "layer1.0.conv3"
    convs: tuple[str, ...]  # every conv whose output filters this unit removes
    act_points: tuple[str, ...]  # per conv: the module whose output is the unit's activation (its BN, else the conv)
    bns: tuple[str, ...]  # the BatchNorms directly after the unit's convs (may be empty)
    n_filters: int
    # Blocks of filters a grouped conv (or GroupNorm) ties together: the unit is pruned keeping
    # the same positions in each of the ``channel_groups`` blocks of n_filters / channel_groups.
    channel_groups: int = 1
    # Other layers whose output channels are the unit's filters (Linear, LayerNorm, GroupNorm,
    # as in ConvNeXt's blocks); ``mask_filters`` zeroes them too.
    others: tuple[str, ...] = ()


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
            "trainables.core.surgery.unfreeze_batchnorm(model)"
        )


def _attention_layer(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The first attention layer of ``model`` (by type: torch's own, or any class whose name
    says ``Attention``, as torchvision's Swin (V2) and MaxViT and timm's ViTs have), or None.
    CNN attention blocks are named otherwise (SqueezeExcitation, timm's SEModule, SplitAttn)."""
    for name, m in model.named_modules():
        if isinstance(m, (nn.MultiheadAttention, nn.TransformerEncoderLayer)) or "Attention" in type(m).__name__:
            return name, m
    return None


def _refuse_transformer(model: nn.Module) -> None:
    found = _attention_layer(model)
    if found is not None:
        raise ValueError(
            f"the model ({type(model).__name__}) is a vision transformer (attention layer '{found[0]}', "
            f"{type(found[1]).__name__}): filter pruning removes conv filters, but its features are tokens mixed "
            "by attention, so it is not prunable here; use a CNN"
        )


_ORIGINAL_RESHAPE_MAPPING = _tp_index_mapping.update_reshape_index_mapping
_ORIGINAL_CONCAT_MAPPING = _tp_index_mapping.update_concat_index_mapping


def _is_shuffle_view(node: object) -> bool:
    """A view that splits or merges the channel dimension around a transpose, as ShuffleNet's
    channel shuffle: (B, C, H, W) -> (B, g, C/g, H, W) -> transpose(1, 2) -> (B, C, H, W)."""
    sizes = getattr(node.grad_fn, "_saved_self_sizes", None)
    if sizes is not None and len(sizes) not in (1, 2, 4):
        return True
    return any(type(out.grad_fn).__name__.startswith(("Transpose", "Permute")) for out in node.outputs)


def _tolerant_reshape_mapping(graph: tp.DependencyGraph, node: object) -> None:
    """torch-pruning's reshape index mapping, except for views it cannot map: a channel shuffle
    (where it divides by a channel count of 0, or maps indices as if flattening, multiplying
    them at every block) or any view where it fails. Those are recorded on the graph instead
    of crashing the whole trace; units passing through them are then refused."""
    if not _is_shuffle_view(node):
        try:
            _ORIGINAL_RESHAPE_MAPPING(graph, node)
            return
        except ZeroDivisionError:
            pass
    graph.__dict__.setdefault("unmapped_ops", set()).add(node)


def _tolerant_concat_mapping(graph: tp.DependencyGraph, node: object) -> None:
    """torch-pruning's concatenation index mapping, except that a concatenation whose input
    sizes it cannot infer (it adds None, a TypeError) is recorded as ``_tolerant_reshape_mapping``
    records a view, and units passing through it are refused."""
    try:
        _ORIGINAL_CONCAT_MAPPING(graph, node)
    except TypeError:
        graph.__dict__.setdefault("unmapped_ops", set()).add(node)


# Installed once, at import (Python's import lock makes it happen once per process), because
# torch-pruning recomputes the index mappings on every ``get_pruning_group`` too, not only
# while tracing; for every op it can map, the wrappers change nothing.
if _tp_index_mapping.update_reshape_index_mapping is _ORIGINAL_RESHAPE_MAPPING:
    _tp_index_mapping.update_reshape_index_mapping = _tolerant_reshape_mapping
if _tp_index_mapping.update_concat_index_mapping is _ORIGINAL_CONCAT_MAPPING:
    _tp_index_mapping.update_concat_index_mapping = _tolerant_concat_mapping


def _trace_fn(model: nn.Module) -> Callable | None:
    """torch-pruning's ``forward_fn`` for a model declaring ``pruning_trace``, else None (its forward)."""
    if not callable(getattr(model, "pruning_trace", None)):
        return None
    return lambda m, inputs: m.pruning_trace(*inputs)


def dependency_graph(model: nn.Module, example_inputs: tuple | None = None) -> tp.DependencyGraph:
    """torch-pruning's dependency graph of ``model``, traced through its ``pruning_trace`` if it
    declares one, on zeros of its input shape by default; the model's train/eval mode is kept."""
    _refuse_transformer(model)
    _refuse_frozen_bn(model)
    was_training = model.training
    inputs = example_inputs if example_inputs is not None else example_inputs_for(model)
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    # The tracer reads autograd history, so the graph must be built with grad enabled.
    try:
        with torch.enable_grad(), warnings.catch_warnings():
            # ConvNeXt's layer_scale parameters: torch-pruning prunes their last non-singleton
            # dimension, (C, 1, 1) -> C, which is the right one; its warning says only that.
            warnings.filterwarnings("ignore", message=".*unwrapped parameters.*")
            warnings.filterwarnings("ignore", message=".*last non-singleton dimension.*")
            graph = tp.DependencyGraph().build_dependency(model, example_inputs=inputs, forward_fn=_trace_fn(model))
    finally:
        model.train(was_training)
    return graph



def _submodule(model: nn.Module, name: str, what: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"the model declares {what} '{name}', but it has no such module") from None


def _fixed_output_layers(model: nn.Module, graph: tp.DependencyGraph) -> list[nn.Module]:
    """Modules whose output channels are never pruned and whose groups are left out silently:
    the model's Linear output layers (classifier heads) and ``pruning_ignored``.

    Inner Linear layers are prunable: ConvNeXt's blocks run their MLP channels-last, so the
    residual stream's filters are also the outputs of each block's second Linear. A conv that
    is an output layer is refused with a reason instead (``_inspect``).
    """
    ignored = [m for m, node in graph.module2node.items() if isinstance(m, nn.Linear) and not node.outputs]
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


def _is_grouped(module: object) -> bool:
    """A grouped conv whose channels cannot be removed one by one (1 < groups, not depthwise).

    Plain (groups=1) and depthwise (groups = in = out channels) convs can lose any channel;
    for 1 < groups every group must keep the same number of channels, and torch-pruning
    assumes the same local positions in every group.
    """
    if not isinstance(module, nn.modules.conv._ConvNd) or module.groups == 1:
        return False
    return not module.groups == module.in_channels == module.out_channels


def _blocks_of(graph: tp.DependencyGraph, dep: object, unit: str, n: int, names: dict) -> int | str:
    """How many blocks of filters the layer reached by ``dep`` ties the unit's ``n`` filters into
    (1 if none), or why that makes the unit unprunable."""
    module = dep.target.module
    if _is_grouped(module):
        into = graph.is_in_channel_pruning_fn(dep.handler)
        channels, groups = (module.in_channels if into else module.out_channels), module.groups
        what = f"{'feeds' if into else 'contains'} the grouped conv '{names[module]}' (groups={groups})"
    elif isinstance(module, nn.GroupNorm) and module.num_groups > 1:
        channels, groups = module.num_channels, module.num_groups
        what = f"feeds the GroupNorm '{names[module]}' (num_groups={groups})"
    else:
        return 1
    if channels != n:
        return (f"unit '{unit}' {what}, whose {channels} channels hold its {n} filters among others; "
                "pruning it would break the groups, so it is not prunable")
    if channels == groups:
        return (f"unit '{unit}' {what}, one channel per group; pruning it would break the groups, "
                "so it is not prunable")
    return groups


def _splits_channels(node: object, graph: tp.DependencyGraph) -> bool:
    """A view or concatenation torch-pruning cannot follow (``_tolerant_reshape_mapping``)."""
    return node in graph.__dict__.get("unmapped_ops", ())


def _beyond_channels(graph: tp.DependencyGraph, dep: object, idxs: list) -> bool:
    """Whether torch-pruning's indices for the layer ``dep`` reaches exceed its channels (seen on
    timm's CSPNet, where a split feeds a concatenation): pruning would fail or be wrong."""
    module = dep.target.module
    pruner = graph.get_pruner_of_module(module) if isinstance(module, nn.Module) else None
    if pruner is None or not idxs or dep.target.type in (tp.ops.OPTYPE.OUTPUT, tp.ops.OPTYPE.ELEMENTWISE):
        return False
    into = graph.is_in_channel_pruning_fn(dep.handler)
    if not (into or graph.is_out_channel_pruning_fn(dep.handler)):
        return False
    count = pruner.get_in_channels(module) if into else pruner.get_out_channels(module)
    return count is not None and max(int(i) for i in idxs) >= count


def _inspect(graph: tp.DependencyGraph, group: tp.Group, unit: str, n: int, names: dict) -> tuple[str | None, int]:
    """Why pruning ``group`` (the unit called ``unit``, of ``n`` filters) is refused, or None;
    and the channel groups its filters are pruned in (``Unit.channel_groups``)."""
    blocks = 1
    for dep, idxs in group:
        node = dep.target
        if _beyond_channels(graph, dep, idxs):
            return (f"unit '{unit}': torch-pruning maps its filters beyond the channels of '{names[node.module]}' "
                    "(a split or concatenation it misreads), so it is not prunable"), 1
        if node.type == tp.ops.OPTYPE.OUTPUT:
            return (f"unit '{unit}' makes channels of the model's output (shape {list(node.module.shape)}); "
                    "pruning it would change what the model returns, so it is not prunable"), 1
        if isinstance(node.module, nn.Conv2d) and not node.outputs and graph.is_out_channel_pruning_fn(dep.handler):
            return (f"unit '{unit}' makes channels of the model's output (its conv '{names[node.module]}' is an "
                    "output layer); pruning it would change what the model returns, so it is not prunable"), 1
        if _splits_channels(node, graph):
            what = ("a view that reorders channels (a channel shuffle, as in ShuffleNet)"
                    if node.type == tp.ops.OPTYPE.RESHAPE else "a concatenation of channels it cannot size")
            return f"unit '{unit}' passes through {what}, which torch-pruning cannot follow, so it is not prunable", 1
        found = _blocks_of(graph, dep, unit, n, names)
        if isinstance(found, str):
            return found, 1
        blocks = math.lcm(blocks, found)
    if blocks > 1 and n == blocks:
        return (f"unit '{unit}' is tied into {blocks} groups of one filter each; pruning it would remove "
                "whole groups, so it is not prunable"), 1
    return None, blocks


@dataclass
class _ConvGroup:
    """One of torch-pruning's conv groups, as this module needs it."""

    convs: list[nn.Module]  # out-pruned convs, in module order
    others: list[nn.Module]  # other out-pruned layers holding the same filters (Linear, LayerNorm, GroupNorm)
    why: str | None  # why refused, or None
    blocks: int  # channel groups (1 if no grouped layer)


def _group_layers(graph: tp.DependencyGraph, group: tp.Group, n: int, order: dict) -> tuple[list, list]:
    """The group's out-pruned convs, and its other out-pruned layers numbering the filters as the
    unit does (so that ``mask_filters`` can zero them by the unit's indices)."""
    convs, others = set(), set()
    for dep, idxs in group:
        module = dep.target.module
        if module not in order or not graph.is_out_channel_pruning_fn(dep.handler):
            continue
        if isinstance(module, nn.Conv2d):
            convs.add(module)
        elif isinstance(module, (nn.Linear, nn.LayerNorm, nn.GroupNorm)) and [int(i) for i in idxs] == list(range(n)):
            others.add(module)
    return sorted(convs, key=order.__getitem__), sorted(others, key=order.__getitem__)


def _conv_group(graph: tp.DependencyGraph, root: nn.Conv2d, ignored: set, order: dict, names: dict,
                rerooted: bool = False) -> _ConvGroup | None:
    """The group of ``root``'s filters, or None when it holds an ignored layer's output (as
    torch-pruning's ``get_all_groups`` leaves those out). A group torch-pruning fails to build
    is refused with its error instead of crashing the whole model."""
    n = root.out_channels
    try:
        group = graph.get_pruning_group(root, tp.prune_conv_out_channels, list(range(n)))
    except (IndexError, ValueError, ZeroDivisionError, RuntimeError) as err:
        # ShuffleNetV2: after the channel shuffle, its concat index mapping runs out of range.
        why = f"torch-pruning cannot follow its filters through the network ({type(err).__name__}: {err})"
        return _ConvGroup([root], [], f"unit '{names[root]}': {why}, so it is not prunable", 1)
    if any(dep.target.module in ignored and graph.is_out_channel_pruning_fn(dep.handler) for dep, _ in group):
        return None
    convs, others = _group_layers(graph, group, n, order)
    if convs[0] is not root and not rerooted:
        # Judge the group as prune_layer will build it, from the unit's first conv: torch-pruning's
        # index mapping is not always symmetric (timm's CSPNet: a split feeding a concatenation).
        return _conv_group(graph, convs[0], ignored, order, names, rerooted=True)
    return _ConvGroup(convs, others, *_inspect(graph, group, names[convs[0]], n, names))


def _conv_groups(model: nn.Module, graph: tp.DependencyGraph) -> list[_ConvGroup]:
    """torch-pruning's conv groups with declared couplings merged: a follower group's convs join
    its leader's group, after the leader's own, and the follower group disappears."""
    order = {m: i for i, (_, m) in enumerate(model.named_modules())}
    names = {m: n for n, m in model.named_modules()}
    ignored = set(_fixed_output_layers(model, graph))
    groups: list[_ConvGroup] = []
    seen: set = set()
    for root in list(graph.module2node):
        if isinstance(root, nn.Conv2d) and root not in ignored and root not in seen:
            g = _conv_group(graph, root, ignored, order, names)
            seen |= {root, *(g.convs if g is not None else ())}
            if g is not None:
                groups.append(g)
    home = {c: g for g in groups for c in g.convs}
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
            lead.convs, lead.others = lead.convs + follow.convs, lead.others + follow.others
            lead.why = lead.why or follow.why
            lead.blocks = math.lcm(lead.blocks, follow.blocks)
            for c in follow.convs:
                home[c] = lead
            groups = [g for g in groups if g is not follow]
    return groups


def _unit_of(graph: tp.DependencyGraph, g: _ConvGroup, names: dict) -> Unit:
    bns = [_following_bn(graph, c) for c in g.convs]
    return Unit(
        name=names[g.convs[0]],
        convs=tuple(names[c] for c in g.convs),
        act_points=tuple(names[b if b is not None else c] for b, c in zip(bns, g.convs, strict=True)),
        bns=tuple(names[b] for b in bns if b is not None),
        n_filters=g.convs[0].out_channels,
        channel_groups=g.blocks,
        others=tuple(names[m] for m in g.others if m not in bns),
    )


def _units_from_graph(model: nn.Module, graph: tp.DependencyGraph) -> tuple[list[Unit], dict[str, str]]:
    """The prunable units in network order, and the refused or following ones: name -> why."""
    order = {m: i for i, (_, m) in enumerate(model.named_modules())}
    names = {m: n for n, m in model.named_modules()}
    units, refused = [], {}
    for g in _conv_groups(model, graph):
        convs = g.convs
        if g.why is not None:
            refused[names[convs[0]]] = g.why
            continue
        for follower in convs[1:]:
            refused.setdefault(names[follower], f"'{names[follower]}' keeps the filters of unit '{names[convs[0]]}' "
                                                f"(pruned with it); prune '{names[convs[0]]}' instead")
        units.append(_unit_of(graph, g, names))
    return sorted(units, key=lambda u: order[model.get_submodule(u.name)]), refused


def _lookup_unit(model: nn.Module, graph: tp.DependencyGraph, unit: str) -> Unit:
    """The unit called ``unit``, from its own group only when it is a prunable unit's first conv
    (one group instead of all: DenseNet has 120); anything else goes the long way, which
    gives the reasons and the valid names."""
    names = {m: n for n, m in model.named_modules()}
    module = dict(model.named_modules()).get(unit)
    if isinstance(module, nn.Conv2d) and module in graph.module2node and not _couplings(model):
        order = {m: i for i, (_, m) in enumerate(model.named_modules())}
        g = _conv_group(graph, module, set(_fixed_output_layers(model, graph)), order, names)
        if g is not None and g.why is None and g.convs[0] is module:
            return _unit_of(graph, g, names)
    return _find_unit(*_units_from_graph(model, graph), unit)


def describe_units(model: nn.Module, example_inputs: tuple | None = None) -> list[Unit]:
    """The prunable units of ``model`` in network order (input to output).

    Units touching a grouped conv are pruned group-wise (``channel_groups``). Left out, with
    the reason ``prune_layer`` gives when asked for one: declared followers, units whose
    filters are channels of the model's output, pass through a channel shuffle, or cannot be
    split into the groups. The model's declarations (module docstring) are honoured; a model
    holding a ``FrozenBatchNorm2d`` is refused (see ``unfreeze_batchnorm``), and so is a vision
    transformer (one line saying why).
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


def round_to_groups(unit: Unit, keep_idxs: Iterable[int]) -> list[int]:
    """The keep set ``prune_layer`` uses for ``unit``: ``keep_idxs`` itself for a plain unit; for
    a grouped one (``channel_groups`` = G blocks of s = n_filters / G filters), the same
    positions in every block, round(len(keep) / G) of them (at least 1), chosen as the
    positions kept most often in ``keep_idxs`` (ties: the lower position). That is the valid
    set closest to the one asked: no other set of that size shares more indices with it.
    """
    keep = _check_keep(unit, keep_idxs)
    blocks = unit.channel_groups
    if blocks == 1:
        return keep
    size = unit.n_filters // blocks
    votes = Counter(i % size for i in keep)
    per_block = min(size, max(1, int(len(keep) / blocks + 0.5)))
    positions = sorted(range(size), key=lambda p: (-votes[p], p))[:per_block]
    return sorted(b * size + p for b in range(blocks) for p in positions)


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
    (``pruning_couplings``) lose the same filters. A grouped unit (``channel_groups`` > 1)
    keeps ``round_to_groups(unit, keep_idxs)`` instead, and its record adds
    ``"channel_groups"`` and ``"keep_asked"`` (how many filters were asked for).
    """
    graph = dependency_graph(model, example_inputs)
    u = _lookup_unit(model, graph, unit)
    asked = _check_keep(u, keep_idxs)
    keep = round_to_groups(u, asked)
    drop = sorted(set(range(u.n_filters)) - set(keep))
    if drop:
        # All groups are taken before any is pruned: they index the filters as they are now.
        for group in pruning_groups(model, graph, u, drop):
            group.prune()
    record = {"unit": u.name, "filters_before": u.n_filters, "filters_after": len(keep), "keep_idxs": keep}
    if u.channel_groups > 1:
        record |= {"channel_groups": u.channel_groups, "keep_asked": len(asked)}
    return record


@torch.no_grad()
def mask_filters(model: nn.Module, unit: Unit, keep_idxs: Iterable[int]) -> None:
    """Zero the unit's filters not in ``keep_idxs`` (weights, bias, BN gamma/beta, and the rows of
    its ``others``: Linear, LayerNorm, GroupNorm), in place.

    In eval mode the masked model computes what the physically pruned one does: a zeroed BN
    scale and shift make the channel output 0 whatever its running mean. Not exactly so where
    the filters pass through a norm over channels (ConvNeXt's LayerNorm: its statistics still
    count the masked channels), or reach a BatchNorm after a concatenation (DenseNet: it
    shifts the zeros), or for a grouped unit asked for a keep set ``round_to_groups`` changes.
    ``keep_idxs`` is checked as in ``prune_layer``, except that it may be empty (masking
    every filter has no pruned counterpart, but ablating a one-filter unit needs it).
    """
    drop = sorted(set(range(unit.n_filters)) - set(_check_keep(unit, keep_idxs, allow_empty=True)))
    for name in unit.convs + unit.bns + unit.others:
        module = model.get_submodule(name)
        module.weight[drop] = 0
        if module.bias is not None:
            module.bias[drop] = 0
