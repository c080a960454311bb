"""kiln engine DIR --out DIR [--precision P] [--profile COMPONENT:INPUT=MIN,OPT,MAX]... [--refit ENGINES]"""

from __future__ import annotations

import argparse

from modelkiln.artifact import check_output_dir
from modelkiln.cli.common import console, next_hint, print_json, status
from modelkiln.errors import KilnError

HELP = "build TensorRT engines from a --target tensorrt artifact (needs TensorRT and an NVIDIA GPU)"
LOADS_MODELS = False  # TensorRT and the ONNX graphs only, no PyTorch model

PRECISION_CHOICES = ("fp32", "fp16", "bf16", "int8")  # exporters.engine.PRECISIONS, without importing it


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifact", help="ONNX artifact exported with --target tensorrt (or its variant)")
    parser.add_argument("--out", required=True, help="engine artifact directory to create")
    parser.add_argument(
        "--precision",
        default="fp32",
        choices=PRECISION_CHOICES,
        help="engine precision; int8 takes an int8-static variant (default fp32)",
    )
    parser.add_argument(
        "--profile",
        action="append",
        default=[],
        metavar="COMPONENT:INPUT=MIN,OPT,MAX",
        help="optimization profile of one input, shapes like 1x4x64x64, replacing the one derived from the "
        "family's ranges (repeatable)",
    )
    parser.add_argument(
        "--refit",
        metavar="ENGINES",
        help="put ARTIFACT's weights (e.g. an export with a LoRA fused) into these refittable engines "
        "instead of building new ones",
    )
    parser.add_argument("--timing-cache", help="timing cache file to start from (default: the one in --out)")
    parser.add_argument("--workspace-gb", type=float, help="TensorRT workspace memory limit in GiB")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--json", action="store_true", help="print the engine record as JSON")


def run(args: argparse.Namespace) -> int:
    # Here, not at the top: the engine builder loads onnxruntime, which `kiln --help` never waits for.
    from modelkiln.exporters.engine import EngineConfig, build_engines, refit_engines
    from modelkiln.runtime.profiles import parse_profile

    profiles = tuple(parse_profile(text) for text in args.profile)
    if args.refit and (profiles or args.precision != "fp32" or args.timing_cache or args.workspace_gb):
        raise KilnError(
            "--refit keeps the engines' precision and profiles: drop --precision, --profile, "
            "--timing-cache and --workspace-gb."
        )
    check_output_dir(args.out, args.overwrite)
    with status(f"{'refitting' if args.refit else 'building'} TensorRT engines") as update:
        if args.refit:
            manifest = refit_engines(args.artifact, args.refit, args.out, args.overwrite, log=update)
        else:
            config = EngineConfig(
                args.precision, profiles, args.workspace_gb, args.timing_cache, args.overwrite
            )
            manifest = build_engines(args.artifact, args.out, config, log=update)
    if args.json:
        print_json(manifest.engine)
    engine = manifest.engine
    console.print(
        f"built {', '.join(manifest.components)} ({engine['precision']}) with TensorRT {engine['tensorrt']} "
        f"on {engine['gpu']} to {args.out}"
    )
    command = "generate" if manifest.task == "text-to-image" else "caption"
    example = '"a red cat" --out cat.png' if command == "generate" else "IMAGE"
    next_hint(f"kiln {command} {args.out} {example} --backend tensorrt")
    return 0
