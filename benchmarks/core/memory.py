"""Peak resident memory of one variant, measured in a fresh process so nothing else is counted.

    rss = measure_rss("modelkiln.benchmarks.captioning.probe", ["--artifact", "out/int8", ...], "out/int8")

A task's probe module (``captioning/probe.py``, ``text_to_image/probe.py``) adds its flags to
``probe_parser``'s and hands its one job to ``run_probe``, which prints {"max_rss_bytes": ...}.
``measure_rss`` runs it with this interpreter and returns the figure.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from modelkiln.errors import KilnError


def peak_rss() -> int:
    """This process's peak RSS in bytes.

    Linux keeps ``ru_maxrss`` across fork and exec, so a probe started from a large parent would report
    the parent's peak; VmHWM belongs to the process's own address space. ``ru_maxrss`` is the fallback
    on systems without /proc (it is KiB on Linux, bytes on macOS).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024


def run_probe(parser: argparse.ArgumentParser, run_one: Callable[[argparse.Namespace], None], argv) -> int:
    """A probe's main: parse ``argv``, run one job, print the peak RSS as one JSON line."""
    run_one(parser.parse_args(argv))
    print(json.dumps({"max_rss_bytes": peak_rss()}))
    return 0


def probe_parser(description: str, eager_help: str) -> argparse.ArgumentParser:
    """The flags every probe takes: what to run (an artifact, or the source on PyTorch) and threads."""
    parser = argparse.ArgumentParser(description=description)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--artifact", help="artifact directory to run on onnxruntime")
    target.add_argument("--model", help=eager_help)
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads")
    return parser


def probe_target(target: str, eager: bool) -> list[str]:
    """The probe flags that name ``target``: the source model on PyTorch, or an artifact."""
    return ["--model" if eager else "--artifact", str(target)]


def measure_rss(module: str, args: list[str], target: str) -> int:
    """Peak RSS in bytes of ``python -m module *args``, a fresh process that runs one job of ``target``."""
    command = [sys.executable, "-m", module, *args]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise KilnError(
            f"the memory probe for {target} failed (exit {done.returncode}): {done.stderr.strip()[-500:]}. "
            "Run the printed command by hand to see why, or pass --no-rss: " + " ".join(command)
        )
    return int(json.loads(done.stdout.strip().splitlines()[-1])["max_rss_bytes"])
