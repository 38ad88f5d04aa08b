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
not applicable here: every model of ``trainables.models`` is a classifier.

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
  so skip connections need no special case. Where the model does not trace, or the split
  does not reproduce the model bit for bit, it falls back to hooks on the full model
  (``car``'s batch expansion, nothing cached).
- Batched ablations: k candidates share one forward of the tail, on k x b rows, each copy
  with its own mask on the unit's activation (no library does batched single-filter
  ablation, hence the hand-written split and masks).
  The cut is moved past channel-wise ops that keep a zeroed channel zero (ReLU, pooling),
  so those run once per image too.
- Early stopping (racing). The images are evaluated hardest first (highest loss of the
  current network), in blocks of 16. The last scoring's runners-up lead (evaluated in full
  first); a candidate with fewer wrong predictions so far than the bar (the r-th best
  finished candidate) is evaluated in full too; every other one is dropped as soon as its
  wrong count so far exceeds the bar's total (or, for cross-entropy, whose per-image losses
  are non-negative, equals it with a larger loss so far). A dropped candidate is strictly
  worse than r finished ones, so the chosen r are exactly the naive ones.
- Re-scoring only the tail: after a removal the cache stays valid and the winner's
  evaluation is the next step's current network; only retraining between steps
  (``retrain``) changes the weights upstream, and rebuilds the cache.
- Measured (``bench/RESULTS.md``): 12.8x on a deeper 64-filter unit, 5.8x on a first layer,
  where every ablation runs the whole network and only the early stop saves work.

Identity with the naive order needs each image's logits to be the same bits whatever the
batch around it: true of PyTorch's CPU kernels for batches of 2 or more images (a batch of
one may take another path); on GPUs it depends on the kernels chosen.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainables.config import require, require_int
from trainables.criteria._base import device_of, hooked
from trainables.criteria.car import _needs_input_expansion
from trainables.surgery import Unit, describe_units, mask_filters, prune_layer

__all__ = ["greedy_car_order", "greedy_car_order_naive", "greedy_prune_unit"]

LossFn = Callable[[Tensor, Tensor], Tensor]
Batches = Sequence[tuple[Tensor, Tensor]]
MAX_ROWS = 512  # largest expanded batch (candidates x images) of one tail forward: larger ones\n# ran slower per row on CPU (activations fall out of cache)
_CACHE_LIMIT_BYTES = 2 << 30  # above this the head's outputs are not cached (hooks instead)
_BLOCK = 16  # images per racing block
_LOSS_TOL = 1e-9  # relative slack of the loss bound: partial sums are added in another order


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
    return Unit(unit.name, unit.convs, unit.act_points, unit.bns, n)


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
            ablated = copy.deepcopy(model).eval()
            mask_filters(ablated, unit, [i for i in range(unit.n_filters) if i not in removed and i != j])
            outcomes = [_outcome(ablated(x), y, loss_fn) for x, y in data]
            scores[j] = _score(torch.cat([w for w, _ in outcomes]), torch.cat([lo for _, lo in outcomes]))
        removed += _pick(scores, min(rescore_every, n_remove - len(removed)))
    return removed


# ---- evaluators: logits of the network with a mask on the unit, per candidate ----

class _HookEvaluator:
    """The full model with ``car``'s hooks: the batch is expanded at the unit (or at the input
    when a skip path meets the unit again) and copy j is masked with mask j. Nothing cached."""

    def __init__(self, model: nn.Module, unit: Unit, images: Tensor):
        self.model, self.unit, self.images = model, unit, images
        self.expand_input = _needs_input_expansion(model, unit, images[: min(2, len(images))])

    def logits(self, masks: Tensor, idx: Tensor) -> Tensor:
        """(k, m, classes) for masks (k, C) on images ``idx`` (m,)."""
        k, x = len(masks), self.images[idx]
        b = len(x)

        def hook(_: int, out: Tensor) -> Tensor:
            if out.shape[0] == b:  # first point reached (or input not expanded): expand
                out = out.repeat(k, *([1] * (out.dim() - 1)))
            shaped = out.view(k, b, *out.shape[1:])
            return (shaped * masks.view(k, 1, -1, *([1] * (out.dim() - 2)))).view_as(out)

        with hooked(self.model, self.unit.act_points, hook):
            xin = x.repeat(k, *([1] * (x.dim() - 1))) if self.expand_input else x
            return self.model(xin).view(k, b, -1)


class _SplitEvaluator:
    """The model split by ``torch.fx`` at the unit: a head (everything the unit's masks cannot
    change) run once over all images and cached, and a tail run per batch of ablations.

    The tail's inputs are the cached head values it reads (each expanded k times when it has
    a batch dimension) and a row mask; every activation point of the unit in the tail is
    multiplied by the row mask (a residual unit's later points lie downstream of its first).
    """

    def __init__(self, model: nn.Module, unit: Unit, images: Tensor, batches: Batches):
        import torch.fx as fx

        gm = fx.symbolic_trace(model)
        graph = gm.graph
        acts = [n for n in graph.nodes if n.op == "call_module" and n.target in unit.act_points]
        if sorted(n.target for n in acts) != sorted(unit.act_points):
            raise RuntimeError("an activation point is called more or less than once")
        inner = [a for a in acts if a in _descendants(acts)]  # a residual unit's later points
        # Masking commutes with channel-wise ops that keep a zero channel zero (ReLU, pooling):
        # the cut moves past them, so they run once per image instead of once per ablation.
        cuts = [_past_channelwise(gm, a) for a in acts if a not in inner]
        tail = _descendants(cuts)
        frontier = [n for n in graph.nodes if n not in tail and n.op != "get_attr"
                    and any(u in tail for u in n.users)]
        self.masked = [n in cuts for n in frontier]  # masked on entry; the inner points inside the tail
        acts = cuts + inner
        self.head = self._head_module(model, graph, frontier, tail)
        self.tail = self._tail_module(model, graph, frontier, tail, acts)
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

    def logits(self, masks: Tensor, idx: Tensor) -> Tensor:
        """(k, m, classes) for masks (k, C) on images ``idx`` (m,)."""
        k, m = len(masks), len(idx)
        args = []
        for v, b in zip(self.values, self.batched, strict=True):
            args.append(v[idx].repeat(k, *([1] * (v.dim() - 1))) if b else v)
        act_dims = next(v.dim() for v, masked in zip(self.values, self.masked, strict=True) if masked)
        row_mask = masks.repeat_interleave(m, dim=0).view(k * m, -1, *([1] * (act_dims - 2)))
        return self.tail(*args, row_mask).view(k, m, -1)


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


def _evaluator(model: nn.Module, unit: Unit, images: Tensor, batches: Batches) -> _HookEvaluator | _SplitEvaluator:
    """The cached split where it is valid and exact, else hooks on the full model."""
    try:
        if _SplitEvaluator.cache_bytes(model, unit, images) > _CACHE_LIMIT_BYTES:
            raise RuntimeError("cache too large")
        split = _SplitEvaluator(model, unit, images, batches)
        ones = torch.ones(1, unit.n_filters, device=images.device)
        idx = torch.arange(min(len(images), 64), device=images.device)
        with torch.no_grad():
            if torch.equal(split.logits(ones, idx)[0], model(images[idx])):
                return split
    except Exception:  # noqa: BLE001  an untraceable model is not an error: hooks work on any forward
        pass
    return _HookEvaluator(model, unit, images)


# ---- one scoring: the `need` best candidates, racing over image blocks ----

class _Race:
    """Finds the ``need`` best candidates under the current mask without evaluating every
    candidate on every image (see the module docstring); the result is exact."""

    def __init__(self, ev, labels: Tensor, loss_fn: LossFn | None, max_rows: int):
        self.ev, self.labels, self.loss_fn, self.max_rows = ev, labels, loss_fn, max_rows
        self.loss_bound = loss_fn is None  # cross-entropy: per-image losses >= 0, partial sums only grow

    @torch.no_grad()
    def _run(self, base: Tensor, cands: list[int], idx: Tensor) -> tuple[Tensor, Tensor]:
        """Wrong (bool) and loss (float32), each (len(cands), len(idx)), with ``cands`` each also masked."""
        per = max(1, self.max_rows // max(1, len(idx)))
        wrong, loss = [], []
        for s in range(0, len(cands), per):
            chunk = cands[s : s + per]
            masks = base.repeat(len(chunk), 1)
            for row, j in enumerate(chunk):
                if j is not None:  # None: the network masked by ``base`` alone
                    masks[row, j] = 0
            w, lo = _outcome(self.ev.logits(masks, idx), self.labels[idx], self.loss_fn)
            wrong.append(w.cpu())
            loss.append(lo.cpu())
        return torch.cat(wrong), torch.cat(loss)

    def _full(self, base: Tensor, cands: list[int], idx: Tensor) -> tuple[Tensor, Tensor]:
        """``_run`` over many images, in pieces of at most ``max_rows`` rows."""
        n = len(idx)
        step = max(2, self.max_rows // max(1, len(cands)))
        parts = [idx[s : s + step] for s in range(0, n, step)]
        if len(parts) > 1 and len(parts[-1]) == 1:  # never a one-image forward (other kernels)
            parts[-2:] = [torch.cat(parts[-2:])]
        outs = [self._run(base, cands, p) for p in parts]
        return torch.cat([w for w, _ in outs], dim=1), torch.cat([lo for _, lo in outs], dim=1)

    def current_loss(self, base: Tensor) -> Tensor:
        """Per-image loss (N,) of the network masked by ``base`` alone."""
        return self._full(base.clone(), [None], torch.arange(len(self.labels), device=self.labels.device))[1][0]

    def best(self, base: Tensor, cands: list[int], need: int, current: Tensor | None = None,
             hint: Sequence[int] = ()) -> tuple[list[int], dict[int, Tensor]]:
        """The fully evaluated candidates, best first (the first ``need`` are the ``need`` best
        of ``cands``, exactly as ``_pick`` over full evaluations would choose), and their
        per-image losses.

        ``current``: the per-image losses of the network masked by ``base`` (evaluated when
        None); images go hardest (highest loss) first. ``hint``: candidates likely to be best
        (the last scoring's order); the first ``need`` are evaluated in full before the race.
        """
        n, k = len(self.labels), len(cands)
        current = self.current_loss(base) if current is None else current
        order = torch.argsort(current.cpu(), descending=True, stable=True)
        blocks = [order[s : s + _BLOCK] for s in range(0, n, _BLOCK)]
        if len(blocks) > 1 and len(blocks[-1]) == 1:  # never a one-image forward (other kernels)
            blocks[-2:] = [torch.cat(blocks[-2:])]
        dev = self.labels.device
        pos = {j: i for i, j in enumerate(cands)}
        wrong = torch.zeros(k, n, dtype=torch.bool)  # per candidate, per image (image order)
        loss = torch.zeros(k, n, dtype=torch.float32)
        finished: dict[int, tuple[int, float]] = {}

        def finish(js: list[int], cols: Tensor) -> None:  # evaluate js on the images cols, then score them
            if js and len(cols):
                w, lo = self._full(base, js, cols.to(dev))
                rows = torch.tensor([pos[j] for j in js]).view(-1, 1)
                wrong[rows, cols.view(1, -1)], loss[rows, cols.view(1, -1)] = w, lo
            finished.update({j: _score(wrong[pos[j]], loss[pos[j]]) for j in js})

        finish([j for j in hint if j in pos][:need], order)
        alive = [j for j in cands if j not in finished]
        seen = 0
        for block in blocks:
            if not alive:
                break
            wb, lb = self._run(base, alive, block.to(dev))
            for i, j in enumerate(alive):
                wrong[pos[j], block], loss[pos[j], block] = wb[i], lb[i]
            seen += len(block)
            done, rest = order[:seen], order[seen:]
            partial = {j: (int(wrong[pos[j], done].sum()), float(loss[pos[j], done].double().sum())) for j in alive}
            # Evaluate the best runner in full while it has fewer wrong than the bar on the images
            # seen so far (or there is no bar yet). Leading on loss alone is common and a poor
            # sign: promoting on it evaluated nearly every candidate in full.
            while alive:
                c = _pick(partial, 1)[0]
                if len(finished) >= need:
                    bar = _pick(finished, need)[-1]
                    bar_partial = (int(wrong[pos[bar], done].sum()),)
                    if not partial[c][0] < bar_partial[0]:
                        break
                finish([c], rest)
                alive.remove(c)
                del partial[c]
            if len(finished) >= need:
                alive = [j for j in alive if not self._beaten(partial[j], finished, need)]
        finish(alive, torch.zeros(0, dtype=torch.long))  # survivors saw every image
        return _pick(finished, len(finished)), {j: loss[pos[j]] for j in finished}

    def _beaten(self, partial: tuple[int, float], finished: dict[int, tuple[int, float]], need: int) -> bool:
        """Whether ``need`` finished candidates are certainly better than one with ``partial``
        (wrong so far, loss so far): its totals can only be larger."""
        bar_wrong, bar_loss = sorted(finished.values())[need - 1]
        e, s = partial
        return e > bar_wrong or (self.loss_bound and e == bar_wrong and s > bar_loss * (1 + _LOSS_TOL) + _LOSS_TOL)


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
    now, hint = None, []  # the current network's per-image losses, when known; the last ranking
    while len(order) < n_remove:
        if race is None:
            race = _Race(_evaluator(model, current, images, batches), labels, loss_fn, max_rows)
        base = torch.ones(current.n_filters, device=device)
        base[masked] = 0
        cands = [i for i in range(current.n_filters) if i not in masked]
        need = min(rescore_every, n_remove - len(order))
        with torch.no_grad():
            ranking, losses = race.best(base, cands, need, now, hint)
        chosen, hint = ranking[:need], ranking[need:]  # the runners-up lead the next race
        # With one removal the next network is the winner's, already evaluated.
        now = losses[chosen[0]] if need == 1 else None
        masked += chosen
        order += [alive[i] for i in chosen]
        if retrain is not None and len(order) < n_remove:
            keep = [i for i in range(current.n_filters) if i not in masked]
            log.append(prune_layer(model, current.name, keep))
            alive = [alive[i] for i in keep]
            current, masked, race, now, hint = _resized(current, len(keep)), [], None, None, []
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
