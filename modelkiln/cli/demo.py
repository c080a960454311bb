"""kiln demo: export, run and validate the shipped shapes captioner, then draw prompts with the shipped
text-to-image pipeline and read them back, with no download."""

from __future__ import annotations

import argparse
from pathlib import Path

from modelkiln.cli.common import console

HELP = "export, run and validate the shipped captioner and text-to-image models"
LOADS_MODELS = True  # exports and validates a PyTorch model: its libraries' progress bars are hidden


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="kiln-demo", help="folder for the artifact and the drawn images")
    parser.add_argument("--num-images", type=int, default=6, help="images to draw and caption")


def run(args: argparse.Namespace) -> int:
    # Here, not at the top: the demo exports with torch and onnx, which `kiln --help` never waits for.
    from modelkiln.demo import run_demo

    return run_demo(Path(args.out), num_images=args.num_images, console=console)
