"""The configuration as documentation: the keys of ``conf/``, their defaults and comments.

``describe_config("config")`` lists every key a command line accepts, with its default and the
comment written beside it in the YAML; ``describe_groups("config")`` lists the config groups
(``data``, ``model``, ``criterion``, ``task``, ...) with their choices. ``--help``, the
unknown-key check of ``trainables.cli.compose`` and the configuration reference are all generated
from here, so the keys are written once, in ``conf/``.

This module reads ``conf/`` with PyYAML alone (no Hydra, no OmegaConf, no torch): ``--help`` and
a refused key answer without the second or two those imports take. It follows the part of
Hydra's defaults list that ``conf/`` uses (group entries, ``override``, ``optional``, ``_self_``,
``${group}`` in an option, ``# @package``); ``tests/test_help.py`` checks that it composes the
same keys and values as Hydra for every config and group choice.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "CONF_DIR", "FREE_FORM", "MISSING", "ConfigKey", "Group", "LightConfig", "compose_light", "describe_config",
    "describe_groups", "flatten", "format_reference", "group_options", "show_value", "split_override",
]

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
MISSING = "???"  # OmegaConf's mark of a value the user must give

# Maps whose keys are the user's own (passed on to a builder or a criterion, or checked against
# another table where they are read), so any key under them is accepted.
FREE_FORM = ("model.kwargs", "criterion.options", "criterion.weights", "search.prune_overrides")


@dataclass(frozen=True)
class ConfigKey:
    """One setting: its dotted key, default (as composed) and the comment beside it in ``conf/``."""

    key: str
    default: Any
    comment: str
    source: str  # the YAML file (relative to conf/) whose value is the default


@dataclass(frozen=True)
class Group:
    """A config group (a folder of ``conf/``) as a command line chooses it: ``data=cifar10``."""

    name: str
    choice: str | None
    options: tuple[str, ...]


@dataclass
class LightConfig:
    """A composition of ``conf/``: the nested values, each leaf key's comment and source file,
    and the option chosen for every group."""

    values: dict
    comments: dict[str, str]
    sources: dict[str, str]
    choices: dict[str, str]


def group_options(group: str) -> tuple[str, ...]:
    """The options of a config group: the YAML files of ``conf/<group>/``."""
    return tuple(sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")))


_OVERRIDE = re.compile(r"^(?P<prefix>\+\+|\+|~)?(?P<key>[^=]*?)(?:=(?P<value>.*))?$", re.DOTALL)


def split_override(text: str) -> tuple[str, str, str | None]:
    """``"+prune.ratio=0.3"`` -> ``("+", "prune.ratio", "0.3")``; the prefix is ``""``, ``"+"``,
    ``"++"`` or ``"~"``, the value ``None`` where no ``=`` was given (``~key``)."""
    match = _OVERRIDE.match(text.strip())
    assert match is not None  # the pattern accepts any string
    return match["prefix"] or "", match["key"].strip(), match["value"]


# ---------------------------------------------------------------- reading one YAML file

_KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w-]*)\s*:(?P<rest>.*)$")


def _split_comment(text: str) -> tuple[str, str]:
    """``"0.5   # share removed"`` -> ``("0.5", "share removed")``; a ``#`` inside quotes or
    brackets (``${oc.env:...}``, ``{low: 0.1}``) belongs to the value."""
    quote, depth = "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "#" and depth <= 0 and (i == 0 or text[i - 1] in " \t"):
            return text[:i].strip(), text[i + 1:].strip()
    return text.strip(), ""


def _comments(text: str) -> dict[str, str]:
    """Each key's comment, by dotted key within the file. A comment line indented past the key
    line just above continues that key's comment (the configs wrap long explanations so)."""
    out: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    last: str | None = None
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("#"):
            if last is not None and line.startswith(" "):
                more = stripped.lstrip("#").strip()
                out[last] = f"{out[last]} {more}".strip() if out.get(last) else more
            else:
                last = None
            continue
        match = _KEY_LINE.match(line)
        if match is None:  # a list item or the rest of a flow value
            last = None
            continue
        indent = len(match["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        key = ".".join([k for _, k in stack] + [match["key"]])
        value, comment = _split_comment(match["rest"])
        if value == "":
            stack.append((indent, match["key"]))
        out[key] = comment
        last = key
    return out


@dataclass(frozen=True)
class _File:
    rel: str  # e.g. "data/cifar10.yaml"
    package: str  # "" = the root
    defaults: tuple
    body: dict
    comments: dict


def _read(rel: str, group: str) -> _File:
    path = CONF_DIR / rel
    # keyed on the file's mtime too: a long-lived process (a test session) sees an edited file
    return _parse(path, rel, group, path.stat().st_mtime_ns)


@lru_cache(maxsize=256)
def _parse(path: Path, rel: str, group: str, mtime_ns: int) -> _File:
    text = path.read_text()
    package = group
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        header = re.match(r"#\s*@package\s+(\S+)", line)
        if header:
            package = "" if header.group(1) == "_global_" else header.group(1)
    body = yaml.safe_load(text) or {}
    defaults = tuple(body.pop("defaults", None) or ())
    comments = {k: c for k, c in _comments(text).items() if not k.startswith("defaults")}
    return _File(rel, package, defaults, body, comments)


# ---------------------------------------------------------------- the defaults list

def _entry(item: Any) -> tuple[str, str | None, str | None, bool, bool]:
    """A defaults-list item -> (kind, group or config name, option, optional, override)."""
    if isinstance(item, str):
        return ("self", None, None, False, False) if item == "_self_" else ("config", item, None, False, False)
    (head, option), = item.items()
    words = head.split()
    group = words[-1].lstrip("/")
    return "group", group, option, "optional" in words[:-1], "override" in words[:-1]


def _walk(rel: str, group: str, chosen: dict[str, str], found: dict[str, str], order: list[_File]) -> None:
    """Depth-first over a file's defaults list (``_self_`` last unless placed), appending the
    files to merge in order; ``override`` entries are collected into ``found``."""
    f = _read(rel, group)
    entries = [_entry(item) for item in f.defaults]
    if not any(kind == "self" for kind, *_ in entries):
        entries.append(("self", None, None, False, False))
    for kind, name, option, optional, override in entries:
        if kind == "self":
            order.append(f)
        elif kind == "config":
            _walk(f"{name}.yaml", "", chosen, found, order)
        elif override:
            found.setdefault(name, str(option))
        else:
            option = chosen.get(name, str(option))
            option = re.sub(r"\$\{(\w+)\}", lambda m: chosen.get(m.group(1), m.group(0)), option)
            chosen.setdefault(name, option)
            if optional and not (CONF_DIR / name / f"{option}.yaml").is_file():
                continue
            if not (CONF_DIR / name / f"{option}.yaml").is_file():
                valid = ", ".join(group_options(name))
                raise ValueError(f"unknown {name} '{option}'; valid: {valid}")
            _walk(f"{name}/{option}.yaml", name, chosen, found, order)


def _merge(into: dict, new: Mapping) -> None:
    for key, value in new.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = _copy(value)


def _copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def compose_light(config_name: str, choices: Mapping[str, str] | None = None) -> LightConfig:
    """The composition of ``conf/<config_name>.yaml`` with the given group choices (those of the
    command line, e.g. ``{"data": "cifar10"}``), before any ``key=value``. Interpolations stay
    as written (``${oc.env:...}``); an unknown option is a one-line ``ValueError``."""
    given = dict(choices or {})
    overrides: dict[str, str] = {}
    for _ in range(4):  # an override met late (task=detection overrides data) re-chooses earlier groups
        chosen = {**overrides, **given}
        found: dict[str, str] = {}
        order: list[_File] = []
        _walk(f"{config_name}.yaml", "", chosen, found, order)
        if found == overrides:
            break
        overrides = found
    values: dict = {}
    comments: dict[str, str] = {}
    sources: dict[str, str] = {}
    for f in order:
        prefix = f"{f.package}." if f.package else ""
        body = f.body
        for part in reversed(f.package.split(".") if f.package else []):
            body = {part: body}
        _merge(values, body)
        for key in flatten(f.body, keep_maps=True):
            sources[prefix + key] = f.rel
        for key, text in f.comments.items():
            if text or prefix + key not in comments:
                comments[prefix + key] = text
    return LightConfig(values, comments, sources, chosen)


def flatten(values: Mapping, prefix: str = "", keep_maps: bool = False) -> dict[str, Any]:
    """``{"prune": {"ratio": 0.5}}`` -> ``{"prune.ratio": 0.5}``; an empty map stays a leaf,
    and with ``keep_maps`` every map is listed too."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            if keep_maps:
                out[path] = value
            out.update(flatten(value, f"{path}.", keep_maps))
        else:
            out[path] = value
    return out


# ---------------------------------------------------------------- what help and the docs show

def _group_choices(config_name: str, overrides: Iterable[str]) -> dict[str, str]:
    """The ``group=option`` overrides of a command line (``+``/``++``/``~`` forms are key overrides)."""
    out = {}
    for text in overrides:
        prefix, key, value = split_override(text)
        if not prefix and value is not None and (CONF_DIR / key).is_dir():
            out[key] = value
    return out


def describe_groups(config_name: str, overrides: Iterable[str] = ()) -> list[Group]:
    """The groups of a config, as chosen by its defaults and the command line's ``group=option``."""
    light = compose_light(config_name, _group_choices(config_name, overrides))
    return [Group(name, option, group_options(name)) for name, option in light.choices.items()
            if (CONF_DIR / name).is_dir()]


def describe_config(config_name: str, overrides: Iterable[str] = ()) -> list[ConfigKey]:
    """Every leaf key of a config in file order, with its default and comment (the command
    line's ``group=option`` choices applied, so ``data=cifar10`` shows CIFAR-10's keys)."""
    light = compose_light(config_name, _group_choices(config_name, overrides))
    return [ConfigKey(key, value, light.comments.get(key, ""), light.sources.get(key, ""))
            for key, value in flatten(light.values).items()]


def show_value(value: Any) -> str:
    """A default as it would be written on the command line (YAML flow style)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (dict, list)):
        return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return str(value)


def format_reference(config_name: str, overrides: Iterable[str] = (), width: int = 100) -> str:
    """The plain-text listing ``--help`` prints: groups with their choices, then every key with
    its default and comment, one per line (long comments cut at ``width``)."""
    lines = ["config groups (group=option; the chosen one is marked *):"]
    for g in describe_groups(config_name, overrides):
        options = " ".join(f"*{o}" if o == g.choice else o for o in g.options)
        lines.append(f"  {g.name:<12} {options}")
    lines.append("")
    lines.append("keys (key=value; default, then what the comment in conf/ says):")
    import textwrap

    for k in describe_config(config_name, overrides):
        lines.append(f"  {k.key} = {show_value(k.default)}")
        if k.comment:  # wrapped under the key, so a long explanation is read whole
            lines += textwrap.wrap(k.comment, width, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)
