"""Importing a user's factory by name: ``<module>:<callable>`` (``model.factory``, ``data.factory``).

It lives in ``data``, the bottom layer, so that both the model sources (``trainables.core.models``)
and the data sources import it without any layer importing one above it.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable
from typing import Any

# <module>:<callable>, the callable possibly dotted (Class.create); what setuptools' entry points take.
FACTORY_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def import_factory(spec: str, key: str) -> Callable[..., Any]:
    """The callable named by ``<module>:<callable>``, imported from the working directory,
    ``PYTHONPATH`` or an installed package. Any failure is a one-line ``ValueError`` naming
    ``key`` (``model.factory`` / ``data.factory``)."""
    if not isinstance(spec, str) or not FACTORY_SPEC.match(spec):
        raise ValueError(f"{key} must be <module>:<callable>, e.g. examples.tiny_net:build, but got {spec!r}")
    module_name, _, attr = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as err:  # a user's module can fail in any way while it is imported
        reason = (str(err).strip().splitlines() or [""])[0]
        raise ValueError(f"{key}={spec} does not import ({type(err).__name__}: {reason}); it must be "
                         "<module>:<callable> importable from the working directory or PYTHONPATH") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{key}={spec}: module {module_name} has no {attr!r}; it must be <module>:<callable>")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{key}={spec} must name a callable, but {attr} is a {type(obj).__name__}")
    return obj


def takes_keyword(fn: Callable[..., Any], arg: str) -> bool:
    """Whether ``fn`` takes the keyword ``arg`` (by name or through ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # some builtins have no signature: pass nothing extra
        return False
    return any((p.name == arg and p.kind != p.POSITIONAL_ONLY) or p.kind == p.VAR_KEYWORD for p in params)


def source_digest(spec: str) -> str:
    """SHA-256 of the source file of the factory's module ('' when it has none): part of the
    cache key of what the factory determines, so editing the factory trains a new base model."""
    import hashlib

    module = importlib.import_module(spec.partition(":")[0])
    try:
        path = inspect.getsourcefile(module)
    except TypeError:  # a built-in module
        return ""
    if path is None:
        return ""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
