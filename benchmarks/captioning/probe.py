"""Peak resident memory of one captioning variant, measured in a fresh process (see ``core.memory``).

    python -m modelkiln.benchmarks.captioning.probe --artifact out/vit-gpt2-int8 --threads 2 --max-new-tokens 16
    python -m modelkiln.benchmarks.captioning.probe --model SRC ...        # the PyTorch eager baseline
    # prints one JSON line: {"max_rss_bytes": ...}

The process loads the variant and captions one drawn image; ONNX artifacts run without torch
imported, as they would be deployed. ``measure_rss`` runs it and returns the figure.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from modelkiln.fixtures import shapes

from ..core import memory
from .runners import EagerRunner, OrtRunner

MODULE = "modelkiln.benchmarks.captioning.probe"


def _run_one(args: argparse.Namespace) -> None:
    if args.artifact:
        runner = OrtRunner(Path(args.artifact), args.threads, args.max_new_tokens)
    else:
        runner = EagerRunner(args.model, args.threads, args.max_new_tokens)
    runner.run(shapes.draw(args.seed)[0])


def measure_rss(target: str, eager: bool, threads: int, max_new_tokens: int, seed: int) -> int:
    """Peak RSS in bytes of a fresh process that loads ``target`` and captions one image."""
    args = [*memory.probe_target(target, eager), "--threads", str(threads)]
    args += ["--max-new-tokens", str(max_new_tokens), "--seed", str(seed)]
    return memory.measure_rss(MODULE, args, target)


def main(argv: list[str] | None = None) -> int:
    parser = memory.probe_parser(__doc__.split("\n")[0], "source model to run on PyTorch eager")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="tokens to decode")
    parser.add_argument("--seed", type=int, default=80_000, help="seed of the drawn image")
    return memory.run_probe(parser, _run_one, argv)


if __name__ == "__main__":
    sys.exit(main())
