"""Datasets for pruning experiments: offline loaders, seeded splits, fast batches.

``get_data(name, ...)`` returns train / val / test splits; the registered names are in
``list_datasets()``. Importing this package registers Fashion-MNIST (grey and coloured), CIFAR-10/100 and
class-folder datasets (ImageNet layout), detection and segmentation sets (Fashion-MNIST scenes,
PASCAL VOC, COCO).
"""

from . import _cifar, _coloured, _fashion_mnist, _folder, _scenes, _voc  # noqa: F401  (register the datasets)
from ._api import (
    DataSplits,
    dataset_options,
    dataset_task,
    get_data,
    known_class_names,
    list_datasets,
)
from ._coloured import channel_stats as coloured_channel_stats
from ._datasets import InMemoryDataset, iterate_batches, take
from ._registry import Registry
from ._scenes import Scenes, fmnist_scenes
from ._spec import TASKS, DatasetNotFoundError
from ._subsets import list_class_subsets, load_class_subset

__all__ = [
    "DataSplits",
    "DatasetNotFoundError",
    "InMemoryDataset",
    "Registry",
    "Scenes",
    "TASKS",
    "coloured_channel_stats",
    "dataset_options",
    "dataset_task",
    "fmnist_scenes",
    "get_data",
    "iterate_batches",
    "known_class_names",
    "list_class_subsets",
    "list_datasets",
    "load_class_subset",
    "take",
]
