"""Pruning criteria: a registry of ``(model, unit, ctx) -> Tensor[n_filters]``, higher = keep.

Importing this package registers every built-in criterion, so Ray workers that import it
see the same registry as the driver.
"""

from trainables.criteria import activations, blended, car, gradients, weights  # noqa: F401  (registration)
from trainables.criteria._base import (
    CRITERIA,
    Criterion,
    ScoringContext,
    device_of,
    get_criterion,
    hooked,
    list_criteria,
    register_criterion,
)

__all__ = [
    "CRITERIA", "Criterion", "ScoringContext", "device_of", "get_criterion", "hooked", "list_criteria",
    "register_criterion",
]
