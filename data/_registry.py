"""A name -> object registry that fails loudly (duplicates and unknown names).

It lives in ``data``, the bottom layer, so that datasets, models, criteria and schedules
all register by name without any layer importing one above it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names (what configs, Optuna and MLflow see) to plug-ins.

    A duplicate name is an error; an unknown name raises ``ValueError`` listing the
    valid ones, e.g. ``unknown criterion 'l3'; valid: apoz, car, ...``.

    A *source* answers qualified names ``<source>:<rest>`` that are not registered, such as
    ``torchvision:mobilenet_v3_small`` or ``custom:my_nets:build``: ``add_source(source,
    resolve)`` with ``resolve(rest) -> item`` (raising ``ValueError`` for a bad ``rest``).
    Whoever looks a name up then gets the same kind of item for both, and the qualified name
    travels through configs, records and Ray workers as any registered one. Resolved items
    are kept, so a name is resolved once per process.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._sources: dict[str, Callable[[str], T]] = {}
        self._resolved: dict[str, T] = {}

    def add_source(self, source: str, resolve: Callable[[str], T]) -> None:
        """Answer ``<source>:<rest>`` names with ``resolve(rest)``."""
        if source in self._sources or ":" in source:
            raise ValueError(f"{self.kind} source '{source}' is already added or has a ':' in it")
        self._sources[source] = resolve

    def sources(self) -> list[str]:
        return sorted(self._sources)

    def register(self, name: str, item: T) -> T:
        if name in self._items:
            raise ValueError(f"{self.kind} '{name}' is already registered")
        self._items[name] = item
        return item

    def get(self, name: str) -> T:
        if isinstance(name, str) and ":" in name and name not in self._items:
            return self._from_source(name)
        try:
            return self._items[name]
        except KeyError:
            raise ValueError(
                f"unknown {self.kind} '{name}'; valid: {', '.join(self.names())}"
            ) from None

    def _from_source(self, name: str) -> T:
        if name not in self._resolved:
            source, _, rest = name.partition(":")
            if source not in self._sources:
                valid = ", ".join(f"{s}:" for s in self.sources()) or "none"
                raise ValueError(f"unknown {self.kind} source '{source}' in '{name}'; valid sources: {valid}")
            self._resolved[name] = self._sources[source](rest)
        return self._resolved[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        """Registered names only: a qualified name is checked by resolving it (``get``)."""
        return name in self._items

    def __len__(self) -> int:
        return len(self._items)
