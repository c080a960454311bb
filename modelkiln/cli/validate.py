"""kiln validate DIR --model SRC [--json]: the artifact against its PyTorch source; exit 1 if it differs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from modelkiln.cli.common import console, next_hint, status
from modelkiln.errors import ValidationFailedError

HELP = "compare an artifact with its PyTorch source"
LOADS_MODELS = True  # loads the PyTorch source: its libraries' progress bars are hidden


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifact")
    parser.add_argument("--model", required=True, help="the source the artifact was exported from")
    parser.add_argument("--images", help="folder of validation images (default: drawn fixture images)")
    parser.add_argument("--num-images", type=int, default=8, help="drawn images when --images is not given")
    parser.add_argument(
        "--prompt",
        action="append",
        default=[],
        help="captioners: also compare captions with this prompt; diffusion: the prompts to render (repeatable)",
    )
    parser.add_argument(
        "--atol", type=float, help="absolute tolerance per component (default 1e-4, diffusion 1e-3)"
    )
    parser.add_argument("--steps", type=int, help="diffusion: denoising steps per image (default 4)")
    parser.add_argument("--height", type=int, help="diffusion: image height (default: the model's)")
    parser.add_argument("--width", type=int, help="diffusion: image width (default: the model's)")
    parser.add_argument(
        "--min-psnr", type=float, help="diffusion: fail below this PSNR vs diffusers (default 40 dB)"
    )
    parser.add_argument("--report", help="also write the JSON report to this file")
    parser.add_argument("--json", action="store_true", help="print the JSON report")
    parser.add_argument(
        "--allow-pickle", action="store_true", help="load .bin/.pt checkpoints (runs their code)"
    )
    parser.add_argument("--backend", default="cpu", help="execution backend")


def run(args: argparse.Namespace) -> int:
    # Here, not at the top: the manifest module (hashing, graph confinement) is not needed to build the
    # parser, and `kiln --help` should not wait for it.
    from modelkiln.manifest import read_manifest

    if read_manifest(args.artifact).task == "text-to-image":
        report = _validate_diffusion(args)
        printer, next_command = _print_image_validation, f'kiln generate {args.artifact} "a prompt"'
    else:
        report = _validate_captioner(args)
        printer, next_command = _print_validation, f"kiln caption {args.artifact} IMAGE"
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report, indent=2))
    printer(report)
    if not report["passed"]:
        raise ValidationFailedError(f"{args.artifact} does not match {args.model}; see the FAIL lines above.")
    console.print(f"validation passed; recorded in {args.artifact}/manifest.json")
    next_hint(next_command)
    return 0


def _validate_captioner(args: argparse.Namespace) -> dict:
    # Here, not at the top: validation loads the exporters (torch), which `kiln --help` never waits for.
    from modelkiln.validation import ValidateConfig, validate_artifact

    config = ValidateConfig(
        **({} if args.atol is None else {"atol": args.atol}),
        prompts=(None, *args.prompt),
        images=args.images,
        num_images=args.num_images,
        allow_pickle=args.allow_pickle,
        backend=args.backend,
    )
    with status(f"validating {args.artifact} against {args.model}"):
        return validate_artifact(args.artifact, args.model, config)


def _validate_diffusion(args: argparse.Namespace) -> dict:
    from modelkiln.validation import DiffusionValidateConfig, validate_diffusion  # torch: see above

    options = {
        "prompts": tuple(args.prompt) or None,
        "steps": args.steps,
        "height": args.height,
        "width": args.width,
        "min_psnr": args.min_psnr,
        "atol": args.atol,
    }
    config = DiffusionValidateConfig(
        **{key: value for key, value in options.items() if value is not None},
        allow_pickle=args.allow_pickle,
        backend=args.backend,
    )
    with status(f"validating {args.artifact} against {args.model}"):
        return validate_diffusion(args.artifact, args.model, config)


def _print_validation(report: dict) -> None:
    _print_components(report)
    for mode, row in report["captions"].items():
        mark = "ok" if row["passed"] else "FAIL"
        console.print(f"  {mark:4} captions {mode}: {row['matches']}/{row['total']} token-exact")
        for miss in row["mismatches"][:3]:
            console.print(
                f"       image {miss['image']}: artifact {miss['artifact']!r} vs pytorch {miss['pytorch']!r}"
            )


def _print_image_validation(report: dict) -> None:
    _print_components(report)
    limit = report["settings"]["min_psnr"]
    for prompt, row in report["images"].items():
        mark = "ok" if row["passed"] else "FAIL"
        console.print(
            f"  {mark:4} image {prompt!r}: PSNR {row['psnr']:.1f} dB (min {limit}), SSIM {row['ssim']:.4f}, "
            f"max pixel diff {row['max_pixel_diff']:.2f}/255"
        )


def _print_components(report: dict) -> None:
    for name, row in report["components"].items():
        mark = "ok" if row["passed"] else "FAIL"
        console.print(f"  {mark:4} {name}: max abs diff {row['max_abs_diff']:.2e} (limit {row['limit']:.2e})")
