"""The pruning core: plain PyTorch + torch-pruning, no Ray, Optuna or MLflow."""
from trainables.models import build_model, list_models
from trainables.surgery import Unit, describe_units, mask_filters, prunable_layers, prune_layer

__all__ = ["Unit", "build_model", "describe_units", "list_models", "mask_filters", "prunable_layers", "prune_layer"]
