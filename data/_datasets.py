"""Dataset containers (in-memory tensors, relabelled subsets) and fast batch iteration."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset


class InMemoryDataset(TensorDataset):
    """Images and labels held as two tensors; ``iterate_batches`` slices them directly."""

    def __init__(self, images: Tensor, targets: Tensor):
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} labels")
        super().__init__(images, targets)

    @property
    def images(self) -> Tensor:
        """(N, C, H, W) float32, normalised."""
        return self.tensors[0]

    @property
    def targets(self) -> Tensor:
        """(N,) int64 label ids."""
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
    return torch.as_tensor(ds.targets, dtype=torch.int64)


def take(ds: Any, indices: Tensor | None, label_map: Tensor | None) -> Dataset:
    """Rows ``indices`` of ``ds`` (all when None), relabelled by ``label_map`` when given."""
    if isinstance(ds, InMemoryDataset):
        images = ds.images if indices is None else ds.images[indices]
        targets = ds.targets if indices is None else ds.targets[indices]
        return InMemoryDataset(images, targets if label_map is None else label_map[targets])
    if indices is None:
        if label_map is None:
            return ds
        indices = torch.arange(len(ds))
    return LabelledSubset(ds, indices, label_map)


def _generator(seed: int | None) -> torch.Generator:
    generator = torch.Generator()
    if seed is None:
        generator.seed()  # fresh OS entropy: not reproducible, but never the global RNG
    else:
        generator.manual_seed(seed)
    return generator


def iterate_batches(
    ds: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int | None = None,
    drop_last: bool = False,
    num_workers: int = 0,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(images, labels)`` batches covering ``ds`` once (one epoch).

    In-memory datasets (any ``TensorDataset``) are indexed directly, which is far faster
    than per-item collation; others go through a ``DataLoader`` with ``num_workers``.
    Shuffling uses its own ``torch.Generator`` seeded with ``seed``; pass e.g.
    ``seed + epoch`` for a different order each epoch.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, but got {batch_size!r}")
    if isinstance(ds, TensorDataset):
        yield from _tensor_batches(ds, batch_size, shuffle, seed, drop_last)
        return
    loader = DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=_generator(seed) if shuffle else None,
        drop_last=drop_last,
        num_workers=num_workers,
    )
    yield from ((images, labels) for images, labels in loader)  # lists -> tuples


def _tensor_batches(
    ds: TensorDataset, batch_size: int, shuffle: bool, seed: int | None, drop_last: bool
) -> Iterator[tuple[Tensor, Tensor]]:
    images, labels = ds.tensors[0], ds.tensors[1]
    n = len(images)
    stop = n - n % batch_size if drop_last else n
    order = torch.randperm(n, generator=_generator(seed)) if shuffle else None
    for start in range(0, stop, batch_size):
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
