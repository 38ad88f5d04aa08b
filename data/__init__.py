"""Datasets for pruning experiments: offline loaders, seeded splits, fast batches.

``get_data(name, ...)`` returns train / val / test splits; the registered names are in
``list_datasets()``. Importing this package registers Fashion-MNIST (grey and coloured), CIFAR-10/100 and
class-folder datasets (ImageNet layout).
"""

from . import _cifar, _coloured, _fashion_mnist, _folder  # noqa: F401  (register the datasets)
from ._api import DataSplits, dataset_options, get_data, known_class_names, list_datasets
from ._coloured import channel_stats as coloured_channel_stats
from ._datasets import InMemoryDataset, iterate_batches, take
from ._registry import Registry
from ._spec import DatasetNotFoundError
from ._subsets import list_class_subsets, load_class_subset

__all__ = [
    "DataSplits",
    "DatasetNotFoundError",
    "InMemoryDataset",
    "Registry",
    "coloured_channel_stats",
    "dataset_options",
    "get_data",
    "iterate_batches",
    "known_class_names",
    "list_class_subsets",
    "list_datasets",
    "load_class_subset",
    "take",
]
