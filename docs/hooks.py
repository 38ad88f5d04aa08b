"""MkDocs hooks: pages generated from the repository at build time, so they cannot drift.

- ``reference/configuration.md``: every command's config and every option of every group, each
  key with its default and the comment beside it in ``conf/``, through ``trainables.cli.confdoc``
  (the same reader ``--help`` and the unknown-key check use; it needs PyYAML, not torch).
- ``reference/api-trainables.md`` and ``reference/api-search.md``: mkdocstrings blocks for every
  name of ``trainables.__all__`` and every public module of ``search`` that declares ``__all__``
  (``data`` is documented whole, statically, by its own page).
- ``results.md``: ``bench/RESULTS.md`` as it is, with any image it shows copied beside it.

Wired in ``mkdocs.yml`` (``hooks: [docs/hooks.py]``).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
RESULTS = ROOT / "bench" / "RESULTS.md"
CONFIG_PAGE = "reference/configuration.md"
RESULTS_PAGE = "results.md"
if str(ROOT) not in sys.path:  # mkdocs does not put the project on the path
    sys.path.insert(0, str(ROOT))

# The command lines that compose each top-level config (trainables.cli.compose, search.launch,
# search.study and trainables.compress read them).
COMMANDS = {
    "config": ("python -m trainables.run", "python -m trainables.pretrain", "python -m trainables.colour_report"),
    "launch": ("python -m search.launch", "python -m search.blend"),
    "study": ("python -m search.study",),
    "compress": ("python -m trainables.compress",),
}


def header_comment(path: Path) -> str:
    """The comment block a YAML file opens with (its description), without Hydra's directives."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if not text.startswith("@package"):
            lines.append(text)
    return " ".join(lines).strip()


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _code(value: Any) -> str:
    from trainables.cli.confdoc import show_value

    text = _cell(show_value(value))
    return f"``{text}``" if "`" in text else f"`{text}`"


def _key_table(keys: list[Any], with_source: bool) -> list[str]:
    if not keys:
        return ["(no keys of its own)", ""]
    head = "| key | default | what it means, what is allowed |" + (" set in |" if with_source else "")
    rows = [head, "|---|---|---|" + ("---|" if with_source else "")]
    for k in keys:
        row = f"| `{k.key}` | {_code(k.default)} | {_cell(k.comment)} |"
        rows.append(row + (f" `{k.source}` |" if with_source else ""))
    return [*rows, ""]


def config_reference() -> str:
    """The configuration reference page, in Markdown, from ``conf/`` through ``trainables.cli.confdoc``."""
    from trainables.cli.confdoc import describe_config, describe_groups

    out = [
        "# Configuration reference",
        "",
        "Generated from `conf/` each time the site is built (`docs/hooks.py`, through",
        "`trainables.cli.confdoc`, which also writes every command's `--help`), so it cannot disagree with",
        "the configs: every key, its default and the comment beside it, which says what the key means",
        "and what it allows. A command line changes a key with Hydra's `key=value`; a group",
        "(`model=`, `data=`, ...) swaps in one file of its folder. The checks behind the comments run",
        "before any work starts and answer a bad value in one line naming the key, the value and what",
        "is allowed.",
        "",
        "## Commands",
        "",
    ]
    tops = sorted(p.stem for p in CONF.glob("*.yaml"))
    owner: dict[str, str] = {}  # group -> the first top-level config that composes it
    for name in tops:
        out += [f"### `conf/{name}.yaml`", ""]
        if name in COMMANDS:
            out += ["Read by " + ", ".join(f"`{c}`" for c in COMMANDS[name]) + ".", ""]
        if header := header_comment(CONF / f"{name}.yaml"):
            out += [header, ""]
        groups = describe_groups(name)
        if groups:
            out += ["| group | default | options |", "|---|---|---|"]
            out += [f"| `{g.name}` | `{g.choice}` | {', '.join(g.options)} |" for g in groups]
            out += [""]
        for g in groups:
            owner.setdefault(g.name, name)
        out += _key_table(describe_config(name), with_source=True)
    out += ["## Group options", "",
            "The keys each option file sets, as composed by the command that reads the group (a key the",
            "option does not set keeps the default shown above). `task_search` and `task_study` are not",
            "named on the command line: `task=` picks them for `search.launch` and `search.study`.", ""]
    for group in sorted(owner):
        top = owner[group]
        out += [f"### `{group}`", ""]
        for path in sorted((CONF / group).glob("*.yaml")):
            out += [f"#### `{group}={path.stem}`", ""]
            if header := header_comment(path):
                out += [header, ""]
            source = f"{group}/{path.stem}.yaml"
            keys = [k for k in describe_config(top, [f"{group}={path.stem}"]) if k.source == source]
            out += _key_table(keys, with_source=False)
    rest = sorted(p for p in CONF.iterdir() if p.is_dir() and p.name not in owner)
    if rest:
        out += ["## Other folders", "",
                "Folders of `conf/` that are not config groups: their files are named by a key (class",
                "subsets by `subset=<name>`), each shown here with its own comment.", ""]
        for folder in rest:
            out += [f"### `conf/{folder.name}/`", ""]
            for path in sorted(folder.glob("*.yaml")):
                # the comment as written: these carry example commands and lists line by line
                lines = [ln.lstrip("#")[1:] for ln in path.read_text().splitlines()
                         if ln.startswith("#") and "@package" not in ln]
                out += [f"#### `{path.stem}`", "", "```text", *lines, "```", ""]
            out += [""]
    return "\n".join(out) + "\n"


def _public_home(package: str, name: str) -> str:
    """The dotted path the API page documents ``package.name`` under: the public module nearest
    to where it is defined that exports it as a plain import (a package exporting its names on
    first use, PEP 562, shows griffe no members)."""
    import importlib

    defined = getattr(getattr(importlib.import_module(package), name), "__module__", package)
    parts = defined.split(".")
    for end in range(len(parts), 1, -1):
        module = ".".join(parts[:end])
        if not any(p.startswith("_") for p in parts[:end]) and hasattr(importlib.import_module(module), name):
            return f"{module}.{name}"
    return f"{package}.{name}"


def api_trainables() -> str:
    """The core's public names (``trainables.__all__``), each under the module that defines it."""
    import trainables

    homes = sorted((_public_home("trainables", n), n) for n in trainables.__all__)
    out = ["# API: `trainables`", "",
           "The pruning core: plain PyTorch and torch-pruning, usable in a notebook or a test without Ray,",
           "Optuna or MLflow. Every name below is exported by the package (`trainables.__all__`), so",
           "`from trainables import prune_layer` works; each is documented under the module that holds it.",
           "This page is generated from `__all__` when the site is built (`docs/hooks.py`).", ""]
    for path, _ in homes:
        out += [f"::: {path}", ""]
    return "\n".join(out)


def api_data() -> str:
    """The data layer's public names (``data.__all__``), each under the module that defines it:
    the package binds them on first use (PEP 562), which griffe cannot follow, and its modules
    are private, so each block names the defining module and shows the public name."""
    import importlib

    import data

    out = ["# API: `data`", "",
           "Data sets and loaders, offline: the registry every layer uses, seeded validation splits, class",
           "subsets and data fractions. Every name below is exported by the package (`data.__all__`), so",
           "`from data import get_data` works; the package imports its loaders (and torch) on the first",
           "use of a name. This page is generated from `__all__` when the site is built (`docs/hooks.py`).", ""]
    for name in sorted(data.__all__):
        obj = getattr(data, name)
        module = getattr(obj, "__module__", None) or "data"
        attr = getattr(obj, "__name__", name)
        if module == "data" or not hasattr(importlib.import_module(module), attr):  # a constant: where it is assigned
            module, attr = _assigned_in("data", name), name
        out += [f"::: {module}.{attr}", "    options:", "      show_root_full_path: false", ""]
    return "\n".join(out)


def _assigned_in(package: str, name: str) -> str:
    """The module of ``package`` whose source assigns ``name`` at the top level."""
    for path in sorted((ROOT / package).glob("*.py")):
        if re.search(rf"^{re.escape(name)}\s*[:=]", path.read_text(), re.MULTILINE):
            return f"{package}.{path.stem}"
    raise ValueError(f"{package}.{name}: no module of {package} assigns it; document it by hand")


def api_search() -> str:
    """Every public module of ``search`` that declares ``__all__``, found on disk."""
    package = ROOT / "search"
    modules = sorted(
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for p in package.rglob("*.py")
        if not any(part.startswith("_") and part != "__init__.py" for part in p.relative_to(package).parts)
        and p.name != "__main__.py" and re.search(r"^__all__ = \[[^\]]", p.read_text(), re.MULTILINE))
    out = ["# API: `search`", "",
           "The search layer drives the core through Ray Tune, Optuna and MLflow. The package exports",
           "nothing itself; its public face is one module per concern, each with its own `__all__`. This",
           "page lists every such module, found when the site is built (`docs/hooks.py`).", ""]
    for module in modules:
        out += [f"::: {module}", ""]
    return "\n".join(out)


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
    files.append(File.generated(config, "reference/api-trainables.md", content=api_trainables()))
    files.append(File.generated(config, "reference/api-search.md", content=api_search()))
    files.append(File.generated(config, "reference/api-data.md", content=api_data()))
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
