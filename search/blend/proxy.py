"""The short-fine-tune proxy of the blended search: adaptive BN plus ``k`` optimiser steps.

The protocol counts fine-tuning in epochs (``prune.q``) and turns them into optimiser steps
as ``round(q x steps_per_epoch)`` (``trainables.finetune.Finetuner``), where one epoch is
``train_size_full // (batch_size x workers)`` steps (``data.DataSplits.train_size_full``: the
training images before ``data.fraction``, so a budget keeps its step count while the fraction
varies), or ``len(train) // ...`` with ``finetune.steps_follow_fraction``. ``proxy_epochs``
inverts that rule so a proxy trial takes exactly ``k`` steps; ``k = 0`` is the
adaptive-BN-only proxy (EagleEye).
"""

from __future__ import annotations

__all__ = ["proxy_epochs", "steps_per_epoch"]


def steps_per_epoch(splits, finetune, world: int = 1) -> int:
    """Optimiser steps in one fine-tuning epoch of ``splits`` (a ``data.DataSplits``) under
    ``finetune`` (a ``FinetuneConfig``), the Finetuner's rule; ``world`` data-parallel workers
    each take a batch per step."""
    images = len(splits.train) if finetune.steps_follow_fraction else splits.train_size_full
    return max(1, int(images) // (int(finetune.batch_size) * int(world)))


def proxy_epochs(steps: int, per_epoch: int) -> float:
    """``q`` such that ``round(q * per_epoch) == steps`` (the protocol's step count).

    ``steps / per_epoch * per_epoch`` is within one ulp of ``steps``, so the rounding gives
    back exactly ``steps`` for any step count a search would use.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"search.proxy.finetune_steps must be an integer >= 0, but got {steps!r}")
    return steps / per_epoch
