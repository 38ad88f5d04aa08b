"""Export every Pareto-optimal trial's pruned model for deployment (``search.export=[onnx,pt2]``).

The search driver calls ``export_front`` after the front is evaluated: each front trial's
model (rebuilt from its checkpoint: prune log + fine-tuned weights) is written to
``<search output>/export/<trial id>/model.<format>`` by ``trainables.export``, checked
against PyTorch's outputs, and logged to the trial's MLflow run beside its record.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["check_export_formats", "export_front"]


def check_export_formats(formats: Any) -> list[str]:
    """``search.export`` as a list of formats: null or a list of onnx / pt2, onnx only with the
    onnx extra installed; a one-line ``ValueError`` otherwise, before any trial runs."""
    from trainables.export import FORMATS

    if formats is None:
        return []
    listed = None if isinstance(formats, str) or not isinstance(formats, Iterable) else list(formats)
    if listed is None or any(f not in FORMATS for f in listed):
        raise ValueError(f"search.export must be a list of formats from {', '.join(FORMATS)} (or []), "
                         f"but got {formats!r}")
    if "onnx" in listed and importlib.util.find_spec("onnxruntime") is None:
        raise ValueError("search.export must not include onnx without the onnx extra (pip install -e \".[onnx]\"), "
                         f"but got {listed}")
    return list(dict.fromkeys(listed))


def export_front(models: Sequence[tuple[str, nn.Module]], out: Path, formats: Sequence[str],
                 input_shape: Sequence[int], log: Callable[[str], None] = print, tracker: Any = None) -> list[Path]:
    """Write each ``(trial id, model)`` in every format under ``out/<trial id>/``, check each
    file's outputs against the model's, and log it to the trial's MLflow run when ``tracker``
    is given; returns the files written."""
    import torch

    from trainables.export import check_export, export_model

    written = []
    # A seeded example of batch 2: export keeps the batch dynamic, the check runs on it.
    x = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0))
    for trial_id, model in models:
        for fmt in formats:
            path = export_model(model, x, out / trial_id / f"model.{fmt}", fmt)
            diff = check_export(model, path, x)
            if tracker is not None:
                tracker.log_artifact(trial_id, path)
            written.append(path)
            log(f"front trial {trial_id}: exported {path} (max |exported - PyTorch| = {diff:.1e})")
    return written
