"""Greedy CAR: Abbasi-Asl and Yu's (2017) structural pruning, one filter at a time.

Within a unit, remove the filter whose removal lowers classification accuracy the least,
re-score the remaining filters on the pruned network, repeat until the unit's target. The
one-shot ``car`` criterion scores every filter once on the unpruned network; the paper's
algorithm re-scores after every removal (``rescore_every=r`` re-scores after every r
removals: the r best of one scoring go in order, so ``r >= n_remove`` is one-shot CAR).

The order is lexicographic in (wrong predictions, summed loss) of the ablated network on
the scoring images, i.e. the accuracy drop, ties broken by the loss increase of the same
ablation, as in ``trainables.criteria.car``. Only candidates equal in both (two dead filters)
fall back to the lower original index. The loss of an image is ``loss_fn`` on that image's
logits alone, and a candidate's loss is the double sum of those per-image values in the
order of the scoring images, so it does not depend on how the images are batched.

"RAR" (the paper's regression variant, ranking by the increase of a regression error) is
not applicable here: every model of ``trainables.core.models`` is a classifier.

Exact and fast
--------------
``greedy_car_order_naive`` is the reference: per step, per remaining candidate, a masked
copy of the model and a full evaluation, O(n^2) evaluations per unit. ``greedy_car_order``
returns the same order (the tests and ``bench/greedy_car.py`` assert it) with far fewer
operations:

- Cached upstream. Masking the unit's filters changes nothing before its activation, so
  the network is split (``torch.fx``) into a head that runs once per image for the whole
  unit and a tail that runs per ablation. The cache holds every head value the tail reads:
  the unit's unmasked activations and any tensor that bypasses the unit (a residual skip),
  so skip connections need no special case. The cut is moved past channel-wise ops that
  keep a zeroed channel zero (ReLU, pooling), so those run once per image too. Where the
  model does not trace, or the split does not reproduce the model bit for bit, hooks on
  the full model mask each row (nothing cached).
- Batched ablations: one forward of the tail takes up to ``MAX_ROWS`` rows, each a
  (candidate, image) pair with its own mask on the unit's activation (no library does
  batched single-filter ablation, hence the hand-written split and masks).
- Only after the next conv (screening). Where the unit's activation feeds one plain conv
  alone (a first layer: conv, BN, ReLU, pool, conv; the first conv of a residual block),
  removing filter j subtracts channel j's share from that conv's output, which is computed
  once per step: per row a 1/C-sized matmul replaces the conv, its BN is folded into the
  share, later conv+BN pairs are fused, and the rest runs channels-last
  (``_DeltaEvaluator``). That changes float rounding, so screened values carry bounds: eps,
  32 times the largest logit error measured against the exact tail on a sample, puts a
  prediction whose top two logits lie within 2 eps "in doubt" and bounds each loss's error
  by 2 eps (cross-entropy; a custom ``loss_fn`` is never screened). Decisions use only the
  bounds; where they cannot decide (equal wrong counts with losses within the summed error,
  or a prediction in doubt), the candidates concerned are evaluated exactly (the split
  above), so ties in accuracy, broken by loss, come out as in the naive loop. A screened
  value found outside its bound there (never seen) switches the unit to exact evaluations,
  with a warning.
- Best first (early stopping). Each candidate's evaluated images give a lower bound of its
  final (wrong, loss, index) key: wrong predictions and (cross-entropy being non-negative)
  loss only grow. The candidate with the least finished key is taken once it is below
  every other's lower bound; until then the candidates that could still beat it and have
  the fewest wrong so far advance by ``_BLOCK`` images each, in one batch (the likeliest
  best by ``_LEAD`` blocks, to set a bar sooner). A candidate is evaluated only while it
  could still win. Its images go hardest first (highest loss of the current network),
  those it got wrong in the last scoring before all. A candidate is ruled out by the images it
  gets wrong, so the share of candidate x image pairs evaluated follows the model's error
  rate: on small_cnn's first layer 15% for a base with 10% errors on the scoring images, 21%
  for one with 14% (the fewest any exact method could evaluate, knowing every outcome in
  advance: 12% and 17%; ``bench/greedy_car.py --floor``).
- Re-scoring only the tail: after a removal the cache stays valid and the winner's
  evaluation is the next step's current network; only retraining between steps
  (``retrain``) changes the weights upstream, and rebuilds the cache.
- Measured (``bench/RESULTS.md``, 1 thread, 2-core CPU): 61x on a deeper 64-filter unit;
  on a 32-filter first layer 10.1-10.3x for a base trained as the project trains them (256
  images, 8 steps; 8.6-8.9x at 256 images, 16 steps; 7.5-9.2x at 512 images, 16 steps) and
  6.7x for a weaker one. A first layer gains least: per row the three convs after the next
  one still run (at the CPU's fp32 peak, 80% of the time).

Identity with the naive order needs each image's logits from the exact paths to be the
same bits whatever the batch around it: true of PyTorch's CPU kernels for batches of 2 or
more images (a batch of one may take another path); on GPUs it depends on the kernels chosen.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import operator
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainables.core.surgery import Unit, describe_units, mask_filters, prune_layer
from trainables.criteria import device_of, hooked
from trainables.protocol.config import require, require_int

__all__ = ["greedy_car_order", "greedy_car_order_naive", "greedy_prune_unit"]

LossFn = Callable[[Tensor, Tensor], Tensor]
Batches = Sequence[tuple[Tensor, Tensor]]
MAX_ROWS = 128  # rows (candidate x image pairs) of one tail forward: on CPU 128 ran about 1.7x
# faster per row than 512 (the activations stay in cache)
_CACHE_LIMIT_BYTES = 2 << 30  # above this the head's outputs are not cached (hooks instead)
_BLOCK = 4  # images a candidate advances by per forward
_LEAD = 3  # blocks the likeliest best candidate advances by per forward
_LOSS_TOL = 1e-9  # relative slack of the loss bound: partial sums are added in another order
_SAFETY = 32  # eps = this many times the largest screening error measured on a sample
_ULPS = 2.0**-20  # a floor of eps, relative to the logits' size, and the loss's own rounding
_MAX_SCREEN_ERR = 1e-3  # a screening error above this (relative to the logits) means a misread structure


# ---- per-image outcome and the candidate's score ----

def _per_image_loss(logits: Tensor, y: Tensor, loss_fn: LossFn | None) -> Tensor:
    """Loss of each row on its own, (R,) float32: ``loss_fn`` applied per image (vmap)."""
    if loss_fn is None:
        return F.cross_entropy(logits, y, reduction="none").float()
    return torch.vmap(lambda row, t: loss_fn(row.unsqueeze(0), t.unsqueeze(0)))(logits, y).float()


def _outcome(logits: Tensor, y: Tensor, loss_fn: LossFn | None) -> tuple[Tensor, Tensor]:
    """Per image: wrong (bool) and loss (float32); ``logits`` (..., R, classes), ``y`` (R,)."""
    flat = logits.reshape(-1, logits.shape[-1])
    ys = y.repeat(flat.shape[0] // len(y))
    wrong = (flat.argmax(dim=-1) != ys).view(logits.shape[:-1])
    return wrong, _per_image_loss(flat, ys, loss_fn).view(logits.shape[:-1])


def _score(wrong: Tensor, loss: Tensor) -> tuple[int, float]:
    """(wrong predictions, summed loss) over all images, in image order: what greedy minimises."""
    return int(wrong.sum()), float(loss.double().sum())


def _pick(scores: dict[int, tuple[int, float]], need: int) -> list[int]:
    """The ``need`` best candidates, best first: fewest wrong, then least loss, then index."""
    return sorted(scores, key=lambda j: (*scores[j], j))[:need]


# ---- checks ----

def _check(model: nn.Module, unit_name: str, batches: Batches, n_remove: int, rescore_every: int,
           loss_fn: LossFn | None) -> Unit:
    units = {u.name: u for u in describe_units(model)}
    if unit_name not in units:
        raise ValueError(f"unit_name must be one of {', '.join(units)}, but got {unit_name!r}")
    unit = units[unit_name]
    require_int("n_remove", n_remove, 0)
    require(n_remove < unit.n_filters, "n_remove", f"below the unit's {unit.n_filters} filters", n_remove)
    require_int("rescore_every", rescore_every, 1)
    require(loss_fn is None or callable(loss_fn), "loss_fn", "None or a callable (logits, labels) -> loss", loss_fn)
    require(isinstance(batches, Sequence) and len(batches) > 0, "batches", "a non-empty list of (images, labels)",
            type(batches).__name__)
    for x, y in batches:
        require(isinstance(x, Tensor) and isinstance(y, Tensor) and len(x) == len(y) > 0, "batches",
                "(images, labels) pairs of equal, non-zero length", (getattr(x, "shape", x), getattr(y, "shape", y)))
    return unit


def _resized(unit: Unit, n: int) -> Unit:
    return dataclasses.replace(unit, n_filters=n)  # keeps every field (channel_groups, others)


# ---- the naive reference ----

@torch.no_grad()
def greedy_car_order_naive(model: nn.Module, unit_name: str, batches: Batches, *, n_remove: int,
                           rescore_every: int = 1, loss_fn: LossFn | None = None) -> list[int]:
    """Reference greedy CAR (tests and benchmarks): per step, for each remaining filter, a
    masked copy of the model and a full evaluation. Same result as ``greedy_car_order``."""
    unit = _check(model, unit_name, batches, n_remove, rescore_every, loss_fn)
    device = device_of(model)
    data = [(x.to(device), y.to(device)) for x, y in batches]
    removed: list[int] = []
    while len(removed) < n_remove:
        scores = {}
        for j in (j for j in range(unit.n_filters) if j not in removed):
            keep = [i for i in range(unit.n_filters) if i not in removed and i != j]
            scores[j] = _score(*ablated_outcome(model, unit, keep, data, loss_fn))
        removed += _pick(scores, min(rescore_every, n_remove - len(removed)))
    return removed


@torch.no_grad()
def ablated_outcome(model: nn.Module, unit: Unit, keep: list[int], data: Batches,
                    loss_fn: LossFn | None = None) -> tuple[Tensor, Tensor]:
    """Per image of ``data``, in order: wrong (bool) and loss (float32) of a copy of ``model``
    with only the filters ``keep`` of ``unit`` left (the rest masked): one naive evaluation."""
    ablated = copy.deepcopy(model).eval()
    mask_filters(ablated, unit, keep)
    outcomes = [_outcome(ablated(x), y, loss_fn) for x, y in data]
    return torch.cat([w for w, _ in outcomes]), torch.cat([lo for _, lo in outcomes])


# ---- evaluators: logits of rows (candidate, image), each row with its own mask on the unit ----
#
# Every evaluator answers ``logits(base, cands, idx) -> (R, classes)``: row r is image ``idx[r]``
# through the network masked by ``base`` (C,) and, where ``cands[r] >= 0``, with filter
# ``cands[r]`` removed as well (-1: the network masked by ``base`` alone).

def _row_masks(base: Tensor, cands: Tensor) -> Tensor:
    """(R, C): ``base`` per row, with the row's candidate zeroed."""
    masks = base.repeat(len(cands), 1)
    rows = (cands >= 0).nonzero().flatten()
    masks[rows, cands[rows]] = 0
    return masks


class _HookEvaluator:
    """The full model with a hook that multiplies each row's activation by the row's mask:
    nothing cached, every row runs the whole network. The fallback where fx cannot split."""

    exact = True

    def __init__(self, model: nn.Module, unit: Unit, images: Tensor):
        self.model, self.unit, self.images = model, unit, images

    def logits(self, base: Tensor, cands: Tensor, idx: Tensor) -> Tensor:
        masks = _row_masks(base, cands)

        def hook(_: int, out: Tensor) -> Tensor:
            return out * masks.view(*masks.shape, *([1] * (out.dim() - 2)))

        with hooked(self.model, self.unit.act_points, hook):
            return self.model(self.images[idx])


class _SplitEvaluator:
    """The model split by ``torch.fx`` at the unit: a head (everything the unit's masks cannot
    change) run once over all images and cached, and a tail run per batch of rows.

    The tail's inputs are the cached head values it reads (gathered per row when they have a
    batch dimension) and a row mask; every activation point of the unit in the tail is
    multiplied by the row mask (a residual unit's later points lie downstream of its first).
    """

    exact = True

    def __init__(self, model: nn.Module, unit: Unit, images: Tensor, batches: Batches):
        import torch.fx as fx

        gm = fx.symbolic_trace(model)
        graph = gm.graph
        acts = [n for n in graph.nodes if n.op == "call_module" and n.target in unit.act_points]
        if sorted(n.target for n in acts) != sorted(unit.act_points):
            raise RuntimeError("an activation point is called more or less than once")
        inner = [a for a in acts if a in _descendants(acts)]  # a residual unit's later points
        # Masking commutes with channel-wise ops that keep a zero channel zero (ReLU, pooling):
        # the cut moves past them, so they run once per image instead of once per row.
        cuts = [_past_channelwise(gm, a) for a in acts if a not in inner]
        tail = _descendants(cuts)
        frontier = [n for n in graph.nodes if n not in tail and n.op != "get_attr"
                    and any(u in tail for u in n.users)]
        self.masked = [n in cuts for n in frontier]  # masked on entry; the inner points inside the tail
        self.gm, self.frontier, self.tail_nodes, self.cuts, self.inner = gm, frontier, tail, cuts, inner
        self.head = self._head_module(model, graph, frontier, tail)
        self.tail = self._tail_module(model, graph, frontier, tail, cuts + inner)
        self._cache(batches, images)

    @staticmethod
    def _head_module(model: nn.Module, graph, frontier: list, tail: set) -> nn.Module:
        import torch.fx as fx

        head, env = fx.Graph(), {}
        for n in graph.nodes:  # everything the unit's masks cannot change (no such node reads a tail node)
            if n.op != "output" and n not in tail:
                env[n] = head.node_copy(n, lambda a: env[a])
        head.output(tuple(env[n] for n in frontier))
        module = fx.GraphModule(model, head)
        module.graph.eliminate_dead_code()  # what only the tail's branch needed
        module.recompile()
        return module

    @staticmethod
    def _tail_module(model: nn.Module, graph, frontier: list, tail: set, acts: list) -> nn.Module:
        import torch.fx as fx

        out, env = fx.Graph(), {}
        inputs = {n: out.placeholder(f"in_{i}") for i, n in enumerate(frontier)}
        row_mask = out.placeholder("row_mask")
        for n in graph.nodes:
            if n in inputs:
                env[n] = out.call_function(operator.mul, (inputs[n], row_mask)) if n in acts else inputs[n]
            elif n.op == "get_attr" and any(u in tail for u in n.users):
                env[n] = out.node_copy(n, lambda a: env[a])
            elif n in tail:
                copied = out.node_copy(n, lambda a: env[a])
                env[n] = out.call_function(operator.mul, (copied, row_mask)) if n in acts else copied
        return fx.GraphModule(model, out)

    @torch.no_grad()
    def _cache(self, batches: Batches, images: Tensor) -> None:
        device = images.device
        outs = [self.head(x.to(device)) for x, _ in batches]  # the caller's batches: the naive's grouping
        sizes = [len(x) for x, _ in batches]
        # A value has a batch dimension when its first size follows the batch's (probed on two sizes).
        probe = [self.head(images[:2]), self.head(images[:3])] if len(images) >= 3 else None
        self.batched = []
        for i in range(len(outs[0])):
            v = outs[0][i]
            if not isinstance(v, Tensor):
                raise RuntimeError("the tail reads a non-tensor value computed before the unit")
            batched = probe is not None and probe[0][i].shape[:1] == (2,) and probe[1][i].shape[:1] == (3,)
            if probe is None:
                batched = all(o[i].shape[:1] == (s,) for o, s in zip(outs, sizes, strict=True))
            self.batched.append(batched)
        self.values = [torch.cat([o[i] for o in outs]) if b else outs[0][i] for i, b in enumerate(self.batched)]

    @staticmethod
    def cache_bytes(model: nn.Module, unit: Unit, images: Tensor) -> int:
        """A rough size of the cache: the unit's activations for every image (the skip tensors
        are of the same order)."""
        sizes = []
        with hooked(model, unit.act_points[:1], lambda _k, out: sizes.append(out[0].numel())), torch.no_grad():
            model(images[:2])
        return 2 * sizes[0] * images.element_size() * len(images) * len(unit.act_points)

    def logits(self, base: Tensor, cands: Tensor, idx: Tensor) -> Tensor:
        args = [v.index_select(0, idx) if b else v for v, b in zip(self.values, self.batched, strict=True)]
        act_dims = next(v.dim() for v, masked in zip(self.values, self.masked, strict=True) if masked)
        masks = _row_masks(base, cands)
        return self.tail(*args, masks.view(*masks.shape, *([1] * (act_dims - 2))))


class _NoDelta(Exception):
    """The structure after the unit does not allow ``_DeltaEvaluator`` (a reason, for debugging)."""


class _DeltaEvaluator:
    """Approximate logits for screening, from a ``_SplitEvaluator`` whose cut (the unit's
    activation after channel-wise ops) feeds one plain conv and nothing else.

    Removing filter j zeroes channel j of that activation, so the next conv's output with j
    removed is its output without (computed once per ``base``) minus channel j's share,
    ``conv(a_j, W[:, j])`` without bias: 1/C of the conv per row, one small matmul per row
    here (unfold + baddbmm). The BN after the conv, if any, is folded into that share (it is
    affine per channel), later conv+BN pairs are fused, and the rest runs channels-last. Per
    row only the network after the next conv (and its BN) runs.

    The result differs from the masked network's by float rounding (another order of the
    same sums), never bit for bit: ``_Race`` bounds that error and decides near-ties with
    the exact evaluator.
    """

    exact = False

    def __init__(self, split: _SplitEvaluator):
        import torch.fx as fx
        from torch.fx.experimental.optimization import fuse

        conv_node, bn_node, conv, bn = self._next_conv(split)
        start = bn_node or conv_node
        sub_nodes = split.tail_nodes - {conv_node, bn_node}
        graph, env = fx.Graph(), {}
        env[start] = graph.placeholder("pre")
        others = [i for i, n in enumerate(split.frontier) if any(u in sub_nodes for u in n.users)]
        if any(split.masked[i] for i in others):
            raise _NoDelta("the unit's activation is read after the next conv too")
        for i in others:
            env[split.frontier[i]] = graph.placeholder(f"in_{i}")
        for n in split.gm.graph.nodes:
            if n in env:
                continue
            if n in sub_nodes or (n.op == "get_attr" and any(u in sub_nodes for u in n.users)):
                env[n] = graph.node_copy(n, lambda a: env[a])
        self.rest = fuse(fx.GraphModule(split.gm, graph), no_trace=True).to(memory_format=torch.channels_last)
        self.others = [(split.values[i], split.batched[i]) for i in others]
        self.act = split.values[split.masked.index(True)]  # (N, C, H, W), unmasked
        self.conv, self.bn = conv, bn
        scale = torch.ones(conv.out_channels, device=self.act.device, dtype=self.act.dtype)
        if bn is not None:
            scale = torch.rsqrt(bn.running_var + bn.eps) * (bn.weight if bn.affine else 1)
        c, k = conv.in_channels, conv.kernel_size[0] * conv.kernel_size[1]
        share = (conv.weight * scale.view(-1, 1, 1, 1)).reshape(-1, c, k).permute(1, 2, 0)  # (C, K, O)
        zero = torch.zeros_like(share[:1])  # the share of "no filter removed" (row -1)
        self.neg_shares = torch.cat([-share, zero]).contiguous()  # (C + 1, K, O)
        self._base: Tensor | None = None

    @staticmethod
    def _next_conv(split: _SplitEvaluator):
        """(conv node, BN node or None, conv, BN or None): the plain conv that alone reads the
        cut, and the eval-mode BN that alone reads that conv, if any; else ``_NoDelta``."""
        if split.inner or len(split.cuts) != 1:
            raise _NoDelta("a unit with several activation points")
        (cut,) = split.cuts
        users = list(cut.users)
        module = split.gm.get_submodule(users[0].target) if len(users) == 1 and users[0].op == "call_module" else None
        if not (isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros"
                and not isinstance(module.padding, str) and users[0].args == (cut,) and not users[0].kwargs):
            raise _NoDelta("the unit's activation does not feed one plain conv alone")
        conv_node = users[0]
        users = list(conv_node.users)
        bn = split.gm.get_submodule(users[0].target) if len(users) == 1 and users[0].op == "call_module" else None
        if isinstance(bn, nn.BatchNorm2d) and not bn.training and bn.running_var is not None:
            return conv_node, users[0], module, bn
        return conv_node, None, module, None

    @torch.no_grad()
    def _prepare(self, base: Tensor) -> None:
        """The next conv's output (and BN) on the activation masked by ``base``, channels-last."""
        if self._base is not None and torch.equal(self._base, base):
            return
        shaped = base.view(1, -1, *([1] * (self.act.dim() - 2)))
        pre = []
        for s in range(0, len(self.act), MAX_ROWS):
            out = self.conv((self.act[s : s + MAX_ROWS] * shaped).contiguous(memory_format=torch.channels_last))
            pre.append((self.bn(out) if self.bn is not None else out).permute(0, 2, 3, 1))
        self.pre = torch.cat(pre)  # (N, H', W', O)
        self._base = base.clone()

    def logits(self, base: Tensor, cands: Tensor, idx: Tensor) -> Tensor:
        self._prepare(base)
        conv, r = self.conv, len(idx)
        cands = torch.where(base[cands.clamp(min=0)] != 0, cands, -1)  # a filter masked already has no share left
        channel = self.act[idx, cands.clamp(min=0)].unsqueeze(1)  # (R, 1, H, W): the removed channel
        cols = F.unfold(channel, conv.kernel_size, conv.dilation, conv.padding, conv.stride)  # (R, K, L)
        shares = self.neg_shares[torch.where(cands >= 0, cands, len(self.neg_shares) - 1)]  # (R, K, O)
        pre = self.pre.index_select(0, idx)  # (R, H', W', O); index_select: several times faster than pre[idx]
        pre.view(r, -1, pre.shape[-1]).baddbmm_(cols.transpose(1, 2), shares)  # (R, L, O) += (R, L, K) @ (R, K, O)
        args = [v.index_select(0, idx) if b else v for v, b in self.others]
        return self.rest(pre.permute(0, 3, 1, 2), *args)


_CHANNELWISE = (nn.ReLU, nn.ReLU6, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
                 nn.Dropout, nn.Identity)  # per channel, and an all-zero channel stays all zero


def _descendants(nodes: list) -> set:
    """Every fx node that reads, directly or not, one of ``nodes`` (not the nodes themselves)."""
    found: set = set()
    stack = [u for n in nodes for u in n.users]
    while stack:
        n = stack.pop()
        if n not in found:
            found.add(n)
            stack.extend(n.users)
    return found


def _past_channelwise(gm: nn.Module, node):
    """The last node of the chain of single-input channel-wise ops that alone read ``node``."""
    while len(node.users) == 1:
        user = next(iter(node.users))
        relu = (user.op == "call_function" and user.target in (torch.relu, F.relu)) or (
            user.op == "call_method" and user.target == "relu")
        module = user.op == "call_module" and isinstance(gm.get_submodule(user.target), _CHANNELWISE)
        if not (relu or module) or user.all_input_nodes != [node]:
            break
        node = user
    return node


def _evaluators(model: nn.Module, unit: Unit, images: Tensor, batches: Batches, loss_fn: LossFn | None):
    """(screening, exact) evaluators. Exact: the cached split where it is valid and
    reproduces the model bit for bit, else hooks on the full model. Screening: the delta
    evaluator where the structure allows it and the loss is cross-entropy (whose error
    bound follows from the logits'), else the exact one."""
    exact: _HookEvaluator | _SplitEvaluator = _HookEvaluator(model, unit, images)
    try:
        if _SplitEvaluator.cache_bytes(model, unit, images) > _CACHE_LIMIT_BYTES:
            raise RuntimeError("cache too large")
        split = _SplitEvaluator(model, unit, images, batches)
        ones = torch.ones(unit.n_filters, device=images.device)
        idx = torch.arange(min(len(images), 64), device=images.device)
        with torch.no_grad():
            if torch.equal(split.logits(ones, torch.full_like(idx, -1), idx), model(images[idx])):
                exact = split
    except Exception:  # noqa: BLE001  an untraceable model is not an error: hooks work on any forward
        pass
    if not isinstance(exact, _SplitEvaluator) or loss_fn is not None:
        return exact, exact
    try:
        return _DeltaEvaluator(exact), exact
    except Exception:  # noqa: BLE001  _NoDelta, or a graph fx cannot fuse: screen exactly
        return exact, exact


# ---- one scoring: the `need` best candidates, best first ----

class _BoundBroken(Exception):
    """The screening's error exceeded its calibrated bound (never seen; the race falls back)."""


class _Race:
    """Finds the ``need`` best candidates under the current mask without evaluating every
    candidate on every image (see the module docstring); the result is exact.

    Each candidate holds a prefix of the image order (hardest first) evaluated so far and,
    from it, a lexicographic lower bound of its final key (wrong, loss, index); a finished
    candidate also has an upper bound (equal to the lower one when evaluated exactly). The
    candidate with the least upper bound is chosen once it is below every other's lower
    bound; until then the unfinished candidates that could still beat it and have the fewest
    wrong predictions so far advance by one block (best first), or, when only finished
    screened ones are in doubt, those are evaluated exactly.
    """

    def __init__(self, screen, exact, labels: Tensor, loss_fn: LossFn | None, max_rows: int):
        self.screen, self.exact, self.labels, self.loss_fn = screen, exact, labels, loss_fn
        self.max_rows = max_rows
        self.loss_bound = loss_fn is None  # cross-entropy: per-image losses >= 0, partial sums only grow
        self.eps: float | None = None  # bound on |screened - exact| logits, once calibrated
        self.prior: dict[int, Tensor] = {}  # per candidate, the images found wrong in the last scoring

    def exact_only(self) -> _Race:
        return _Race(self.exact, self.exact, self.labels, self.loss_fn, self.max_rows)

    @torch.no_grad()
    def _rows(self, ev, base: Tensor, cands: Tensor, idx: Tensor,
              chunk: int | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per row (candidate ``cands[r]``, image ``idx[r]``): wrong (bool), loss (float32), and
        for a screening evaluator whether the prediction is in doubt and the loss's error
        bound (float64); forwards of ``chunk`` rows (default ``max_rows``)."""
        chunk = chunk or self.max_rows
        starts = list(range(0, len(idx), chunk))
        if len(starts) > 1 and len(idx) - starts[-1] == 1:  # never a one-row forward (other kernels)
            starts.pop()
        outs = []
        for s, e in zip(starts, [*starts[1:], len(idx)], strict=True):
            logits = ev.logits(base, cands[s:e], idx[s:e])
            w, lo = _outcome(logits, self.labels[idx[s:e]], self.loss_fn)
            amb, tol = torch.zeros_like(w), torch.zeros_like(lo, dtype=torch.float64)
            if not ev.exact:  # the argmax is certain when the top two differ by more than 2 eps
                if logits.shape[-1] > 1:
                    top = logits.topk(2, dim=-1).values
                    amb = top[:, 0] - top[:, 1] <= 2 * self.eps
                tol = (2 * self.eps + _ULPS * (1 + lo.abs())).double()  # cross-entropy moves at most 2 eps
            outs.append([t.cpu() for t in (w, lo, amb, tol)])
        return tuple(torch.cat(parts) for parts in zip(*outs, strict=True))

    @torch.no_grad()
    def _calibrate(self, base: Tensor, cands: list[int]) -> None:
        """eps: ``_SAFETY`` times the largest |screened - exact| logit on a sample of rows.
        A screening far off the exact network (a structure the delta misreads) is dropped."""
        n, dev = len(self.labels), self.labels.device
        picks = [-1, *cands[:: max(1, len(cands) // 4)][:4]]
        m = min(n, 24)
        cand_rows = torch.tensor(picks, device=dev).repeat_interleave(m)
        idx = torch.arange(m, device=dev).repeat(len(picks))
        approx, exact = self.screen.logits(base, cand_rows, idx), self.exact.logits(base, cand_rows, idx)
        err, scale = float((approx - exact).abs().max()), float(exact.abs().max())
        if not math.isfinite(err) or err > _MAX_SCREEN_ERR * (1 + scale):
            self.screen = self.exact
            return
        self.eps = max(_SAFETY * err, _ULPS * (1 + scale))

    def current_loss(self, base: Tensor) -> Tensor:
        """Per-image loss (N,) of the network masked by ``base`` alone (screened)."""
        n = len(self.labels)
        idx = torch.arange(n, device=self.labels.device)
        return self._rows(self.screen, base, torch.full_like(idx, -1), idx)[1]

    def best(self, base: Tensor, cands: list[int], need: int,
             current: Tensor | None = None) -> tuple[list[int], Tensor]:
        """The ``need`` best of ``cands``, best first, exactly as ``_pick`` over full exact
        evaluations would choose, and the first one's per-image losses (screened).

        ``current``: the per-image losses of the network masked by ``base`` (evaluated when
        None); images go hardest (highest loss) first.
        """
        if not self.screen.exact and self.eps is None:
            self._calibrate(base, cands)
        current = self.current_loss(base) if current is None else current
        return _Scoring(self, base, cands, torch.argsort(current.cpu(), descending=True, stable=True)).run(need)


class _Scoring:
    """The state of one ``_Race.best``: per candidate, a prefix of its image order evaluated.

    A candidate's order is the images it got wrong in the last scoring (those are the likeliest
    wrong again, and wrong predictions are what rule a candidate out), then the rest, each
    part hardest first."""

    def __init__(self, race: _Race, base: Tensor, cands: list[int], order: Tensor):
        self.race, self.base, self.cands = race, base, cands
        k, n = len(cands), len(order)
        self.n = n
        rank = torch.empty(n, dtype=torch.long)
        rank[order] = torch.arange(n)
        known = torch.stack([race.prior.get(j, torch.zeros(n, dtype=torch.bool)) for j in cands])
        self.orders = torch.argsort(rank + n * (~known).long(), dim=1)  # (k, n) image indices
        self.wrong = torch.zeros(k, n, dtype=torch.bool)  # per candidate, per image (image order)
        self.amb = torch.zeros(k, n, dtype=torch.bool)
        self.loss = torch.zeros(k, n, dtype=torch.float32)
        self.tol = torch.zeros(k, n, dtype=torch.float64)
        self.seen = [0] * k  # evaluated prefix of the candidate's order
        self.exact = [race.screen.exact] * k
        self.sure, self.maybe = [0] * k, [0] * k  # over the prefix: certain and possible wrong predictions
        self.lsum, self.tsum = [0.0] * k, [0.0] * k  # ... and the loss and its error bound, summed
        self.total: list[float] = [math.nan] * k  # finished: the loss summed in image order, as _score

    def lower(self, i: int) -> tuple:
        """A lexicographic lower bound of candidate i's final (wrong, loss, index)."""
        if self.seen[i] == self.n:
            if self.exact[i]:
                return (self.sure[i], self.total[i], self.cands[i])
            return (self.sure[i], self.total[i] - self.tsum[i], -1)
        if not self.race.loss_bound:
            return (self.sure[i], -math.inf, -1)
        return (self.sure[i], (self.lsum[i] - self.tsum[i]) * (1 - _LOSS_TOL) - _LOSS_TOL, -1)

    def upper(self, i: int) -> tuple:
        """A lexicographic upper bound of a finished candidate's final key."""
        if self.seen[i] < self.n:
            return (math.inf,)
        if self.exact[i]:
            return (self.maybe[i], self.total[i], self.cands[i])
        return (self.maybe[i], self.total[i] + self.tsum[i], math.inf)

    def run(self, need: int) -> tuple[list[int], Tensor]:
        live, chosen = list(range(len(self.cands))), []
        while len(chosen) < need:
            best = min((i for i in live if self.seen[i] == self.n), key=self.upper, default=None)
            bar = self.upper(best) if best is not None else (math.inf,)
            blockers = [i for i in live if i != best and not bar < self.lower(i)]
            if best is not None and not blockers:
                chosen.append(best)
                live.remove(best)
                continue
            open_ = [i for i in blockers if self.seen[i] < self.n]
            if open_:  # best first: those with the fewest wrong so far advance
                fewest = min(self.sure[i] for i in open_)
                front = sorted((i for i in open_ if self.sure[i] == fewest), key=self.lower)
                self._advance(front[: max(1, self.race.max_rows // _BLOCK)])
            else:  # only finished, screened candidates are in doubt
                self._verify([i for i in (best, *blockers) if not self.exact[i]])
        self.race.prior = {j: self.wrong[i] for i, j in enumerate(self.cands)}
        return [self.cands[i] for i in chosen], self.loss[chosen[0]]

    def _evaluate(self, ev, spans: list[tuple[int, int, int]]) -> None:
        """Candidate i on images ``orders[i][s:e]`` for each (i, s, e), in one batch of rows."""
        dev = self.race.labels.device
        pos = torch.cat([torch.full((e - s,), i) for i, s, e in spans])
        idx = torch.cat([self.orders[i, s:e] for i, s, e in spans])
        cands = torch.tensor(self.cands)[pos]
        w, lo, amb, tol = self.race._rows(ev, self.base, cands.to(dev), idx.to(dev), len(idx))
        self.wrong[pos, idx], self.loss[pos, idx], self.amb[pos, idx], self.tol[pos, idx] = w, lo, amb, tol
        k = len(spans)
        seg = torch.repeat_interleave(torch.arange(k), torch.tensor([e - s for _, s, e in spans]))
        sums = [torch.zeros(k, dtype=torch.float64).index_add_(0, seg, v.double())
                for v in (w & ~amb, w | amb, lo, tol)]
        for (i, _, e), sure, maybe, loss, err in zip(spans, *(t.tolist() for t in sums), strict=True):
            self.sure[i] += int(sure)
            self.maybe[i] += int(maybe)
            self.lsum[i] += loss
            self.tsum[i] += err
            self.seen[i] = e
            if e == self.n:
                self.total[i] = float(self.loss[i].double().sum())  # image order, as _score

    def _advance(self, front: list[int]) -> None:
        """One forward: each candidate of ``front`` on the next block of its order (the first,
        the least lower bound, on two blocks: a bar sooner)."""
        spans = []
        for r, i in enumerate(front):
            s = self.seen[i]
            e = min(self.n, s + (_LEAD if r == 0 else 1) * _BLOCK)
            if self.n - e == 1 or e - s == 1:  # never a one-image remainder
                e = min(self.n, e + 1)
            spans.append((i, s, e))
        self._evaluate(self.race.screen, spans)

    def _verify(self, ids: list[int]) -> None:
        """Exact evaluations of ``ids`` on every image; their screened values must have kept
        within their bounds (else ``_BoundBroken``)."""
        for i in ids:
            before = (self.wrong[i].clone(), self.loss[i].clone(), self.amb[i].clone(), self.tol[i].clone())
            self.sure[i] = self.maybe[i] = 0
            self.lsum[i] = self.tsum[i] = 0.0
            self.exact[i] = True
            for s in range(0, self.n, self.race.max_rows):  # chunks of max_rows rows; never a one-row one
                e = self.n if self.n - s <= self.race.max_rows + 1 else s + self.race.max_rows
                self._evaluate(self.race.exact, [(i, s, e)])
                if e == self.n:
                    break
            w, lo, amb, tol = before
            if bool(((w != self.wrong[i]) & ~amb).any() or ((lo - self.loss[i]).abs().double() > tol).any()):
                raise _BoundBroken(f"a screened loss or prediction of filter {self.cands[i]} was off by more than "
                                   f"its bound (eps {self.race.eps:.3g})")


# ---- the greedy loop ----

def _stack(batches: Batches, device: torch.device) -> tuple[Tensor, Tensor]:
    return torch.cat([x for x, _ in batches]).to(device), torch.cat([y for _, y in batches]).to(device)


def greedy_prune_unit(model: nn.Module, unit: Unit, batches: Batches, *, n_remove: int, rescore_every: int = 1,
                      loss_fn: LossFn | None = None, retrain: Callable[[nn.Module], None] | None = None,
                      max_rows: int = MAX_ROWS) -> tuple[list[int], list[dict]]:
    """Greedy CAR on ``unit`` of ``model``: the removal order (original indices) and the
    ``prune_layer`` records of what was physically removed (empty without ``retrain``).

    Without ``retrain`` the model is only read (filters are masked on activations). With it,
    after every ``rescore_every`` removals the removed filters are pruned from ``model`` in
    place and ``retrain(model)`` runs before the next scoring (the paper's retraining between
    steps); the caller prunes the rest. The model is scored in eval mode and its mode restored.
    """
    was_training = model.training
    model.eval()
    try:
        return _greedy(model, unit, batches, n_remove, rescore_every, loss_fn, retrain, max_rows)
    finally:
        model.train(was_training)


def _greedy(model: nn.Module, unit: Unit, batches: Batches, n_remove: int, rescore_every: int,
            loss_fn: LossFn | None, retrain: Callable[[nn.Module], None] | None,
            max_rows: int) -> tuple[list[int], list[dict]]:
    device = device_of(model)
    images, labels = _stack(batches, device)
    alive = list(range(unit.n_filters))  # original index of each current filter
    order: list[int] = []
    log: list[dict] = []
    current = unit
    race = None
    masked: list[int] = []  # current indices masked since the last physical pruning
    now = None  # the current network's per-image losses, when known (they only order the images)
    while len(order) < n_remove:
        if race is None:
            race = _Race(*_evaluators(model, current, images, batches, loss_fn), labels, loss_fn, max_rows)
        base = torch.ones(current.n_filters, device=device)
        base[masked] = 0
        cands = [i for i in range(current.n_filters) if i not in masked]
        need = min(rescore_every, n_remove - len(order))
        try:
            chosen, losses = race.best(base, cands, need, now)
        except _BoundBroken as err:
            warnings.warn(f"greedy CAR on {current.name}: {err}; scoring with exact evaluations only from here "
                          "(slower, same order)", RuntimeWarning, stacklevel=3)
            race = race.exact_only()
            chosen, losses = race.best(base, cands, need, now)
        now = losses if need == 1 else None  # with one removal the next network is the winner's
        masked += chosen
        order += [alive[i] for i in chosen]
        if retrain is not None and len(order) < n_remove:
            keep = [i for i in range(current.n_filters) if i not in masked]
            log.append(prune_layer(model, current.name, keep))
            alive = [alive[i] for i in keep]
            current, masked, race, now = _resized(current, len(keep)), [], None, None
            model.train(False)
            retrain(model)
            model.eval()
    return order, log


def greedy_car_order(model: nn.Module, unit_name: str, batches: Batches, *, n_remove: int,
                     rescore_every: int = 1, loss_fn: LossFn | None = None) -> list[int]:
    """The filters of ``unit_name`` (original indices) in the order greedy CAR removes them.

    ``batches``: (images, labels) scoring batches, validation images, never test.
    ``n_remove`` filters go, 0 <= n_remove < the unit's filters; after every
    ``rescore_every`` removals the remaining ones are re-scored on the pruned network.
    ``loss_fn(logits, labels) -> mean loss`` (default cross-entropy) breaks ties in accuracy,
    applied to each image alone. The model is not modified (its train/eval mode is restored).
    Works on any classifier's units, e.g. the first conv layer (``describe_units``' first).
    """
    unit = _check(model, unit_name, batches, n_remove, rescore_every, loss_fn)
    return greedy_prune_unit(model, unit, batches, n_remove=n_remove, rescore_every=rescore_every,
                             loss_fn=loss_fn)[0]
