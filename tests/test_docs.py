"""The documentation cannot drift from the code: every ``python -m ...`` command shown in README.md
and docs/ is composed and checked the way its command line does it (Hydra composition plus every
check that runs before work starts), but never run. A renamed key, a removed option or a value a
check now refuses fails here instead of in a reader's terminal.

What is checked, and what is stood in for (documented here, the one place that decides it):

- Paths a command needs to exist (``model.weights=``, ``data.root=``, ...) and ``$VARIABLES`` are
  replaced by stand-ins under ``tmp_path`` (an empty weights file, empty folders), since the docs
  show the reader's own files; the compose checks only test that a weights file exists.
- ``...`` and ``[key=value ...]`` stand for elided arguments and are left out.
- ``resume=<folder>`` continues a search that ran: the rest of the command is composed without it.
- ``python -m search.study_report <folder>`` re-renders a finished study and
  ``python -m trainables.export <folder>`` exports a finished run: the folder is the reader's, so
  only the options are checked (study_report's names, export's own argument parser).
- A module the test does not know fails the test: add its loader to ``LOADERS``.

``python bench/<script>.py`` commands are checked only for the script's existence.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

_FENCE = re.compile(r"^ *(```|~~~)")
_INLINE = re.compile(r"`(python -m [^`]+)`")
_BENCH = re.compile(r"python (bench/[\w./-]+\.py)")
_PLACEHOLDER = re.compile(r"<[^<>\n]+>")
_VARIABLE = re.compile(r"\$\{?(\w+)\}?")
# Keys whose value is the reader's own file or folder (checked for existence, or written to).
PATH_KEYS = {"model.weights", "data.root", "storage_path", "output_root", "cache_dir", "output_dir", "resume"}


@dataclass(frozen=True)
class Command:
    """One documented command: where it is shown and its words after ``python -m``."""

    where: str  # file:line
    module: str
    args: tuple[str, ...]


def _code_lines(text: str) -> list[tuple[int, str]]:
    """(line number, command line) of every fenced or indented code line, with backslash
    continuations joined, followed by the inline ``python -m`` spans of the prose."""
    out: list[tuple[int, str]] = []
    prose: list[str] = []
    in_fence, pending, start = False, "", 0
    for n, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            in_fence = not in_fence
            prose.append("")
            continue
        indented = not in_fence and line.startswith("    ") and line.strip().startswith("python -m ")
        if not (in_fence or indented or pending):
            prose.append(line)
            continue
        prose.append("")
        start = start or n
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((start, pending + line))
        pending, start = "", 0
    flat = "\n".join(prose)
    for match in _INLINE.finditer(flat):
        out.append((flat.count("\n", 0, match.start()) + 1, " ".join(match[1].split())))
    return out


def documented_commands() -> list[Command]:
    commands = []
    for path in DOC_FILES:
        rel = path.relative_to(ROOT)
        for n, line in _code_lines(path.read_text()):
            at = line.find("python -m ")
            if at < 0:
                continue
            words = shlex.split(_PLACEHOLDER.sub("PLACEHOLDER", line[at:]), comments=True)
            # a shell line may go on after the command (`&&`, `;`, `|`)
            end = next((i for i, w in enumerate(words) if w in ("&&", ";", "|", "||")), len(words))
            # `...` (or `[key=value ...]`) elides arguments: the rest of the command is composed
            args = tuple(w for w in words[3:end] if "..." not in w and w != "[key=value")
            # --help / --cfg job are the command line's own flags (trainables.cli), not overrides
            args = tuple(w for i, w in enumerate(args) if w not in ("-h", "--help", "--cfg", "--cfg=job")
                         and not (w == "job" and i and args[i - 1] == "--cfg"))
            commands.append(Command(f"{rel}:{n}", words[2], args))
    return commands


def _stand_ins(args: tuple[str, ...], tmp: Path) -> list[str]:
    """The command's overrides with the reader's paths and variables replaced by stand-ins."""
    weights = tmp / "weights.pth"
    weights.touch()
    out = []
    for arg in args:
        arg = _VARIABLE.sub(lambda m: str(tmp / m[1].lower()), arg)
        key, eq, value = arg.partition("=")
        if eq and key.lstrip("+") in PATH_KEYS and key != "resume":
            if key.lstrip("+") == "model.weights":
                value = str(weights)
            else:
                value = str(tmp / key.replace(".", "_"))
                Path(value).mkdir(exist_ok=True)
            arg = f"{key}={value}"
        if not arg.startswith("resume="):
            out.append(arg)
    return out


def _run_config(args: list[str]) -> Any:
    from trainables.cli.compose import load_run_config

    return load_run_config(args)


def _search(args: list[str]) -> Any:
    from search.launch import load_search_config

    return load_search_config(args)


def _blend(args: list[str]) -> Any:
    return _search(["search=blended", *args])


def _study(args: list[str]) -> Any:
    from search.study import load_study_config

    return load_study_config(args)


def _compress(args: list[str]) -> Any:
    from trainables.compress import load_compress_config

    return load_compress_config(args)


def _colour_report(args: list[str]) -> Any:
    # the report's own option parser, then every (seed, variant) run config it would compose
    from trainables import colour_report

    opts, overrides, merge = colour_report._parse(args)
    return merge if merge is not None else colour_report._configs(opts, overrides)


def _criteria(args: list[str]) -> Any:
    from trainables.criteria.__main__ import main

    return main(args)


def _study_report(args: list[str]) -> Any:
    # The folder is a finished study's; its options go through the command's parser, which
    # answers a bad one with exit code 2 before reading the folder.
    from search.study_report import main

    options = args[1:]
    bad = [a for a in options if a.partition("=")[0] not in ("margin", "metric")]
    if bad:
        raise ValueError(f"unknown option {bad[0]!r}; valid: margin, metric")
    assert main(["--help"]) == 0
    return options


def _export(args: list[str]) -> Any:
    from trainables import export

    return export._parse(args)


LOADERS: dict[str, Callable[[list[str]], Any]] = {
    "trainables.run": _run_config,
    "trainables.pretrain": _run_config,
    "trainables.compress": _compress,
    "trainables.colour_report": _colour_report,
    "trainables.criteria": _criteria,
    "search.launch": _search,
    "search.blend": _blend,
    "search.study": _study,
    "search.study_report": _study_report,
    "trainables.export": _export,
}

COMMANDS = documented_commands()
_COMPOSED: set[tuple[str, tuple[str, ...]]] = set()  # commands already composed in this session


def test_the_docs_show_the_main_commands() -> None:
    """The extraction finds what the README promises; an empty list would make the test below vacuous."""
    shown = {c.module for c in COMMANDS if c.where.startswith("README.md")}
    assert {"search.launch", "trainables.run", "search.study"} <= shown, shown
    assert len(COMMANDS) >= 40


@pytest.mark.parametrize("command", COMMANDS, ids=[c.where for c in COMMANDS])
def test_documented_command_composes(command: Command, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert command.module in LOADERS, (
        f"{command.where}: no loader for python -m {command.module}; add one to LOADERS in tests/test_docs.py")
    key = (command.module, command.args)
    if key in _COMPOSED:  # the README repeats commands of the guides: compose each once
        return
    monkeypatch.setenv("PRUNESEARCH_CACHE", str(tmp_path / "cache"))
    args = _stand_ins(command.args, tmp_path)
    try:
        LOADERS[command.module](args)
    except (ValueError, SystemExit) as err:
        pytest.fail(f"{command.where}: python -m {command.module} {' '.join(command.args)}\n  -> {err}")
    _COMPOSED.add(key)


def test_bench_scripts_shown_exist() -> None:
    shown = {(path.relative_to(ROOT), m[1]) for path in DOC_FILES for m in _BENCH.finditer(path.read_text())}
    assert shown, "no bench command found in the docs"
    missing = [f"{where}: {script}" for where, script in sorted(shown) if not (ROOT / script).is_file()]
    assert not missing, missing


def test_extraction_reads_fences_continuations_and_inline_code() -> None:
    text = "\n".join([
        "Run `python -m trainables.run prune.ratio=0.3` or:", "",
        "```bash",
        "python -m search.launch a=1 \\",
        "    b=2   # comment",
        "cd x && python -m search.study c=3 && echo done",
        "```",
        "    python -m trainables.run d=4",
    ])
    lines = [" ".join(shlex.split(line, comments=True)) for _, line in _code_lines(text)]
    assert lines == ["python -m search.launch a=1 b=2", "cd x && python -m search.study c=3 && echo done",
                     "python -m trainables.run d=4", "python -m trainables.run prune.ratio=0.3"]


@pytest.mark.parametrize("module, args", [
    ("trainables.run", ["prune.ratio=1.5"]),
    ("search.launch", ["search.sampler=nope"]),
    ("search.study", ["study=nope"]),
    ("trainables.compress", ["compress.bits=0"]),
    ("trainables.colour_report", ["--order", "nope"]),
    ("trainables.export", ["outputs/runs/x", "--format", "nope"]),
])
def test_loaders_refuse_what_the_command_refuses(module: str, args: list[str]) -> None:
    """A loader that accepted anything would let every documented command pass."""
    with pytest.raises(ValueError):
        LOADERS[module](args)


def test_readme_links_resolve() -> None:
    """The README is read on GitHub, outside the site: its relative links must name real files."""
    text = (ROOT / "README.md").read_text()
    targets = [m[1].split("#")[0] for m in re.finditer(r"\]\(([^)\s]+)\)", text) if "://" not in m[1]]
    assert targets
    missing = [t for t in targets if not (ROOT / t).exists()]
    assert not missing, missing


_LIST_ITEM = re.compile(r"(- |\* |\d+\. )")


def _lists_glued_to_a_paragraph(text: str) -> list[int]:
    """Line numbers of list items that follow a paragraph line with no blank line between. GitHub
    renders those as a list; the site's Markdown (Python-Markdown) folds them into the paragraph,
    so a reader of the site sees "... - first item - second item" run together."""
    found, fenced = [], False
    lines = text.splitlines()
    for n, line in enumerate(lines[1:], 2):
        if _FENCE.match(line):
            fenced = not fenced
        prev = lines[n - 2]
        if (not fenced and _LIST_ITEM.match(line) and prev.strip()
                and not (_LIST_ITEM.match(prev) or prev[0].isspace() or prev.startswith(("|", "```")))):
            found.append(n)
    return found


def test_the_site_markdown_folds_a_glued_list_into_its_paragraph() -> None:
    """The premise of the check below, on the site's own Markdown library."""
    import markdown

    glued, spaced = "Some text:\n- one\n- two\n", "Some text:\n\n- one\n- two\n"
    assert "<ul>" not in markdown.markdown(glued) and "<ul>" in markdown.markdown(spaced)
    assert _lists_glued_to_a_paragraph(glued) == [2] and _lists_glued_to_a_paragraph(spaced) == []


@pytest.mark.parametrize("path", [*DOC_FILES, ROOT / "bench" / "RESULTS.md"], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_list_on_the_site_is_a_list(path: Path) -> None:
    glued = _lists_glued_to_a_paragraph(path.read_text())
    assert not glued, f"{path.relative_to(ROOT)}: a list starts right after a paragraph line at lines {glued}; add a blank line"
