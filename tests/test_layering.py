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
    assert "trainables.surgery" in imports_of("trainables.criteria._base")
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
