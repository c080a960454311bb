"""Peak resident memory of one text-to-image variant, measured in a fresh process (see ``core.memory``).

    python -m modelkiln.benchmarks.text_to_image.probe --artifact out/sd35-int8 --threads 2 --steps 1 --size 512
    python -m modelkiln.benchmarks.text_to_image.probe --model SRC ...        # the PyTorch eager baseline
    # prints one JSON line: {"max_rss_bytes": ...}

The process loads the variant and generates one image at the benchmark's size and guidance, so the
figure holds the weights, the runtime's own copies of them and the largest step's activations (the
attention scores of a batch-2 step). ``measure_diffusion_rss`` runs it and returns the figure.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..core import memory
from .runners import EagerDiffusionRunner, Generation, OrtDiffusionRunner

MODULE = "modelkiln.benchmarks.text_to_image.probe"


def _run_one(args: argparse.Namespace) -> None:
    import torch  # here, not at the top: the task registry stays importable without loading torch

    settings = Generation(args.steps, args.guidance_scale, args.size, args.size, args.max_sequence_length)
    if args.artifact:
        runner = OrtDiffusionRunner(Path(args.artifact), args.threads, settings)
    else:
        runner = EagerDiffusionRunner(args.model, args.threads, settings)
    latents = torch.randn(args.latent_shape, generator=torch.Generator().manual_seed(args.seed))
    runner.run("a photo of a red cat", latents)


def probe_args(target: str, eager: bool, settings, latent_shape: tuple[int, ...], threads: int) -> list[str]:
    args = [*memory.probe_target(target, eager), "--threads", str(threads)]
    args += ["--steps", "1", "--size", str(settings.height), "--guidance-scale", str(settings.guidance_scale)]
    args += ["--latent-shape", ",".join(map(str, latent_shape))]
    if settings.max_sequence_length:
        args += ["--max-sequence-length", str(settings.max_sequence_length)]
    return args


def measure_diffusion_rss(
    target: str, eager: bool, settings, latent_shape: tuple[int, ...], threads: int
) -> int:
    """Peak RSS in bytes of a fresh process that loads ``target`` and makes one one-step image."""
    return memory.measure_rss(MODULE, probe_args(target, eager, settings, latent_shape, threads), target)


def main(argv: list[str] | None = None) -> int:
    parser = memory.probe_parser(
        __doc__.split("\n")[0], "source pipeline to run with diffusers (PyTorch eager)"
    )
    parser.add_argument("--steps", type=int, default=1, help="denoising steps")
    parser.add_argument("--size", type=int, required=True, help="image side in pixels")
    parser.add_argument("--guidance-scale", type=float, default=4.5, help="> 1: batch-2 guided steps")
    parser.add_argument("--max-sequence-length", type=int, help="T5 prompt tokens")
    parser.add_argument(
        "--latent-shape", type=lambda text: tuple(int(v) for v in text.split(",")), required=True,
        help="initial latents' shape, comma-separated (1,16,64,64)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=90_000, help="seed of the initial latents")
    return memory.run_probe(parser, _run_one, argv)


if __name__ == "__main__":
    sys.exit(main())
