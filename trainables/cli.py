"""The shared front of the command lines: ``--help`` and one-line errors with exit code 2."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["cli_config", "run_cli", "save_run"]


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


def run_cli(doc: str, argv: list[str] | None, load: Callable[[list[str]], Any],
            run: Callable[[Any], tuple[dict, Path]], summary: Callable[[dict], str]) -> int:
    """A run-one-thing command line: the config (``cli_config``), ``run(cfg) -> (record, path)``,
    then the summary and the record's path as the last line. Bad input that shows only once the
    work has started (missing data files, a FLOPs target out of reach) is a one-line error too."""
    cfg, code = cli_config(doc, argv, load)
    if cfg is None:
        return code
    try:
        record, path = run(cfg)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary(record))
    print(path)
    return 0


def save_run(cfg: Any, record: dict, name: str) -> Path:
    """A new folder ``<cfg.output_dir>/<timestamp>-<name>`` holding the resolved ``config.yaml``
    and ``record.json``; returns the folder."""
    from omegaconf import OmegaConf

    out = Path(cfg.output_dir).expanduser().resolve() / f"{time.strftime('%Y%m%d-%H%M%S')}-{name}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (out / "record.json").write_text(json.dumps(record, indent=1))
    return out
