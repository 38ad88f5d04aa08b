"""Dataset containers (in-memory tensors, relabelled subsets) and fast batch iteration."""

from __future__ import annotations

import random
from collections.abc import Iterator
from functools import partial
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, Subset, TensorDataset


class InMemoryDataset(TensorDataset):
    """Images and targets held as two tensors; ``iterate_batches`` slices them directly."""

    def __init__(self, images: Tensor, targets: Tensor):
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        super().__init__(images, targets)

    @property
    def images(self) -> Tensor:
        """(N, C, H, W) float32, normalised."""
        return self.tensors[0]

    @property
    def targets(self) -> Tensor:
        """(N, ...): one target per image, in the format of the data set's task (``DatasetSpec``):
        (N,) int64 label ids, (N, M, 5) float32 padded boxes or (N, H, W) int64 label masks."""
        return self.tensors[1]


class LabelledSubset(Dataset):
    """``base[indices]`` with labels passed through ``label_map`` (original id -> new id).

    Used for datasets read lazily from disk, where copying is not an option.
    """

    def __init__(self, base: Any, indices: Tensor, label_map: Tensor | None = None):
        self.base = base
        self.indices = indices
        self.label_map = label_map
        base_targets = torch.as_tensor(base.targets, dtype=torch.int64)[indices]
        self.targets = base_targets if label_map is None else label_map[base_targets]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        image, _ = self.base[int(self.indices[i])]
        return image, int(self.targets[i])


def targets_of(ds: Any) -> Tensor:
    """The (N,) int64 label ids of a classification data set."""
    return torch.as_tensor(ds.targets, dtype=torch.int64)


def take(ds: Any, indices: Tensor | None, label_map: Tensor | None) -> Dataset:
    """Rows ``indices`` of ``ds`` (all when None), relabelled by ``label_map`` when given.

    ``label_map`` applies to classification labels only. A file-backed data set without
    ``.targets`` (detection and segmentation read theirs per image) becomes a plain ``Subset``.
    """
    if isinstance(ds, InMemoryDataset):
        images = ds.images if indices is None else ds.images[indices]
        targets = ds.targets if indices is None else ds.targets[indices]
        return InMemoryDataset(images, targets if label_map is None else label_map[targets])
    if indices is None:
        if label_map is None:
            return ds
        indices = torch.arange(len(ds))
    if label_map is None and not hasattr(ds, "targets"):
        return Subset(ds, indices.tolist())
    return LabelledSubset(ds, indices, label_map)


def _generator(seed: int | None) -> torch.Generator:
    generator = torch.Generator()
    if seed is None:
        generator.seed()  # fresh OS entropy: not reproducible, but never the global RNG
    else:
        generator.manual_seed(seed)
    return generator


def _check_shard(shard: object, skip: object) -> tuple[int, int]:
    ok = (
        isinstance(shard, tuple)
        and len(shard) == 2
        and all(_is_index(v) for v in shard)
        and shard[1] >= 1
        and 0 <= shard[0] < shard[1]
    )
    if not ok:
        raise ValueError(f"shard must be (rank, world) with 0 <= rank < world, but got {shard!r}")
    if not _is_index(skip) or skip < 0:
        raise ValueError(f"skip must be an integer >= 0, but got {skip!r}")
    return int(shard[0]), int(shard[1])


def _is_index(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def shard_batch_count(n: int, batch_size: int, drop_last: bool, world: int) -> int:
    """Batches each of ``world`` data-parallel workers gets from one epoch of ``n`` samples.

    The epoch's batches are dealt round-robin and the last incomplete round is dropped, so
    every worker takes the same number of optimiser steps (DDP would hang otherwise).
    """
    n_batches = n // batch_size if drop_last else -(-n // batch_size)
    return n_batches // world


class ShardBatches(Sampler[list[int]]):
    """The index batches of one epoch that belong to data-parallel worker ``rank`` of ``world``.

    All workers draw the same seeded permutation and cut it into the same batches; worker r
    keeps batches r, r + world, r + 2 world, ... (then skips its first ``skip``). A loader
    built on it reads and decodes only those images, where slicing a full-epoch loader would
    decode every batch on every worker and throw most away. With ``world=1`` and ``skip=0``
    it yields exactly the batches of ``BatchSampler(RandomSampler(generator))``, so a single
    worker sees the same numbers as before sharding existed. Shuffling draws the permutation
    lazily, on the first batch: a ``DataLoader`` sharing ``generator`` first takes its worker
    seed from it, as it does with its own ``RandomSampler``.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        *,
        generator: torch.Generator | None,
        drop_last: bool,
        rank: int = 0,
        world: int = 1,
        skip: int = 0,
    ):
        self.n, self.batch_size, self.drop_last = n, batch_size, drop_last
        self.generator = generator  # None: in order
        self.rank, self.world, self.skip = rank, world, skip

    def __len__(self) -> int:
        return max(
            0, shard_batch_count(self.n, self.batch_size, self.drop_last, self.world) - self.skip
        )

    def __iter__(self) -> Iterator[list[int]]:
        if len(self) == 0:
            return
        # torch.randperm matches RandomSampler's draw for the same generator state.
        order = (
            torch.arange(self.n)
            if self.generator is None
            else torch.randperm(self.n, generator=self.generator)
        )
        stop = shard_batch_count(self.n, self.batch_size, self.drop_last, self.world) * self.world
        for k in range(self.rank + self.skip * self.world, stop, self.world):
            yield order[k * self.batch_size : (k + 1) * self.batch_size].tolist()


def _seed_rank_worker(rank: int, worker_id: int) -> None:
    """Give loader workers of different data-parallel ranks different augmentation streams:
    every rank's loader draws the same base seed from the shared epoch generator."""
    seed = (torch.initial_seed() + rank * 1_000_003) % 2**63
    torch.manual_seed(seed)
    random.seed(seed)


def pin_memory_for(device: torch.device | str | None) -> bool:
    """Whether loaders feeding ``device`` should return page-locked (pinned) batches: only for
    CUDA, where pinned host memory makes ``.to(device, non_blocking=True)`` an async copy."""
    return device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available()


def iterate_batches(
    ds: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int | None = None,
    drop_last: bool = False,
    num_workers: int = 0,
    shard: tuple[int, int] = (0, 1),
    skip: int = 0,
    device: torch.device | str | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(images, targets)`` batches covering ``ds`` once (one epoch); targets are labels,
    padded boxes or masks, stacked along a first batch dimension (``DatasetSpec`` has the formats).

    In-memory datasets (any ``TensorDataset``) are indexed directly, which is far faster
    than per-item collation; others go through a ``DataLoader`` with ``num_workers``.
    Shuffling uses its own ``torch.Generator`` seeded with ``seed``; pass e.g.
    ``seed + epoch`` for a different order each epoch.

    ``shard=(rank, world)``: data-parallel worker ``rank`` gets batches rank, rank + world, ...
    of the epoch (the same seed on every worker gives the same epoch), each worker the same
    count (``shard_batch_count``); a file-backed set decodes only those. ``skip`` leaves out
    this worker's first ``skip`` batches without reading them (resuming mid-epoch).
    ``device``: where the batches go; CUDA gets pinned memory (``pin_memory_for``).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, but got {batch_size!r}")
    rank, world = _check_shard(shard, skip)
    if isinstance(ds, TensorDataset):
        yield from _tensor_batches(ds, batch_size, shuffle, seed, drop_last, rank, world, skip)
        return
    generator = _generator(seed if shuffle else 0)  # also seeds the workers; never the global RNG
    sampler = ShardBatches(
        len(ds),
        batch_size,
        generator=generator if shuffle else None,
        drop_last=drop_last,
        rank=rank,
        world=world,
        skip=skip,
    )
    loader = DataLoader(
        ds,
        batch_sampler=sampler,
        generator=generator,
        num_workers=num_workers,
        pin_memory=pin_memory_for(device),
        worker_init_fn=partial(_seed_rank_worker, rank) if world > 1 and num_workers > 0 else None,
        # One loader serves one epoch: persistent workers would only outlive it (bench/data_path.py
        # measures what starting the workers costs per epoch).
        persistent_workers=False,
    )
    yield from ((images, labels) for images, labels in loader)  # lists -> tuples


def _tensor_batches(
    ds: TensorDataset,
    batch_size: int,
    shuffle: bool,
    seed: int | None,
    drop_last: bool,
    rank: int = 0,
    world: int = 1,
    skip: int = 0,
) -> Iterator[tuple[Tensor, Tensor]]:
    images, labels = ds.tensors[0], ds.tensors[1]
    n = len(images)
    order = torch.randperm(n, generator=_generator(seed)) if shuffle else None
    stop = shard_batch_count(n, batch_size, drop_last, world) * world
    for k in range(rank + skip * world, stop, world):
        start = k * batch_size
        if order is None:  # contiguous slices are views: no copy
            yield images[start : start + batch_size], labels[start : start + batch_size]
        else:
            idx = order[start : start + batch_size]
            yield images[idx], labels[idx]


def keep_classes(ds: InMemoryDataset, class_ids: list[int] | None) -> InMemoryDataset:
    """The rows of ``ds`` whose label is in ``class_ids`` (all when None), order kept."""
    if class_ids is None:
        return ds
    mask = torch.isin(ds.targets, torch.tensor(class_ids, dtype=torch.int64))
    return InMemoryDataset(ds.images[mask], ds.targets[mask])


def normalise(images: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """uint8 (N, C, H, W) -> float32 ``(x / 255 - mean) / std`` per channel."""
    out = images.to(torch.float32).div_(255)
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return out.sub_(m).div_(s)
