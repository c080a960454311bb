"""Peak resident memory of one variant, measured in a fresh process so nothing else is counted.

    python -m modelkiln.benchmarks.rss --artifact out/vit-gpt2-int8 --threads 2 --max-new-tokens 16
    python -m modelkiln.benchmarks.rss --model SRC ...        # the PyTorch eager baseline
    # prints one JSON line: {"max_rss_bytes": ...}

The process loads the variant and captions one drawn image; ONNX artifacts run without torch
imported, as they would be deployed. ``measure_rss`` runs it and returns the figure.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

from modelkiln.errors import KilnError


def _run_one(args: argparse.Namespace) -> int:
    from modelkiln.fixtures import shapes

    from .runners import EagerRunner, OrtRunner

    if args.artifact:
        runner = OrtRunner(Path(args.artifact), args.threads, args.max_new_tokens)
    else:
        runner = EagerRunner(args.model, args.threads, args.max_new_tokens)
    runner.run(shapes.draw(args.seed)[0])
    return peak_rss()


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


def measure_rss(target: str, eager: bool, threads: int, max_new_tokens: int, seed: int) -> int:
    """Peak RSS in bytes of a fresh process that loads ``target`` and captions one image."""
    flag = "--model" if eager else "--artifact"
    command = [sys.executable, "-m", "modelkiln.benchmarks.rss", flag, str(target)]
    command += ["--threads", str(threads), "--max-new-tokens", str(max_new_tokens), "--seed", str(seed)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise KilnError(
            f"the memory probe for {target} failed (exit {done.returncode}): {done.stderr.strip()[-500:]}. "
            "Run the printed command by hand to see why: " + " ".join(command)
        )
    return int(json.loads(done.stdout.strip().splitlines()[-1])["max_rss_bytes"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--artifact", help="artifact directory to run on onnxruntime")
    target.add_argument("--model", help="source model to run on PyTorch eager")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="tokens to decode")
    parser.add_argument("--seed", type=int, default=80_000, help="seed of the drawn image")
    print(json.dumps({"max_rss_bytes": _run_one(parser.parse_args(argv))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
