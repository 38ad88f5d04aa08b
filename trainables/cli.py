"""The shared front of the command lines: ``--help`` and one-line errors with exit code 2."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

__all__ = ["cli_config"]


def cli_config(doc: str, argv: list[str] | None, load: Callable[[list[str]], Any]) -> tuple[Any, int]:
    """``(cfg, 0)``, or ``(None, exit code)`` after ``-h`` (prints ``doc``, exit 0) or a bad input
    (one line on stderr, exit 2), so a user mistake never ends in a traceback."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(doc)
        return None, 0
    try:
        return load(argv), 0
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return None, 2
