"""The pruning core: plain PyTorch + torch-pruning, no Ray, Optuna or MLflow."""

from trainables import dense_models  # noqa: F401  (registers Faster R-CNN and SegNet in the model registry)
from trainables.criteria import (
    Criterion,
    ScoringContext,
    get_criterion,
    list_criteria,
    register_criterion,
)
from trainables.metrics import count_flops, count_params, deployment_form, evaluate, measure_latency
from trainables.models import build_model, list_models, register_model
from trainables.surgery import Unit, describe_units, mask_filters, prunable_layers, prune_layer

__all__ = [
    "Criterion",
    "ScoringContext",
    "Unit",
    "build_model",
    "count_flops",
    "count_params",
    "deployment_form",
    "describe_units",
    "evaluate",
    "get_criterion",
    "list_criteria",
    "list_models",
    "mask_filters",
    "measure_latency",
    "prunable_layers",
    "prune_layer",
    "register_criterion",
    "register_model",
]
