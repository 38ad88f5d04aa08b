"""The pruning core runs without a cluster: no ray, optuna or mlflow import."""

from __future__ import annotations

import subprocess
import sys

CORE_MODULES = [
    "trainables", "trainables.criteria", "trainables.protocol.stages", "trainables.run", "trainables.pretrain",
    "trainables.core.metrics", "trainables.core.surgery", "trainables.protocol.schedules", "trainables.core.models", "trainables.cli.compose",
    "trainables.cli.base_model", "trainables.cli", "trainables.protocol.config", "data",
]


def test_core_imports_without_ray_optuna_mlflow():
    # Blocking the names in sys.modules makes any import of them raise ImportError.
    code = (
        "import sys\n"
        "for name in ('ray', 'optuna', 'mlflow'):\n"
        "    sys.modules[name] = None\n"
        f"for mod in {CORE_MODULES!r}:\n"
        "    __import__(mod)\n"
        "from trainables import prunable_layers, prune_layer, get_criterion, list_criteria, count_flops, measure_latency\n"
        "leaked = [m for m in sys.modules if m.split('.')[0] in ('ray', 'optuna', 'mlflow') and sys.modules[m] is not None]\n"
        "assert not leaked, leaked\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_data_loads_without_the_pruning_core():
    # data is the bottom layer: importing it must not pull in the pruning core or torch-pruning.
    code = (
        "import sys\n"
        "import data\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] in ('trainables', 'torch_pruning', 'search')]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
