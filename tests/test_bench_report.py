"""bench/report.py: the header and RESULTS.md writer every benchmark ends with."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import BenchRun, machine_header, write_section  # noqa: E402


def test_write_section_replaces_only_its_own_section(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# Benchmark results\n\n## A\n\nold a\n\n## B\n\nkeep b\n")
    write_section("## A", "new a\n", path)
    assert path.read_text() == "# Benchmark results\n\n## A\n\nnew a\n\n## B\n\nkeep b\n"
    write_section("## C", "c\n", path)  # a new title is appended once, at the end
    write_section("## C", "c again\n", path)
    text = path.read_text()
    assert text.count("## C") == 1 and text.endswith("## C\n\nc again\n") and "keep b" in text


def test_header_names_machine_versions_and_command():
    head = machine_header(["bench/x.py", "--seeds", "0"], 12.3, "1 thread.")
    assert head.startswith("Machine: ") and "torch " in head and "torch-pruning " in head
    assert "`python bench/x.py --seeds 0` (12 s, " in head and head.rstrip().endswith("1 thread.")


def test_bench_run_prints_and_writes_header_and_body(tmp_path, capsys):
    path = tmp_path / "RESULTS.md"
    run = BenchRun("## Mine", argv=["bench/mine.py", "--write"])
    text = run.finish("| a | b |\n", extra="2 threads.", write=True, path=path)
    assert capsys.readouterr().out.strip() == text.strip()
    assert "2 threads. 1-minute load average " in text and " at the end." in text
    assert path.read_text().endswith("## Mine\n\n" + text)
    BenchRun("## Mine", argv=["bench/mine.py"]).finish("no write\n", path=path)
    assert "no write" not in path.read_text()


def test_bench_run_refuses_a_title_that_is_not_a_section():
    with pytest.raises(ValueError, match="'## ' heading .*'Mine'"):
        BenchRun("Mine")
