"""From a command line to a run: the shared front of every ``python -m trainables.<command>``.

This package holds what turns typed ``key=value`` overrides into work: Hydra composition of
``conf/`` and the typed configs it yields (``compose``), what a command line may set
(``keycheck``), ``conf/`` as documentation (``confdoc``, also behind ``--help`` and the docs'
configuration reference), and the base model a config names, trained once and cached
(``base_model``). The commands themselves are the modules at the top of ``trainables``.

This module: the shared front of the command lines: ``--help``, ``--cfg job`` and one-line errors with exit code 2.

Nothing here imports torch, Hydra or OmegaConf at module level: ``--help`` (generated from
``conf/`` by ``trainables.cli.confdoc``) and a refused key answer before those imports.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["HELP_FLAGS", "cli_config", "help_text", "run_cli", "save_run"]

HELP_FLAGS = ("-h", "--help")


def help_text(doc: str, config_name: str, overrides: Sequence[str] = ()) -> str:
    """The command's docstring, then its config groups and keys with defaults and comments
    (``conf/<config_name>.yaml`` with the ``group=option`` choices of ``overrides`` applied)."""
    from trainables.cli.confdoc import format_reference

    tail = ("\noptions:\n  -h, --help    this text (anywhere on the line; data=cifar10 --help shows CIFAR-10's keys)\n"
            "  --cfg job     print the resolved config, every check run, and exit without running\n\n"
            "Each key=value sets a key listed below; an unknown key, with or without +, is refused with its\n"
            "close matches, and so is a setting the chosen schedule or method does not read.\n")
    return f"{doc.strip()}\n{tail}\n{format_reference(config_name, overrides)}"


def _flags(argv: list[str]) -> tuple[list[str], bool, bool]:
    """``(overrides, help, cfg_job)``: ``--help`` and ``--cfg job`` pulled out wherever they stand."""
    rest, show_help, cfg_job, i = [], False, False, 0
    while i < len(argv):
        arg = argv[i]
        if arg in HELP_FLAGS:
            show_help = True
        elif arg == "--cfg" and i + 1 < len(argv) and argv[i + 1] == "job" or arg == "--cfg=job":
            cfg_job = True
            i += arg == "--cfg"
        elif arg.startswith("-") and "=" not in arg:
            raise ValueError(f"options must be -h/--help or --cfg job (settings are key=value), but got {arg!r}")
        else:
            rest.append(arg)
        i += 1
    return rest, show_help, cfg_job


def cli_config(doc: str, argv: list[str] | None, load: Callable[[list[str]], Any],
               config_name: str = "config", help_overrides: Sequence[str] = ()) -> tuple[Any, int]:
    """``(cfg, 0)``, or ``(None, exit code)`` after ``--help`` (prints ``doc`` and the keys of
    ``conf/<config_name>.yaml``, exit 0), ``--cfg job`` (prints the checked, resolved config,
    exit 0) or a bad input (one line on stderr, exit 2), so a user mistake never ends in a traceback.
    ``help_overrides`` are the group choices the command itself adds (``search=blended``)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        overrides, show_help, cfg_job = _flags(argv)
        if show_help:
            print(help_text(doc, config_name, [*help_overrides, *overrides]))
            return None, 0
        cfg = load(overrides)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return None, 2
    if cfg_job:
        from omegaconf import OmegaConf

        print(OmegaConf.to_yaml(cfg, resolve=True), end="")
        return None, 0
    return cfg, 0


def run_cli(doc: str, argv: list[str] | None, load: Callable[[list[str]], Any],
            run: Callable[[Any], tuple[dict, Path]], summary: Callable[[dict], str], config_name: str = "config") -> int:
    """A run-one-thing command line: the config (``cli_config``), ``run(cfg) -> (record, path)``,
    then the summary and the record's path as the last line. Bad input that shows only once the
    work has started (missing data files, a FLOPs target out of reach) is a one-line error too."""
    cfg, code = cli_config(doc, argv, load, config_name)
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
