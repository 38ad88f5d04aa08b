"""What every benchmark ends with: the machine, the command, the load, and its section of RESULTS.md.

    from bench.report import BenchRun
    run = BenchRun("## My benchmark")              # starts the clock, reads the load average
    ...                                            # the measurements
    run.finish(body, extra="1 thread, 5 interleaved repeats.", write=args.write)

``finish`` prints the section (header + body) and, with ``write=True``, replaces the section of
``bench/RESULTS.md`` with the same title (or appends it once). The header says what a reader
needs to redo the numbers: CPU, core count, versions, the exact command, wall time, date, and the
1-minute load average at the start and the end, since these machines are shared.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "RESULTS.md"
VERSIONS = ("torch", "torchvision", "torch-pruning")

__all__ = ["BenchRun", "cpu_model", "machine_header", "write_section"]


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        line = next(ln for ln in out.splitlines() if ln.startswith("Model name:"))
        return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or platform.machine()


def machine_header(argv: list[str], seconds: float, extra: str = "") -> str:
    """Machine, versions, exact command and date: what a reader needs to redo the numbers."""
    versions = ", ".join(f"{pkg} {importlib.metadata.version(pkg)}" for pkg in VERSIONS)
    return (
        f"Machine: {cpu_model()}, {os.cpu_count()} cores; {versions}.\n"
        f"Command: `{' '.join(['python', '/'.join(Path(argv[0]).parts[-2:]), *argv[1:]])}` "
        f"({seconds:.0f} s, {time.strftime('%Y-%m-%d %H:%M')}). {extra}\n"
    )


def write_section(title: str, body: str, path: Path = RESULTS) -> None:
    """Replace (or append) the section ``title`` of RESULTS.md, leaving the others alone."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    start = text.find(title)
    if start == -1:
        text = text.rstrip() + f"\n\n{title}\n\n{body}"
    else:
        end = text.find("\n## ", start + len(title))
        text = text[:start] + f"{title}\n\n{body}" + (text[end:] if end != -1 else "")
    path.write_text(text)


class BenchRun:
    """One benchmark run: started when made, finished with its body (see the module docstring)."""

    def __init__(self, section: str, argv: list[str] | None = None) -> None:
        if not section.startswith("## "):
            raise ValueError(f"section must be a '## ' heading of RESULTS.md, but got {section!r}")
        self.section = section
        self.argv = list(sys.argv if argv is None else argv)
        self.t0 = time.perf_counter()
        self.load_start = os.getloadavg()[0]

    def header(self, extra: str = "") -> str:
        load = f"1-minute load average {self.load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end."
        return machine_header(self.argv, time.perf_counter() - self.t0, f"{extra} {load}".strip())

    def finish(self, body: str, *, extra: str = "", write: bool = False, path: Path = RESULTS) -> str:
        """Print header + body; with ``write``, put it in ``path`` under this run's section."""
        text = self.header(extra) + "\n" + body.rstrip("\n") + "\n"
        print(text)
        if write:
            write_section(self.section, text, path)
        return text
