"""Seeded, class-stratified index splits: validation carve-out and fine-tuning fraction."""

from __future__ import annotations

import torch
from torch import Tensor


def allocate(total: int, counts: list[int]) -> list[int]:
    """Share ``total`` items among classes in proportion to ``counts`` (largest remainder).

    Each class gets floor or ceil of its exact quota ``total * n_c / N``, so proportions
    are kept within one sample and the shares add up to ``total`` exactly. Ties go to the
    lower class position, which keeps the result deterministic.
    """
    n = sum(counts)
    if not 0 <= total <= n:
        raise ValueError(f"cannot allocate {total} items among {n}")
    if n == 0:
        return [0 for _ in counts]
    # Integer arithmetic keeps the quotas exact (no float ties that flip between machines).
    shares = [total * c // n for c in counts]
    remainders = [total * c % n for c in counts]
    left = total - sum(shares)
    for i in sorted(range(len(counts)), key=lambda i: (-remainders[i], i))[:left]:
        shares[i] += 1
    return shares


def per_class_permutations(targets: Tensor, generator: torch.Generator) -> list[Tensor]:
    """Indices of each present class (ascending label order), each in a seeded random order."""
    order = torch.sort(targets, stable=True).indices
    counts = torch.bincount(targets)
    groups = torch.split(order, [int(c) for c in counts if c > 0])
    return [g[torch.randperm(len(g), generator=generator)] for g in groups]


def split_indices(targets: Tensor, n_val: int, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """(train, val) indices into ``targets`` (int64, shape (N,)), both sorted ascending.

    ``n_val`` images go to validation, stratified by class; then ``fraction`` of what is
    left is kept for training, again stratified. One permutation per class serves both
    steps, so the validation split does not depend on ``fraction`` and smaller fractions
    are subsets of larger ones (the nested subsets of a data-efficiency study).
    """
    generator = torch.Generator().manual_seed(seed)
    groups = per_class_permutations(targets, generator)
    counts = [len(g) for g in groups]
    val_counts = allocate(n_val, counts)
    pool_counts = [c - v for c, v in zip(counts, val_counts, strict=True)]
    n_pool = sum(pool_counts)
    n_keep = min(n_pool, max(1, round(fraction * n_pool)))
    keep_counts = allocate(n_keep, pool_counts)
    val = [g[:v] for g, v in zip(groups, val_counts, strict=True)]
    train = [g[v : v + k] for g, v, k in zip(groups, val_counts, keep_counts, strict=True)]
    return _sorted_cat(train), _sorted_cat(val)


def _sorted_cat(parts: list[Tensor]) -> Tensor:
    if not parts:
        return torch.empty(0, dtype=torch.int64)
    return torch.sort(torch.cat(parts)).values
