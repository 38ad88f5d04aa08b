"""The short-fine-tune proxy of the blended search: adaptive BN plus ``k`` optimiser steps.

The protocol counts fine-tuning in epochs (``prune.q``) and turns them into optimiser steps
as ``round(q x steps_per_epoch)`` (``trainables.protocol.finetune``: ``steps_per_epoch`` is its rule for
an epoch's length). ``proxy_epochs`` inverts that rule so a proxy trial takes exactly ``k`` steps; ``k = 0`` is the
adaptive-BN-only proxy (EagleEye).
"""

from __future__ import annotations

from trainables.protocol.config import require_int

__all__ = ["proxy_epochs"]


def proxy_epochs(steps: int, per_epoch: int) -> float:
    """``q`` such that ``round(q * per_epoch) == steps`` (the protocol's step count).

    ``steps / per_epoch * per_epoch`` is within one ulp of ``steps``, so the rounding gives
    back exactly ``steps`` for any step count a search would use.
    """
    require_int("search.proxy.finetune_steps", steps, 0)
    return steps / per_epoch
