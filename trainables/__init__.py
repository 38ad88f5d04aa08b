"""The pruning core: plain PyTorch + torch-pruning, no Ray, Optuna or MLflow.

The public names below are imported on first use (PEP 562), not when the package is: a command
line such as ``python -m trainables.run --help`` then answers without importing torch (about 3 s).
Registration still happens on import of the registry's module (``trainables.models`` pulls in
``trainables.dense_models``; ``trainables.criteria`` imports every criterion).
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> the module that defines it
_EXPORTS = {
    "Criterion": "trainables.criteria",
    "ScoringContext": "trainables.criteria",
    "get_criterion": "trainables.criteria",
    "list_criteria": "trainables.criteria",
    "register_criterion": "trainables.criteria",
    "count_flops": "trainables.metrics",
    "count_params": "trainables.metrics",
    "deployment_form": "trainables.metrics",
    "evaluate": "trainables.metrics",
    "measure_latency": "trainables.metrics",
    "build_model": "trainables.models",
    "list_models": "trainables.models",
    "register_model": "trainables.models",
    "Unit": "trainables.surgery",
    "describe_units": "trainables.surgery",
    "mask_filters": "trainables.surgery",
    "prunable_layers": "trainables.surgery",
    "prune_layer": "trainables.surgery",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    # `trainables.run` etc. as attributes: importing the submodule sets it on the package
    raise AttributeError(f"module 'trainables' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
