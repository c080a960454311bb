"""kiln export --model SRC --out DIR [--target onnxruntime|portable|tensorrt] [--family F] [--opset N] ..."""

from __future__ import annotations

import argparse
from pathlib import Path

from modelkiln.artifact import check_output_dir
from modelkiln.cli.common import console, next_hint, status
from modelkiln.configs import same_named
from modelkiln.exporters.targets import DEFAULT_TARGET, TARGETS
from modelkiln.registry import family_names, get_family

HELP = "export a model to an ONNX artifact"
LOADS_MODELS = True  # loads the PyTorch source: its libraries' progress bars are hidden


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="hub id or local directory saved with save_pretrained")
    parser.add_argument("--out", required=True, help="artifact directory to create")
    parser.add_argument("--family", help=f"force a family instead of detecting it: {family_names()}")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument(
        "--allow-pickle", action="store_true", help="load .bin/.pt checkpoints (runs their code)"
    )
    parser.add_argument("--trust-remote-code", action="store_true", help="run model code from the checkpoint")
    parser.add_argument("--external-data", action="store_true", help="keep weights beside each graph")
    parser.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH[:SCALE]",
        help="diffusion: fuse this LoRA (diffusers/PEFT format) before export (repeatable)",
    )
    parser.add_argument("--max-sequence-length", type=int, help="diffusion: T5 prompt length in tokens")
    parser.add_argument(
        "--without",
        action="append",
        default=[],
        metavar="COMPONENT",
        help="diffusion: leave out an optional component (SD3: text_encoder_3, i.e. T5) (repeatable)",
    )
    parser.add_argument(
        "--target",
        default=DEFAULT_TARGET,
        choices=list(TARGETS),
        help="runtime the graphs are for: "
        + "; ".join(f"{name}: {target.description}" for name, target in TARGETS.items()),
    )
    parser.add_argument(
        "--no-fuse-attention",
        action="store_true",
        help="onnxruntime target without the MultiHeadAttention fusion of image-encoder and denoiser "
        "attention (captioning decoders keep their cache-buffer ops: --target portable for standard ops only)",
    )


def run(args: argparse.Namespace) -> int:
    # Usage errors first: an unknown family or an existing --out is reported before torch loads.
    if args.family is not None:
        get_family(args.family)
    check_output_dir(args.out, args.overwrite)
    # Here, not at the top: the exporter loads torch and onnx, which `kiln --help` never waits for.
    from modelkiln.exporters.export import ExportConfig, export_model

    config = same_named(
        ExportConfig,
        args,
        external_data=True if args.external_data else None,
        lora=tuple(args.lora),
        without=tuple(args.without),
        fuse_attention=not args.no_fuse_attention,
    )
    with status(f"exporting {args.model}") as update:
        manifest = export_model(args.model, args.out, config, log=update)
    size = sum((Path(args.out) / name).stat().st_size for name in manifest.files)
    console.print(
        f"exported {manifest.family} ({', '.join(manifest.components)}) for {manifest.target} to {args.out}, "
        f"{size / 1e6:.1f} MB"
    )
    next_hint(f"kiln validate {args.out} --model {args.model}")
    return 0
