"""How long `kiln` takes to answer before it does any work: help, a listing and usage errors.

    python -m modelkiln.benchmarks.startup [--repeats 7]

Each command runs in a fresh interpreter (what a user waits for), several times; the median and the
spread are printed. Start-up is a benchmark, not a timed unit test: CI machines are too noisy for it.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

# (what it shows, arguments): the quick answers a user expects at once.
COMMANDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("kiln --help", ("--help",)),
    ("kiln families", ("families",)),
    ("kiln export --help", ("export", "--help")),
    ("usage error: export without --out", ("export", "--model", "m")),
    ("usage error: unknown family", ("export", "--model", "m", "--out", "o", "--family", "nope")),
    ("usage error: unknown scheme", ("quantize", "a", "--scheme", "int3", "--out", "o")),
    ("error: export to an existing --out", ("export", "--model", "m", "--out", ".")),
    ("error: caption a missing artifact", ("caption", "no-such-artifact", "x.png")),
)


def time_command(args: tuple[str, ...], repeats: int) -> list[float]:
    """Wall seconds of ``kiln ARGS`` in a new interpreter, ``repeats`` times (its exit code is ignored)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "modelkiln.cli", *args], capture_output=True, check=False)
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="runs per command (median reported)")
    args = parser.parse_args(argv)
    time_command(("--help",), 1)  # warm the file cache, as a user's second call would be
    print(f"{'command':40} {'median':>8} {'min':>8} {'max':>8}")
    for label, command in COMMANDS:
        times = time_command(command, args.repeats)
        print(f"{label:40} {statistics.median(times):7.3f}s {min(times):7.3f}s {max(times):7.3f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
