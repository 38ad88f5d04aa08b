"""The pruning core: plain PyTorch + torch-pruning, no Ray, Optuna or MLflow.

The layout, bottom to top (a module imports only from its own layer or the ones below; see
``tests/test_layering.py``)::

    core/         units and filter surgery, FLOPs/latency/accuracy, the model registry
    criteria/     the pruning criteria, a registry of scorers (one module per family)
    protocol/     the prune / fine-tune protocol: stages, fine-tuning, planning, schedules,
                  tasks, records, recovery, greedy CAR, and the typed configs
    experiments/  a paper's experiments on top of the protocol: compression, colour filters
    cli/          from a command line to a run: Hydra composition, key checks, --help,
                  the cached base model
    run, pretrain, compress, export, colour_report
                  the commands (``python -m trainables.<name>``)
    ray_trainable the Ray adapter, the only module here that imports ray

The public names below are imported on first use (PEP 562), not when the package is: a command
line such as ``python -m trainables.run --help`` then answers without importing torch (about 3 s).
Registration still happens on import of the registry's module (``trainables.core.models`` pulls
in ``trainables.core.dense_models``; ``trainables.criteria`` imports every criterion).
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
    "count_flops": "trainables.core.metrics",
    "count_params": "trainables.core.metrics",
    "deployment_form": "trainables.core.metrics",
    "evaluate": "trainables.core.metrics",
    "measure_latency": "trainables.core.metrics",
    "build_model": "trainables.core.models",
    "list_models": "trainables.core.models",
    "register_model": "trainables.core.models",
    "Unit": "trainables.core.surgery",
    "describe_units": "trainables.core.surgery",
    "mask_filters": "trainables.core.surgery",
    "prunable_layers": "trainables.core.surgery",
    "prune_layer": "trainables.core.surgery",
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
