"""A name -> object registry that fails loudly (duplicates and unknown names).

It lives in ``data``, the bottom layer, so that datasets, models, criteria and schedules
all register by name without any layer importing one above it.
"""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names (what configs, Optuna and MLflow see) to plug-ins.

    A duplicate name is an error; an unknown name raises ``ValueError`` listing the
    valid ones, e.g. ``unknown criterion 'l3'; valid: apoz, car, ...``.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T) -> T:
        if name in self._items:
            raise ValueError(f"{self.kind} '{name}' is already registered")
        self._items[name] = item
        return item

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise ValueError(
                f"unknown {self.kind} '{name}'; valid: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __len__(self) -> int:
        return len(self._items)
