"""kiln quantize DIR --scheme S --out DIR: a quantized variant, measured against its parent; exit 1 below a gate."""

from __future__ import annotations

import argparse
from pathlib import Path

from modelkiln.cli.common import console, next_hint, print_json, status
from modelkiln.configs import same_named
from modelkiln.quantize.schemes import SCHEMES, parse_option

HELP = "make a quantized variant and measure it against its parent"
LOADS_MODELS = True  # measures quality with PyTorch-side tools: their progress bars are hidden


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifact")
    parser.add_argument("--scheme", required=True, choices=list(SCHEMES), help="quantization scheme")
    parser.add_argument("--out", required=True, help="variant directory to create")
    parser.add_argument("--components", nargs="+", help="graphs to quantize (default: the family's recipe)")
    parser.add_argument("--exclude", action="append", default=[], help="node or module pattern kept fp32")
    options_help = "; ".join(
        f"{s.name}: {', '.join(f'{k}={v}' for k, v in s.options.items())}" for s in SCHEMES.values()
    )
    parser.add_argument(
        "--option", action="append", default=[], help=f"scheme option KEY=VALUE ({options_help})"
    )
    _add_gate_arguments(parser)
    _add_quality_arguments(parser)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--json", action="store_true", help="print the recipe and quality figures as JSON")


def _add_gate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--min-agreement", type=float, help="fail below this caption match rate vs the parent (0..1)"
    )
    parser.add_argument(
        "--max-new-empty",
        type=int,
        default=0,
        help="captioners: fail when more held-out images than this get an empty caption where the parent "
        "captioned (a broken quantized decoder, transformers#30383); default 0, -1 turns the gate off",
    )


def _add_quality_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-images", type=int, default=16, help="held-out images for the quality figures")
    parser.add_argument(
        "--min-psnr", type=float, help="diffusion: fail when an image's PSNR vs the parent is below this (dB)"
    )
    parser.add_argument(
        "--min-prompt-accuracy",
        type=float,
        help="shipped shapes text-to-image model: fail below this share of images whose caption read back "
        "equals the prompt (0-1)",
    )
    parser.add_argument(
        "--prompt-accuracy-prompts",
        type=int,
        help="shipped shapes text-to-image model: shapes prompts for prompt accuracy (default: all 138)",
    )
    parser.add_argument("--num-prompts", type=int, default=4, help="diffusion: held-out prompts for quality")
    parser.add_argument(
        "--quality-steps", type=int, default=4, help="diffusion: denoising steps per quality image"
    )
    parser.add_argument("--image-size", type=int, help="diffusion: quality image side (default: the model's)")
    parser.add_argument(
        "--calibration-prompts",
        help="diffusion: text file of calibration prompts, one a line (int8-static; default: the "
        "artifact's calibration_prompts.txt, else built-in prompts)",
    )
    parser.add_argument(
        "--calibration-steps", type=int, default=8, help="diffusion: denoising steps per calibration prompt"
    )
    parser.add_argument("--calibration-images", help="folder of calibration images for int8-static")
    parser.add_argument("--num-calibration", type=int, default=8, help="calibration images for int8-static")


def run(args: argparse.Namespace) -> int:
    # Here, not at the top: quantizing loads onnx and onnxruntime, which `kiln --help` never waits for.
    from modelkiln.quantize.quantize import QuantizeConfig, quantize_artifact

    config = same_named(
        QuantizeConfig,
        args,
        components=tuple(args.components) if args.components else None,
        exclude=tuple(args.exclude),
        # ``--option block_size=64`` pairs, typed by the scheme table's defaults (checked there).
        options=dict(parse_option(pair) for pair in args.option),
        max_new_empty=None if args.max_new_empty < 0 else args.max_new_empty,
    )
    with status(f"quantizing {args.artifact} with {args.scheme}") as update:
        manifest = quantize_artifact(args.artifact, args.out, config, log=update)
    parent_size = sum(p.stat().st_size for p in Path(args.artifact).rglob("*") if p.is_file())
    size = sum(p.stat().st_size for p in Path(args.out).rglob("*") if p.is_file())
    console.print(
        f"{args.scheme}: {size / 1e6:.2f} MB ({size / parent_size:.0%} of the parent's {parent_size / 1e6:.2f} MB)"
    )
    _print_quantization(manifest.quantization)
    if args.json:
        print_json(
            {"out": args.out, "size_bytes": size, "parent_size_bytes": parent_size, **manifest.quantization}
        )
    if manifest.task == "text-to-image":
        next_hint(f'kiln generate {args.out} "a prompt"')
    else:
        next_hint(f"kiln caption {args.out} IMAGE")
    return 0


def _print_quantization(quantization: dict) -> None:
    """What was quantized (modules or nodes per graph) and the quality figures vs the parent."""
    for name, count in quantization.get("modules", {}).items():  # torch (bitsandbytes) variants
        console.print(f"  {count} {name} modules")
    for name, stats in quantization.get("nodes", {}).items():
        console.print(
            f"  {name}: {stats['quantized_nodes']} {stats['node_type']} nodes, {len(stats['excluded_nodes'])} excluded"
        )
    quality = quantization["quality"]
    figures = ", ".join(f"{k} {v}" for k, v in quality.items() if isinstance(v, (int, float)))
    console.print(f"  quality vs parent: {figures}")
