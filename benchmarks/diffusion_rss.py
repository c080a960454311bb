"""Peak resident memory of one text-to-image variant, measured in a fresh process.

    python -m modelkiln.benchmarks.diffusion_rss --artifact out/sd35-int8 --threads 2 --steps 1 --size 512
    python -m modelkiln.benchmarks.diffusion_rss --model SRC ...        # the PyTorch eager baseline
    # prints one JSON line: {"max_rss_bytes": ...}

The process loads the variant and generates one image at the benchmark's size and guidance, so the
figure holds the weights, the runtime's own copies of them and the largest step's activations (the
attention scores of a batch-2 step). ``measure_diffusion_rss`` runs it and returns the figure; the
peak itself is read the way ``rss.peak_rss`` reads it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from modelkiln.errors import KilnError

from .rss import peak_rss


def _run_one(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from .diffusion_runners import EagerDiffusionRunner, Generation, OrtDiffusionRunner

    settings = Generation(args.steps, args.guidance_scale, args.size, args.size, args.max_sequence_length)
    if args.artifact:
        runner = OrtDiffusionRunner(Path(args.artifact), args.threads, settings)
    else:
        runner = EagerDiffusionRunner(args.model, args.threads, settings)
    latents = torch.randn(args.latent_shape, generator=torch.Generator().manual_seed(args.seed))
    runner.run("a photo of a red cat", latents)
    return peak_rss()


def probe_command(
    target: str, eager: bool, settings, latent_shape: tuple[int, ...], threads: int
) -> list[str]:
    flag = "--model" if eager else "--artifact"
    command = [sys.executable, "-m", "modelkiln.benchmarks.diffusion_rss", flag, str(target)]
    command += ["--threads", str(threads), "--steps", "1", "--size", str(settings.height)]
    command += ["--guidance-scale", str(settings.guidance_scale)]
    command += ["--latent-shape", ",".join(map(str, latent_shape))]
    if settings.max_sequence_length:
        command += ["--max-sequence-length", str(settings.max_sequence_length)]
    return command


def measure_diffusion_rss(
    target: str, eager: bool, settings, latent_shape: tuple[int, ...], threads: int
) -> int:
    """Peak RSS in bytes of a fresh process that loads ``target`` and makes one one-step image."""
    command = probe_command(target, eager, settings, latent_shape, threads)
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise KilnError(
            f"the memory probe for {target} failed (exit {done.returncode}): {done.stderr.strip()[-500:]}. "
            "Run the printed command by hand to see why, or pass --no-rss: " + " ".join(command)
        )
    return int(json.loads(done.stdout.strip().splitlines()[-1])["max_rss_bytes"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--artifact", help="artifact directory to run on onnxruntime")
    target.add_argument("--model", help="source pipeline to run with diffusers (PyTorch eager)")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads")
    parser.add_argument("--steps", type=int, default=1, help="denoising steps")
    parser.add_argument("--size", type=int, required=True, help="image side in pixels")
    parser.add_argument("--guidance-scale", type=float, default=4.5, help="> 1: batch-2 guided steps")
    parser.add_argument("--max-sequence-length", type=int, help="T5 prompt tokens")
    parser.add_argument(
        "--latent-shape", type=lambda text: tuple(int(v) for v in text.split(",")), required=True,
        help="initial latents' shape, comma-separated (1,16,64,64)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=90_000, help="seed of the initial latents")
    print(json.dumps({"max_rss_bytes": _run_one(parser.parse_args(argv))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
