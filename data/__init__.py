# ruff: noqa: F401  (_load imports names only to bind them on the package)
"""Datasets for pruning experiments: offline loaders, seeded splits, fast batches.

``get_data(name, ...)`` returns train / val / test splits; the registered names are in
``list_datasets()``. Importing this package registers Fashion-MNIST (grey and coloured), CIFAR-10/100 and
class-folder datasets (ImageNet layout, any folder of images), detection and segmentation sets
(Fashion-MNIST scenes, PASCAL VOC, COCO). A user's own data set comes by qualified name,
``custom:<module>:<callable>`` (``data._custom`` says what the factory returns).

The package loads its data sets (and torch) on the first use of a name other than ``Registry``
(PEP 562), so a command line answering ``--help`` or refusing a bad value never imports torch.
"""

from ._registry import Registry  # light: the other packages' registries build on it

__all__ = [
    "DataSplits",
    "DatasetNotFoundError",
    "FACTORY_SPEC",
    "InMemoryDataset",
    "Registry",
    "Scenes",
    "TASKS",
    "coloured_channel_stats",
    "dataset_fingerprint",
    "dataset_options",
    "dataset_task",
    "fmnist_scenes",
    "get_data",
    "import_factory",
    "iterate_batches",
    "known_class_names",
    "list_class_subsets",
    "list_datasets",
    "load_class_subset",
    "source_digest",
    "take",
    "takes_keyword",
]


def _load() -> None:
    """Import the loaders (registering every data set) and bind the public names."""
    from . import _cifar, _coloured, _custom, _fashion_mnist, _folder, _scenes, _voc  # noqa: F401  (register the datasets)
    from ._api import (
        DataSplits,
        dataset_fingerprint,
        dataset_options,
        dataset_task,
        get_data,
        known_class_names,
        list_datasets,
    )
    from ._coloured import channel_stats as coloured_channel_stats
    from ._datasets import InMemoryDataset, iterate_batches, take
    from ._factory import FACTORY_SPEC, import_factory, source_digest, takes_keyword
    from ._scenes import Scenes, fmnist_scenes
    from ._spec import TASKS, DatasetNotFoundError
    from ._subsets import list_class_subsets, load_class_subset

    names = dict(locals())
    globals().update({name: names[name] for name in __all__ if name in names})


def __getattr__(name: str):
    if name in __all__:
        _load()
        return globals()[name]
    raise AttributeError(f"module 'data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
