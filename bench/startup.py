"""How long a command line takes to answer ``--help`` or refuse a bad input (issue 25).

Times each command as a user runs it (a fresh ``python -m ...`` process, wall clock from start
to exit), ``--repeats`` times, interleaving the trees so that load on the machine hits both
alike; prints the median per command as a markdown table. ``--before <folder>`` times the same
commands in another checkout of the project (e.g. ``git archive <commit> | tar -x -C <folder>``)
beside this one. ``--importtime`` adds where the time goes in one ``--help``: the slowest
top-level imports (``python -X importtime``).

    python bench/startup.py --repeats 7 --before /tmp/before --importtime
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (what it shows, command line after `python -m`)
COMMANDS = [
    ("help", ["trainables.run", "--help"]),
    ("help after a key", ["trainables.run", "prune.ratio=0.3", "--help"]),
    ("unknown key", ["trainables.run", "ratio=0.5"]),
    ("unknown key with +", ["trainables.run", "+ratio=0.9"]),
    ("setting not read (ratios, uniform)", ["trainables.run", "prune.ratios=[0.1,0.2,0.3,0.4,0.5]"]),
    ("bad data key (fraction=0)", ["trainables.run", "data.fraction=0"]),
    ("bad range (ratio=1.5; needs the registries, so torch)", ["trainables.run", "prune.ratio=1.5"]),
    ("search help", ["search.launch", "--help"]),
    ("search unknown key", ["search.launch", "+search.num_trial=8"]),
]


def time_once(tree: Path, args: list[str], cache: Path, timeout: float) -> tuple[float, int | None]:
    """Wall seconds of one ``python -m <args>`` in ``tree`` and its exit code (None: timed out)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PRUNESEARCH_CACHE": str(cache)}
    extra = [] if "--help" in args else [f"cache_dir={cache}", f"output_dir={cache}/out"] \
        if args[0].startswith("trainables") else [f"cache_dir={cache}", f"output_root={cache}/out"]
    t0 = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", *args, *extra], cwd=tree, env=env, capture_output=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return time.perf_counter() - t0, None
    return time.perf_counter() - t0, done.returncode


def slowest_imports(tree: Path, n: int = 8) -> list[tuple[str, float]]:
    """The ``n`` top-level packages with the largest cumulative import time in ``--help``."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "trainables.run", "--help"], cwd=tree,
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    tops: dict[str, float] = {}
    for line in done.stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \|( *)(\S+)", line)
        if m and len(m.group(2)) == 1:  # top level: one space of indent
            tops[m.group(3)] = max(tops.get(m.group(3), 0.0), int(m.group(1)) / 1e6)
    return sorted(tops.items(), key=lambda kv: -kv[1])[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--before", type=Path, default=None, help="another checkout to time beside this one")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds before a command counts as still working")
    ap.add_argument("--importtime", action="store_true")
    args = ap.parse_args()
    trees = {"after": ROOT, **({"before": args.before.resolve()} if args.before else {})}
    times: dict[tuple[str, str], list[float]] = {}
    codes: dict[tuple[str, str], set] = {}
    with tempfile.TemporaryDirectory() as cache:
        for _ in range(args.repeats):
            for label, cmd in COMMANDS:
                for name, tree in trees.items():
                    s, code = time_once(tree, cmd, Path(cache) / name, args.timeout)
                    times.setdefault((label, name), []).append(s)
                    codes.setdefault((label, name), set()).add(code)
    names = list(trees)
    print(f"| command | {' | '.join(f'{n}: median s (exit)' for n in names)} |")
    print(f"|---|{'---|' * len(names)}")
    for label, cmd in COMMANDS:
        cells = []
        for n in names:
            med = statistics.median(times[(label, n)])
            code = ",".join("timeout" if c is None else str(c) for c in sorted(codes[(label, n)], key=str))
            cells.append(f"{'>' if 'timeout' in code else ''}{med:.2f} ({code})")
        print(f"| `python -m {' '.join(cmd)}` ({label}) | {' | '.join(cells)} |")
    if args.importtime:
        for name, tree in trees.items():
            print(f"\nslowest top-level imports of `trainables.run --help`, {name}: "
                  + ", ".join(f"{m} {s:.2f} s" for m, s in slowest_imports(tree)))


if __name__ == "__main__":
    main()
