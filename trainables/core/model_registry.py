"""The model registry itself: ``MODELS`` and the ``register_model`` decorator.

Its own module so that builders defined elsewhere (``trainables.core.dense_models``) can register
themselves without importing ``trainables.core.models``, which imports them to keep the registry
whole: the two would otherwise import each other.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from data import Registry

__all__ = ["MODELS", "register_model"]

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")


def register_model(name: str, input_shape: tuple[int, int, int], head: str | None = "classifier",
                   task: str = "classification"):
    """Register ``builder(num_classes) -> nn.Module`` under ``name``; stamps ``input_shape``,
    ``head_name`` (the dotted name of the output ``nn.Linear``, ``num_classes`` wide; None for a
    model without one, such as a detector), ``task`` and ``model_name`` (``name``)."""
    if head is None and task == "classification":
        raise ValueError(f"model '{name}': a classification model needs its head's name, but got head=None")

    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        def build(num_classes: int = 10, **kwargs) -> nn.Module:
            model = builder(num_classes=num_classes, **kwargs)
            model.input_shape = tuple(input_shape)
            model.head_name = head
            model.task = task
            model.model_name = name
            return model

        build.__doc__ = builder.__doc__
        build.input_shape = tuple(input_shape)
        build.task = task
        MODELS.register(name, build)
        return builder

    return wrap
