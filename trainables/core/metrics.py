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

from trainables.core.models import input_shape_of

__all__ = ["count_backbone_flops", "count_flops", "count_flops_by_layer", "count_params", "measure_latency", "deployment_form", "evaluate"]


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


def count_backbone_flops(model: nn.Module) -> int | None:
    """FLOPs of the model's feature extractor alone (one image), or None for a model that does
    not name one. A detector stamps ``backbone_name``: its backbone is what filter pruning
    shrinks, while the RPN and box heads keep their cost, so both figures are reported."""
    name = getattr(model, "backbone_name", None)
    if name is None:
        return None
    return count_flops(model.get_submodule(name), input_shape_of(model))


def count_flops_by_layer(model: nn.Module, input_shape: Sequence[int] | None = None) -> tuple[dict[nn.Module, int], int]:
    """FLOPs counted inside each conv and linear layer's forward (summed over its calls), and the
    total ``count_flops`` gives, in one pass; same convention (2 x MACs).

    Works on a model whose weights live on the meta device (shapes only), which is how the
    FLOPs-target planner (``trainables.protocol.planning.FlopsModel``) calls it.
    """
    shape = tuple(input_shape) if input_shape is not None else input_shape_of(model)
    device = next(model.parameters()).device
    counts: dict[nn.Module, int] = {}
    layers = [m for m in model.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    was_training = model.training
    model.eval()
    with FlopCounterMode(display=False) as counter:
        def before(module: nn.Module, _args: object) -> None:
            counts[module] = counts.get(module, 0) - counter.get_total_flops()

        def after(module: nn.Module, _args: object, _out: object) -> None:
            counts[module] += counter.get_total_flops()

        hooks = [h for m in layers for h in (m.register_forward_pre_hook(before), m.register_forward_hook(after))]
        try:
            with torch.no_grad():
                model(torch.zeros(1, *shape, device=device))
        finally:
            model.train(was_training)
            for h in hooks:
                h.remove()
    return counts, int(counter.get_total_flops())


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in model.parameters())


def deployment_form(model: nn.Module, channels_last: bool = True) -> nn.Module:
    """A copy of ``model`` as it would be deployed: eval mode, BatchNorm folded into the conv,
    and on CPU every conv fused with the ReLU, or residual add (+ ReLU), that follows it.

    Folding uses torch.fx's conv-BN fusion; a model fx cannot trace is kept unfused (with a
    warning). The ReLU and add fusion runs them as oneDNN post-ops inside the convolution (the
    kernels torch.compile's CPU backend uses), which saves one pass over each activation map;
    it computes the same function and falls back to conv + add + relu off CPU. channels_last
    lets oneDNN/cuDNN pick their fastest convolution layouts (faster for every model measured
    in bench/RESULTS.md).
    """
    deployed = copy.deepcopy(model).eval()
    backbone = getattr(model, "backbone_name", None)
    if backbone is not None:
        # A detector does not trace as a whole (torchvision's R-CNN has data-dependent proposal
        # counts), but its backbone does, and that is where the convs and BatchNorms are.
        deployed.set_submodule(backbone, _fused(deployed.get_submodule(backbone)))
    else:
        deployed = _fused(deployed)
    if channels_last:
        deployed = deployed.to(memory_format=torch.channels_last)
    shape = getattr(model, "input_shape", None)
    if shape is not None:  # fx's GraphModule drops plain attributes; latency needs the stamp
        deployed.input_shape = tuple(shape)
    return deployed


def _fused(module: nn.Module) -> nn.Module:
    """``module`` with BatchNorm folded and conv + ReLU / add fused where fx can trace it."""
    from torch.fx.experimental.optimization import fuse

    try:
        fused = fuse(module)
    except Exception as err:  # fx cannot trace data-dependent control flow
        warnings.warn(f"BatchNorm not folded ({type(err).__name__}: {err}); timing the unfused model", stacklevel=3)
        return module
    if _pointwise_fusion_available(fused):
        _fuse_conv_pointwise(fused)
    return fused


class _FusedConv2d(nn.Module):
    """``relu?(conv(x) + other?)`` as one oneDNN convolution with post-ops (CPU, float32).

    Same parameters as the conv it replaces (frozen: a deployment form is not trained).
    Elsewhere (another device or dtype, or an ``other`` that would broadcast) it computes
    the same thing op by op.
    """

    def __init__(self, conv: nn.Conv2d, add: bool, relu: bool):
        super().__init__()
        self.weight = nn.Parameter(conv.weight.detach(), requires_grad=False)  # (C_out, C_in/groups, kH, kW)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach(), requires_grad=False)
        self.stride, self.padding, self.dilation = list(conv.stride), list(conv.padding), list(conv.dilation)
        self.groups, self.add, self.relu = conv.groups, add, relu

    def forward(self, x: Tensor, other: Tensor | None = None) -> Tensor:
        if self._onednn_ok(x, other):
            if other is None:
                return torch.ops.mkldnn._convolution_pointwise(
                    x, self.weight, self.bias, self.padding, self.stride, self.dilation, self.groups,
                    "relu" if self.relu else "none", [], "",
                )
            return torch.ops.mkldnn._convolution_pointwise.binary(
                x, other, self.weight, self.bias, self.padding, self.stride, self.dilation, self.groups,
                "add", None, "relu" if self.relu else None, [], "",
            )
        y = nn.functional.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        if other is not None:
            y = y + other
        return torch.relu(y) if self.relu else y

    def _onednn_ok(self, x: Tensor, other: Tensor | None) -> bool:
        if x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 4 or self.weight.dtype != torch.float32:
            return False
        if other is None:
            return True
        return other.dtype == x.dtype and tuple(other.shape) == self._out_shape(x)  # the op cannot broadcast

    def _out_shape(self, x: Tensor) -> tuple[int, ...]:
        k = self.weight.shape[2:]
        hw = [(n + 2 * p - d * (kk - 1) - 1) // s + 1
              for n, p, d, kk, s in zip(x.shape[2:], self.padding, self.dilation, k, self.stride, strict=True)]
        return (x.shape[0], self.weight.shape[0], *hw)


def _pointwise_fusion_available(model: nn.Module) -> bool:
    params = list(model.parameters())
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
        and bool(params)
        and all(p.device.type == "cpu" for p in params)
    )


def _is_relu(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)) is nn.ReLU
    if node.op == "call_function":
        return node.target in (torch.relu, torch.relu_, nn.functional.relu) and not node.kwargs
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _is_add(node: torch.fx.Node) -> bool:
    import operator

    two_tensors = len(node.args) == 2 and not node.kwargs and all(isinstance(a, torch.fx.Node) for a in node.args)
    if node.op == "call_function":
        return two_tensors and node.target in (operator.add, operator.iadd, torch.add)
    return node.op == "call_method" and node.target in ("add", "add_") and two_tensors


def _only_user(node: torch.fx.Node) -> torch.fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _fuse_conv_pointwise(gm: torch.fx.GraphModule) -> None:
    """Replace conv -> [add] -> [relu] chains of ``gm`` (in place) with ``_FusedConv2d``.

    A chain only fuses when each node is the sole user of the one before, so no
    intermediate result is needed elsewhere; the fused node takes the last node's place.
    """
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or type(gm.get_submodule(node.target)) is not nn.Conv2d:
            continue
        conv = gm.get_submodule(node.target)
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            continue
        chain, other = [node], None
        user = _only_user(node)
        if user is not None and _is_add(user) and user.args[0] is not user.args[1]:
            other = user.args[1] if user.args[0] is node else user.args[0]
            chain.append(user)
            user = _only_user(user)
        if user is not None and _is_relu(gm, user):
            chain.append(user)
        if len(chain) == 1:
            continue
        name = node.target.replace(".", "_") + "_fused"
        gm.add_submodule(name, _FusedConv2d(conv, add=other is not None, relu=_is_relu(gm, chain[-1])))
        with gm.graph.inserting_after(chain[-1]):
            fused = gm.graph.call_module(name, (node.args[0],) if other is None else (node.args[0], other))
        chain[-1].replace_all_uses_with(fused)
        for old in reversed(chain):
            gm.graph.erase_node(old)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()


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
    net = model if _on_device(model, device) else copy.deepcopy(model).to(device)
    if deploy:
        net = deployment_form(net, channels_last)  # built on the device: its fusions depend on it
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
