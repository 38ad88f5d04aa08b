"""The house's layering, checked on the source: imports go down ``search -> trainables -> data``
and never up, no package reaches into another's private modules, and no module imports
itself back through others (a circle), counting imports inside functions too: a function-level
import hides a circle from Python, not from a reader.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("data", "trainables", "search")  # bottom to top
LAYER = {name: i for i, name in enumerate(PACKAGES)}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


MODULES = _modules()


def _resolve(importer: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    is_pkg = MODULES[importer].name == "__init__.py"
    base = importer.split(".")
    base = base if is_pkg else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str) -> list[str]:
    """Every module ``module`` imports, at any depth of its code (``from p import m`` of a
    submodule ``m`` counts as ``p.m``)."""
    tree = ast.parse(MODULES[module].read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            found.append(target)
            found += [f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in MODULES]
    return found


def test_the_scan_sees_the_code():
    # A broken scan would pass every check below: make sure it finds known imports.
    assert "trainables.core.surgery" in imports_of("trainables.criteria._base")
    assert "data._datasets" in imports_of("data")
    assert len(MODULES) > 30


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down_the_layers(module):
    own = LAYER[module.split(".")[0]]
    upward = [t for t in imports_of(module) if t.split(".")[0] in LAYER and LAYER[t.split(".")[0]] > own]
    assert not upward, f"{module} imports {upward} from a layer above it ({' -> '.join(reversed(PACKAGES))})"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_private_imports_across_packages(module):
    own = module.split(".")[0]
    private = [
        t for t in imports_of(module)
        if any(part.startswith("_") and not part.startswith("__") for part in t.split(".")[1:])
        and t.split(".")[0] != own
    ]
    assert not private, f"{module} imports private modules of another package: {private}"


# Inside trainables, bottom to top. The modules at the top of the package (the commands and the
# Ray adapter) sit above every subpackage; a new subpackage must be placed here to pass.
SUBPACKAGES = ("core", "criteria", "protocol", "experiments", "cli")
TOP = len(SUBPACKAGES)
TRAINABLES = sorted(m for m in MODULES if m.startswith("trainables."))


def sublayer(module: str) -> int:
    """Where a ``trainables.*`` module sits: its subpackage's place, or TOP for a top-level module."""
    part = module.split(".")[1]
    return SUBPACKAGES.index(part) if part in SUBPACKAGES else TOP


def test_every_trainables_folder_has_a_layer():
    folders = {p.parent.name for p in (ROOT / "trainables").rglob("*.py") if p.parent != ROOT / "trainables"}
    assert folders == set(SUBPACKAGES), f"place the new subpackages in SUBPACKAGES: {sorted(folders ^ set(SUBPACKAGES))}"
    tops = sorted(m for m in TRAINABLES if sublayer(m) == TOP)
    # Only the commands and the Ray adapter live at the top: everything else has a layer below.
    assert tops == ["trainables.colour_report", "trainables.compress", "trainables.export",
                    "trainables.pretrain", "trainables.ray_trainable", "trainables.run"]


def test_sublayer_of_known_modules():
    assert sublayer("trainables.core.surgery") < sublayer("trainables.criteria.car") < sublayer("trainables.protocol.stages")
    assert sublayer("trainables.protocol.stages") < sublayer("trainables.experiments.compression") < sublayer("trainables.cli.compose")
    assert sublayer("trainables.cli.compose") < sublayer("trainables.run") == sublayer("trainables.ray_trainable")


@pytest.mark.parametrize("module", TRAINABLES)
def test_trainables_imports_go_down_its_subpackages(module):
    own = sublayer(module)
    upward = [t for t in imports_of(module)
              if t.startswith("trainables.") and t in MODULES and sublayer(t) > own]
    assert not upward, (f"{module} imports {upward} from above its layer "
                        f"({' -> '.join(reversed(SUBPACKAGES))} under the commands)")


@pytest.mark.parametrize("module", TRAINABLES)
def test_no_private_imports_across_subpackages(module):
    mine = module.split(".")[1]
    private = [t for t in imports_of(module)
               if t.startswith("trainables.") and t.split(".")[1] != mine
               and any(part.startswith("_") and not part.startswith("__") for part in t.split(".")[2:])]
    assert not private, f"{module} imports private modules of another subpackage: {private}"


def test_the_subpackage_checks_can_fail():
    # The checks above read imports_of; make sure they would see an upward and a private import.
    assert "trainables.criteria" in imports_of("trainables.protocol.greedy_car")
    assert sublayer("trainables.criteria") > sublayer("trainables.core.models")
    assert "trainables.criteria._base" in imports_of("trainables.criteria.car")


def circles_of(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every circle a depth-first walk of ``graph`` (module -> modules it imports) runs into."""
    circles: list[list[str]] = []
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt in path:
                circles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in done:
                visit(nxt, path)
        path.pop()
        done.add(node)

    for m in sorted(graph):
        if m not in done:
            visit(m, [])
    return circles


def test_circle_finder_finds_the_circle_this_house_once_had():
    # trainables.pretrain and trainables.run used to import each other inside functions.
    graph = {"trainables.run": {"trainables.pretrain"}, "trainables.pretrain": {"trainables.run", "data"}, "data": set()}
    assert circles_of(graph) == [["trainables.pretrain", "trainables.run", "trainables.pretrain"]]
    assert circles_of({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    graph = {m: {t for t in imports_of(m) if t in MODULES and t != m} for m in MODULES}
    # A package's __init__ re-exporting its own submodules is how packages work, not a circle.
    for m in graph:
        graph[m] = {t for t in graph[m] if not (MODULES[m].name == "__init__.py" and t.startswith(m + "."))}
    circles = circles_of(graph)
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)
