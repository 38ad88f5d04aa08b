"""The criterion contract, its registry, and the shared activation/gradient machinery."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data import Registry
from trainables.core.surgery import Unit, describe_units

Batch = tuple[Tensor, Tensor]
ScoreFn = Callable[[nn.Module, Unit, "ScoringContext"], Tensor]


@dataclass
class ScoringContext:
    """What a criterion may look at besides the model.

    ``batches`` is a re-iterable stream of ``(x, y)`` scoring batches (a list is fine);
    data-free criteria ignore it. ``target_classes`` are label ids for class-specific
    scoring. Nothing here is mutated by a criterion.
    """

    batches: Sequence[Batch] = ()
    seed: int = 0
    target_classes: Sequence[int] | None = None
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy
    entropy_bins: int = 32  # histogram bins of the entropy criteria
    car_max_batch: int = 4096  # largest expanded batch (filters x images) one CAR forward may use
    options: dict = field(default_factory=dict)  # criterion-specific settings (e.g. blended weights)

    def unit_generator(self, unit: str) -> torch.Generator:
        """A generator seeded by (seed, unit name): stable across processes, unlike hash()."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(unit.encode()))


@dataclass(frozen=True)
class Criterion:
    """A named scorer: ``(model, unit, ctx) -> Tensor[n_filters]``, higher = more important."""

    name: str
    fn: ScoreFn
    needs_data: bool
    doc: str

    def __call__(self, model: nn.Module, unit: Unit | str, ctx: ScoringContext | None = None) -> Tensor:
        ctx = ctx if ctx is not None else ScoringContext()
        if isinstance(unit, str):
            units = {u.name: u for u in describe_units(model)}
            if unit not in units:
                raise ValueError(f"unknown unit '{unit}'; valid: {', '.join(units)}")
            unit = units[unit]
        if self.needs_data and not ctx.batches:
            raise ValueError(f"criterion '{self.name}' needs scoring batches; ScoringContext.batches is empty")
        was_training = model.training
        model.eval()  # score the deployed network: BN running stats, no dropout
        try:
            scores = self.fn(model, unit, ctx)
        finally:
            model.train(was_training)
        scores = scores.detach().float().cpu()
        if scores.shape != (unit.n_filters,):
            raise ValueError(
                f"criterion '{self.name}' returned shape {tuple(scores.shape)} for unit '{unit.name}'; "
                f"a criterion must return one score per filter, shape ({unit.n_filters},)"
            )
        return scores


CRITERIA: Registry[Criterion] = Registry("criterion")


def register_criterion(name: str, *, needs_data: bool) -> Callable[[ScoreFn], ScoreFn]:
    """Register ``fn(model, unit, ctx) -> Tensor[n_filters]`` under ``name``.

    The first docstring line says what it measures and its source.
    """

    def wrap(fn: ScoreFn) -> ScoreFn:
        doc = (fn.__doc__ or "").strip().splitlines()
        CRITERIA.register(name, Criterion(name, fn, needs_data, doc[0] if doc else ""))
        return fn

    return wrap


def get_criterion(name: str) -> Criterion:
    return CRITERIA.get(name)


def list_criteria() -> list[str]:
    return CRITERIA.names()


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def filter_weights(model: nn.Module, unit: Unit) -> Tensor:
    """The unit's filters as rows: (n_filters, sum over its convs of C_in x kH x kW)."""
    return torch.cat([model.get_submodule(c).weight.detach().flatten(1) for c in unit.convs], dim=1)


@contextmanager
def hooked(model: nn.Module, names: Iterable[str], hook: Callable[[int, Tensor], Tensor | None]) -> Iterator[None]:
    """Forward hooks on the named modules; ``hook(point_index, output)`` may return a replacement."""
    handles = [
        model.get_submodule(n).register_forward_hook(lambda _m, _i, out, k=k: hook(k, out))
        for k, n in enumerate(names)
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def channel_stats(model: nn.Module, unit: Unit, ctx: ScoringContext, reduce: Callable[[Tensor], Tensor]) -> Tensor:
    """Per-image, per-channel statistics of the unit's activations in one pass over the batches.

    ``reduce`` maps an activation (B, C, H, W), taken after the unit's BN (or conv), to
    (B, C); it runs inside the hook, before any in-place op downstream changes the tensor.
    Returns (P, N, C): P activation points (more than one for residual-coupled units),
    N scoring images.
    """
    per_point: list[list[Tensor]] = [[] for _ in unit.act_points]
    device = device_of(model)

    def hook(k: int, out: Tensor) -> None:
        per_point[k].append(reduce(out.detach()).float().cpu())

    with hooked(model, unit.act_points, hook), torch.no_grad():
        for x, _ in ctx.batches:
            model(x.to(device))
    return torch.stack([torch.cat(stats) for stats in per_point])
