"""MkDocs hooks: pages generated from the repository at build time, so they cannot drift.

- ``reference/configuration.md``: every config of ``conf/``, every key, its default and its comment
  (the comment is where each key says what it allows), read from the YAML files themselves.
- ``results.md``: ``bench/RESULTS.md`` as it is, with any image it shows copied beside it.

Wired in ``mkdocs.yml`` (``hooks: [docs/hooks.py]``); nothing here imports the project, so the
site builds without torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
RESULTS = ROOT / "bench" / "RESULTS.md"
CONFIG_PAGE = "reference/configuration.md"
RESULTS_PAGE = "results.md"

# What each top-level config is composed for (the command lines read these through
# trainables.compose / search.launch / search.study / trainables.compress).
COMMANDS = {
    "config": "python -m trainables.run, python -m trainables.pretrain, python -m trainables.colour_report",
    "launch": "python -m search.launch, python -m search.blend",
    "study": "python -m search.study",
    "compress": "python -m trainables.compress",
}

_KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w.-]*|'[^']*'|\"[^\"]*\"):(?P<rest>.*)$")
_LIST_ITEM = re.compile(r"^ *- ")


@dataclass
class Entry:
    """One key of a YAML file: its dotted path, the default as written, and its comment."""

    key: str
    default: str
    comment: list[str] = field(default_factory=list)


@dataclass
class ConfigFile:
    """A parsed config: its header comment, its ``defaults:`` list and its keys in file order."""

    path: Path
    header: list[str]
    defaults: list[tuple[str, str, str]]  # (group, default option, comment)
    entries: list[Entry]


def _split_comment(text: str) -> tuple[str, str]:
    """``value  # comment`` -> (value, comment); a ``#`` inside quotes or ``${...}`` is part of the value."""
    quote, depth = "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
        elif ch == "#" and depth <= 0 and (i == 0 or text[i - 1] in " \t"):
            return text[:i].strip(), text[i + 1:].strip()
    return text.strip(), ""


def parse_config(path: Path) -> ConfigFile:
    """Read a Hydra YAML file line by line, keeping what a YAML loader throws away: comments.

    A comment line right under a key's line, indented past the key, continues that key's comment
    (the configs wrap long explanations that way).
    """
    lines = path.read_text().splitlines()
    header: list[str] = []
    i = 0
    while i < len(lines) and (lines[i].startswith("#") or not lines[i].strip()):
        if lines[i].startswith("#"):
            header.append(lines[i].lstrip("#").strip())
        i += 1
    defaults: list[tuple[str, str, str]] = []
    entries: list[Entry] = []
    stack: list[tuple[int, str]] = []  # (indent, key) of the open mappings
    last: Entry | None = None
    in_defaults = False
    for line in lines[i:]:
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("#"):
            # a wrapped comment continues the previous key's; a comment at column 0 starts a new block
            if last is not None and line.startswith(" "):
                last.comment.append(stripped.lstrip("#").strip())
            else:
                last = None
            continue
        if in_defaults and _LIST_ITEM.match(line):
            value, comment = _split_comment(line.split("-", 1)[1])
            group, _, option = value.partition(":")
            defaults.append((group.strip(), option.strip(), comment))
            last = None
            continue
        match = _KEY.match(line)
        if match is None:  # a block-style list item or a continuation of a flow value: part of the key above
            continue
        indent = len(match["indent"])
        in_defaults = indent == 0 and match["key"] == "defaults"
        if in_defaults:
            last = None
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        key = ".".join([k for _, k in stack] + [match["key"].strip("'\"")])
        value, comment = _split_comment(match["rest"])
        if value == "":  # a mapping (or a block list) opens here
            stack.append((indent, match["key"].strip("'\"")))
        last = Entry(key, value, [comment] if comment else [])
        entries.append(last)
    return ConfigFile(path, header, defaults, entries)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _code(value: str) -> str:
    if value == "":
        return "(section)"
    return "``" + value.replace("|", "\\|") + "``" if "`" in value else f"`{_cell(value)}`"


def _table(entries: list[Entry]) -> list[str]:
    rows = ["| key | default | what it means, what is allowed |", "|---|---|---|"]
    rows += [f"| `{e.key}` | {_code(e.default)} | {_cell(' '.join(e.comment))} |" for e in entries]
    return rows


def _header(cfg: ConfigFile) -> list[str]:
    return [" ".join(cfg.header), ""] if cfg.header else []


def config_reference(conf: Path = CONF) -> str:
    """The configuration reference page, in Markdown, from every YAML file under ``conf``."""
    out = [
        "# Configuration reference",
        "",
        "Generated from `conf/` each time the site is built (`docs/hooks.py`), so it shows exactly",
        "what the YAML files hold: every key, its default as written, and the comment beside it,",
        "which says what the key means and what it allows. A command line changes any key with",
        "Hydra's `key=value`; a group (`model=`, `data=`, ...) swaps in one of the files listed under it.",
        "The checks behind the comments run before any work starts and answer a bad value in one line",
        "naming the key, the value and what is allowed.",
        "",
        "## Top-level configs",
        "",
    ]
    for name in sorted(p.stem for p in conf.glob("*.yaml")):
        cfg = parse_config(conf / f"{name}.yaml")
        out += [f"### `conf/{name}.yaml`", ""]
        if name in COMMANDS:
            out += [f"Composed by: `{'`, `'.join(COMMANDS[name].split(', '))}`.", ""]
        out += _header(cfg)
        if cfg.defaults:
            out += ["| defaults entry | option | comment |", "|---|---|---|"]
            out += [f"| `{g}` | {_code(o) if o else ''} | {_cell(c)} |" for g, o, c in cfg.defaults]
            out += [""]
        if cfg.entries:
            out += [*_table(cfg.entries), ""]
    out += ["## Groups", "",
            "A group is a folder of `conf/`; `group=option` picks the file `conf/group/option.yaml`, whose",
            "keys then live under `group.` (for example `model.pretrain.epochs`). Groups whose name starts",
            "with `task_` are picked by `task=` itself and are not named on the command line.", ""]
    for group in sorted(p for p in conf.iterdir() if p.is_dir()):
        options = sorted(group.glob("*.yaml"))
        out += [f"### `{group.name}`", "", "Options: " + ", ".join(f"`{p.stem}`" for p in options) + ".", ""]
        for path in options:
            cfg = parse_config(path)
            out += [f"#### `{group.name}={path.stem}`", "", *_header(cfg)]
            if cfg.defaults:
                out += ["Defaults list: " + ", ".join(f"`{g}: {o}`" if o else f"`{g}`" for g, o, _ in cfg.defaults), ""]
            if cfg.entries:
                out += [*_table(cfg.entries), ""]
    return "\n".join(out) + "\n"


_IMAGE = re.compile(r"!\[[^\]]*\]\((?P<src>[^)\s]+)")


def results_page(results: Path = RESULTS) -> tuple[str, list[str]]:
    """``bench/RESULTS.md`` and the relative paths of the images it shows (copied beside it)."""
    text = results.read_text()
    images = [m["src"] for m in _IMAGE.finditer(text) if "://" not in m["src"]]
    intro = ("!!! note \"Source\"\n    This page is `bench/RESULTS.md`, included as it is when the site is built: "
             "every number comes with its machine, versions and command.\n\n")
    return intro + text, images


def on_files(files: Any, config: Any) -> Any:
    """Add the generated pages (and the results' figures) to the site's files."""
    from mkdocs.structure.files import File

    files.append(File.generated(config, CONFIG_PAGE, content=config_reference()))
    text, images = results_page()
    files.append(File.generated(config, RESULTS_PAGE, content=text))
    for src in images:
        image = (RESULTS.parent / src).resolve()
        if image.is_file():  # a missing one stays a broken link, which --strict reports
            files.append(File.generated(config, src, abs_src_path=str(image)))
    return files


def on_config(config: Any) -> Any:
    """Rebuild on ``mkdocs serve`` when a source of a generated page changes."""
    config.watch.extend([str(CONF), str(RESULTS)])
    return config
