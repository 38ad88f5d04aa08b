"""A user's own network and data set, brought in by name, without editing the project.

    python -m trainables.run model=custom model.factory=examples.tiny_custom:net \
        data=custom data.factory=examples.tiny_custom:data
    python -m search.launch model=custom model.factory=examples.tiny_custom:net \
        data=custom data.factory=examples.tiny_custom:data search.num_trials=4

``net`` returns any ``nn.Module``; it takes ``num_classes`` (the project passes the data's class
count) and whatever ``model.kwargs`` give (``model.kwargs.width=16``). ``data`` returns the train
and test sets (and the class names); the project carves the seeded validation split, applies class
subsets and ``data.fraction``, and shards batches across ranks as for its own data sets. Run from
the repository root (the working directory is on ``sys.path``), or install your module as a
package so that Ray workers on other machines import it too.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

CLASSES = ("top", "upper", "middle", "lower", "bottom")  # where each class's bright band lies


def net(num_classes: int = 10, width: int = 8) -> nn.Module:
    """A small CNN for 1x28x28 images: three conv+BN+ReLU blocks, then a linear head."""

    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

    return nn.Sequential(
        *block(1, width), nn.MaxPool2d(2),  # (B, w, 14, 14)
        *block(width, 2 * width), nn.MaxPool2d(2),  # (B, 2w, 7, 7)
        *block(2 * width, 2 * width), nn.AdaptiveAvgPool2d(1),  # (B, 2w, 1, 1)
        nn.Flatten(), nn.Linear(2 * width, num_classes),
    )


def _bands(n: int, generator: torch.Generator) -> TensorDataset:
    """``n`` noisy 1x28x28 images; class c has a bright horizontal band in the c-th fifth."""
    labels = torch.arange(n) % len(CLASSES)  # (n,) balanced classes
    images = 0.3 * torch.rand(n, 1, 28, 28, generator=generator)
    for c in range(len(CLASSES)):
        images[labels == c, :, 5 * c + 1 : 5 * c + 6, 3:25] += 0.7
    return TensorDataset((images - 0.5) / 0.5, labels)  # normalised to about [-1, 1]


def data(n_train: int = 2000, n_test: int = 500, seed: int = 0) -> dict:
    """Generated, seeded train and test sets and the class names (a real factory would read files)."""
    generator = torch.Generator().manual_seed(seed)
    return {"train": _bands(n_train, generator), "test": _bands(n_test, generator), "classes": list(CLASSES)}
