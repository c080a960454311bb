"""The kiln command line: export, quantize, run, validate, benchmark and inspect artifacts.

    kiln demo                                   # export the shipped captioner, caption, validate
    kiln export --model SRC --out DIR [--family F] [--opset N] [--lora PATH[:SCALE]]...
    kiln caption DIR IMAGE... [--num-beams N] [--max-new-tokens N] [--json]
    kiln generate DIR "a prompt" [--steps N] [--seed S] [--height H] [--width W] --out image.png
    kiln validate DIR --model SRC [--json]
    kiln inspect DIR [--json]
    kiln verify DIR [--json]
    kiln bench --preset tiny|full | --model SRC [--variant DIR]... [--schemes S,S] [--peers optimum] --out DIR
    kiln build RECIPE.toml [--out DIR]          # export, validate, quantize, bench; exit 1 on a failed gate

Bad input ends with one ``error:`` line naming the fix and exit code 2; a failed check exits 1. Each
command's last line suggests the natural next command.

Start-up stays light: building the parser imports only the standard library, rich and modelkiln's base
tables; each command imports what it needs when it runs, so `kiln --help` is quick and `caption`,
`inspect`, `verify` and `families` work in the runtime-only install (no torch, no onnx).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from modelkiln import __version__
from modelkiln.errors import KilnError, ValidationFailedError

console = Console(stderr=True, highlight=False, soft_wrap=True)

# Top-level module -> the extra that installs it: the one line a command that needs it prints when the
# runtime-only install (`pip install modelkiln`) lacks it.
EXTRA_OF: dict[str, str] = {
    **dict.fromkeys(
        (
            "torch",
            "transformers",
            "diffusers",
            "onnx",
            "onnxscript",
            "safetensors",
            "peft",
            "sacrebleu",
            "skimage",
        ),
        "export",
    ),
    **dict.fromkeys(("bitsandbytes", "accelerate"), "bnb"),
    "matplotlib": "bench",
}


@contextlib.contextmanager
def _status(message: str) -> Iterator[Callable[[str], None]]:
    """A spinner on stderr for a long step; yields a function that updates its text."""
    with console.status(message) as status:
        yield lambda text: status.update(f"{message}: {text}")


@contextlib.contextmanager
def _quiet_model_loading() -> Iterator[None]:
    """Hide transformers' and diffusers' per-load progress bars and info chatter while a command loads
    PyTorch models (a demo, a benchmark and a validation load several), restoring both libraries'
    own settings afterwards. Only commands that import them anyway use it: it imports both."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    saved = [
        (library, library.is_progress_bar_enabled(), library.get_verbosity())
        for library in (transformers_logging, diffusers_logging)
    ]
    for library, _, _ in saved:
        library.disable_progress_bar()
        library.set_verbosity_error()
    try:
        yield
    finally:
        for library, bar, level in saved:
            (library.enable_progress_bar if bar else library.disable_progress_bar)()
            library.set_verbosity(level)


def _next(command: str) -> None:
    console.print(f"next: [bold]{escape(command)}[/bold]")


def _print_json(data) -> None:
    print(json.dumps(data, indent=2, default=str))


def _source_of(artifact: str) -> str:
    """The model an artifact was exported from, as its manifest records it, for `next:` hints."""
    from modelkiln.manifest import read_manifest

    return read_manifest(artifact).source.model


def cmd_export(args: argparse.Namespace) -> int:
    from modelkiln.registry import get_family

    if args.family is not None:
        get_family(args.family)  # an unknown name is a usage error: say so before loading torch
    from modelkiln.exporters.export import ExportConfig, export_model

    config = ExportConfig(
        family=args.family,
        opset=args.opset,
        allow_pickle=args.allow_pickle,
        trust_remote_code=args.trust_remote_code,
        overwrite=args.overwrite,
        external_data=True if args.external_data else None,
        lora=tuple(args.lora),
        max_sequence_length=args.max_sequence_length,
        without=tuple(args.without),
        fuse_attention=not args.no_fuse_attention,
    )
    with _status(f"exporting {args.model}") as update:
        manifest = export_model(args.model, args.out, config, log=update)
    size = sum((Path(args.out) / name).stat().st_size for name in manifest.files)
    console.print(
        f"exported {manifest.family} ({', '.join(manifest.components)}) to {args.out}, {size / 1e6:.1f} MB"
    )
    _next(f"kiln validate {args.out} --model {args.model}")
    return 0


def _generation_options(args: argparse.Namespace) -> dict:
    options = {
        "max_new_tokens": args.max_new_tokens,
        "num_beams": args.num_beams,
        "do_sample": True if args.do_sample else None,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "temperature": args.temperature,
        "seed": args.seed,
    }
    return {key: value for key, value in options.items() if value is not None}


def cmd_caption(args: argparse.Namespace) -> int:
    from modelkiln import runtime

    pipe = runtime.load(args.artifact, backend=args.backend, threads=args.threads)
    results = pipe(list(args.images), prompt=args.prompt, **_generation_options(args))
    captions = [result[0]["generated_text"] for result in results]
    if args.json:
        print(
            json.dumps(
                [{"image": str(p), "generated_text": c} for p, c in zip(args.images, captions, strict=True)]
            )
        )
    else:
        for path, caption in zip(args.images, captions, strict=True):
            print(f"{path}: {caption}")
    _next(f"kiln validate {args.artifact} --model {_source_of(args.artifact)}")
    return 0


def _print_validation(report: dict) -> None:
    for name, row in report["components"].items():
        mark = "ok" if row["passed"] else "FAIL"
        console.print(f"  {mark:4} {name}: max abs diff {row['max_abs_diff']:.2e} (limit {row['limit']:.2e})")
    for mode, row in report["captions"].items():
        mark = "ok" if row["passed"] else "FAIL"
        console.print(f"  {mark:4} captions {mode}: {row['matches']}/{row['total']} token-exact")
        for miss in row["mismatches"][:3]:
            console.print(
                f"       image {miss['image']}: artifact {miss['artifact']!r} vs pytorch {miss['pytorch']!r}"
            )


def _validate_diffusion(args: argparse.Namespace) -> dict:
    from modelkiln.validation import DiffusionValidateConfig, validate_diffusion

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
    with _status(f"validating {args.artifact} against {args.model}"):
        return validate_diffusion(args.artifact, args.model, config)


def _print_image_validation(report: dict) -> None:
    for name, row in report["components"].items():
        mark = "ok" if row["passed"] else "FAIL"
        console.print(f"  {mark:4} {name}: max abs diff {row['max_abs_diff']:.2e} (limit {row['limit']:.2e})")
    limit = report["settings"]["min_psnr"]
    for prompt, row in report["images"].items():
        mark = "ok" if row["passed"] else "FAIL"
        console.print(
            f"  {mark:4} image {prompt!r}: PSNR {row['psnr']:.1f} dB (min {limit}), SSIM {row['ssim']:.4f}, "
            f"max pixel diff {row['max_pixel_diff']:.2f}/255"
        )


def cmd_validate(args: argparse.Namespace) -> int:
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
    _next(next_command)
    return 0


def _validate_captioner(args: argparse.Namespace) -> dict:
    from modelkiln.validation import ValidateConfig, validate_artifact

    config = ValidateConfig(
        **({} if args.atol is None else {"atol": args.atol}),
        prompts=(None, *args.prompt),
        images=args.images,
        num_images=args.num_images,
        allow_pickle=args.allow_pickle,
        backend=args.backend,
    )
    with _status(f"validating {args.artifact} against {args.model}"):
        return validate_artifact(args.artifact, args.model, config)


def cmd_generate(args: argparse.Namespace) -> int:
    from rich.progress import Progress

    from modelkiln import runtime

    pipe = runtime.load(args.artifact, backend=args.backend, threads=args.threads)
    if getattr(pipe, "task", None) != "text-to-image":
        raise KilnError(
            f"{args.artifact} is a {pipe.task} artifact; `kiln generate` runs text-to-image ones."
        )
    options = {
        "negative_prompt": args.negative_prompt,
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "height": args.height,
        "width": args.width,
        "seed": args.seed,
        "num_images_per_prompt": args.num_images,
    }
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("denoising", total=None)
        result = pipe(
            args.prompt,
            **{key: value for key, value in options.items() if value is not None},
            callback=lambda step, total: progress.update(task, completed=step, total=total),
        )
    paths = _image_paths(Path(args.out), len(result.images))
    for image, path in zip(result.images, paths, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        console.print(f"wrote {path} ({image.width}x{image.height})")
    _next(f"kiln validate {args.artifact} --model {_source_of(args.artifact)}")
    return 0


def _image_paths(out: Path, count: int) -> list[Path]:
    """``out`` for one image; ``stem-0.png``, ``stem-1.png`` ... for several."""
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(count)]


def _inspect_lines(manifest) -> list[str]:
    lines = [
        f"family     {manifest.family} ({manifest.task}), kind {manifest.kind}, "
        f"precision {manifest.precision}, opset {manifest.opset}",
        f"source     {manifest.source.model} (weights sha256 {manifest.source.weights_sha256[:16]}...)",
        f"tools      {', '.join(f'{k} {v}' for k, v in manifest.tools.items())}",
    ]
    if manifest.parent is not None:
        lines.append(
            f"parent     {manifest.parent['path']} ({manifest.parent.get('precision', '?')}, "
            f"artifact sha256 {manifest.parent['artifact_sha256'][:16]}...)"
        )
    lines += _quantization_lines(manifest.quantization)
    for name, spec in manifest.components.items():
        extra = f" + {spec.external_data}" if spec.external_data else ""
        lines.append(f"component  {name}: {spec.file}{extra} ({spec.precision})")
        for kind, values in (("in ", spec.inputs), ("out", spec.outputs)):
            lines += [f"    {kind} {value.name} {value.dtype} {value.shape}" for value in values[:6]]
            if len(values) > 6:
                lines.append(f"    {kind} ... {len(values) - 6} more")
    validation = manifest.validation
    verdict = "none yet" if validation is None else ("passed" if validation["passed"] else "FAILED")
    return [*lines, f"validation {verdict}"]


def _quantization_lines(quantization: dict | None) -> list[str]:
    """Scheme, options, quality figures and gate result of a quantized variant."""
    if not quantization:
        return []
    options = ", ".join(f"{k}={v}" for k, v in quantization.get("options", {}).items()) or "defaults"
    quality = quantization.get("quality", {})
    figures = ", ".join(f"{k} {v:g}" for k, v in quality.items() if isinstance(v, (int, float)))
    gate = quantization.get("gate") or []
    return [
        f"scheme     {quantization['scheme']} ({options})",
        f"quality    vs parent: {figures or 'not measured'}",
        f"gates      {'passed' if not gate else 'FAILED: ' + '; '.join(gate)}",
    ]


def cmd_inspect(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from modelkiln.manifest import read_manifest

    manifest = read_manifest(args.artifact)
    if args.json:
        _print_json(asdict(manifest))
    else:
        print("\n".join(_inspect_lines(manifest)))
    _next(f"kiln verify {args.artifact}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from modelkiln.manifest import extra_files, read_manifest, verify_files

    manifest = read_manifest(args.artifact)
    problems = verify_files(args.artifact, manifest)  # the files the runtime may open; refuses escapes
    extras = extra_files(args.artifact, manifest)
    if args.json:
        summary = {"artifact": str(args.artifact), "files": len(manifest.files), "problems": problems}
        _print_json({**summary, "extra": extras})
    for problem in problems:
        console.print(f"  {problem}")
    if problems:
        raise ValidationFailedError(
            f"{args.artifact}: {len(problems)} file(s) differ from the manifest. "
            "Re-export or re-copy the artifact."
        )
    for name in extras:  # informational: the runtime never opens these
        console.print(f"  extra: {escape(name)} (not in the manifest; never opened)")
    console.print(f"all {len(manifest.files)} files match the manifest")
    _next(f"kiln caption {args.artifact} IMAGE")
    return 0


def _scheme_options(pairs: list[str]) -> dict:
    """``--option block_size=64`` pairs, typed by the scheme table's defaults (checked there)."""
    from modelkiln.quantize.schemes import parse_option

    return dict(parse_option(pair) for pair in pairs)


def cmd_quantize(args: argparse.Namespace) -> int:
    from modelkiln.quantize.quantize import QuantizeConfig, quantize_artifact

    config = QuantizeConfig(
        scheme=args.scheme,
        components=tuple(args.components) if args.components else None,
        exclude=tuple(args.exclude),
        options=_scheme_options(args.option),
        min_agreement=args.min_agreement,
        min_psnr=args.min_psnr,
        max_new_empty=None if args.max_new_empty < 0 else args.max_new_empty,
        num_images=args.num_images,
        num_prompts=args.num_prompts,
        quality_steps=args.quality_steps,
        image_size=args.image_size,
        calibration_images=args.calibration_images,
        num_calibration=args.num_calibration,
        calibration_prompts=args.calibration_prompts,
        calibration_steps=args.calibration_steps,
        overwrite=args.overwrite,
    )
    with _status(f"quantizing {args.artifact} with {args.scheme}") as update:
        manifest = quantize_artifact(args.artifact, args.out, config, log=update)
    parent_size = sum(p.stat().st_size for p in Path(args.artifact).rglob("*") if p.is_file())
    size = sum(p.stat().st_size for p in Path(args.out).rglob("*") if p.is_file())
    console.print(
        f"{args.scheme}: {size / 1e6:.2f} MB ({size / parent_size:.0%} of the parent's {parent_size / 1e6:.2f} MB)"
    )
    for name, count in manifest.quantization.get("modules", {}).items():  # torch (bitsandbytes) variants
        console.print(f"  {count} {name} modules")
    for name, stats in manifest.quantization.get("nodes", {}).items():
        console.print(
            f"  {name}: {stats['quantized_nodes']} {stats['node_type']} nodes, {len(stats['excluded_nodes'])} excluded"
        )
    quality = manifest.quantization["quality"]
    figures = ", ".join(f"{k} {v}" for k, v in quality.items() if isinstance(v, (int, float)))
    console.print(f"  quality vs parent: {figures}")
    if args.json:
        _print_json(
            {"out": args.out, "size_bytes": size, "parent_size_bytes": parent_size, **manifest.quantization}
        )
    if manifest.task == "text-to-image":
        _next(f'kiln generate {args.out} "a prompt"')
    else:
        _next(f"kiln caption {args.out} IMAGE")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    # Imported here, not at the top: the benchmark tasks load onnx and onnxruntime, which the other
    # commands and `kiln --help` do not wait for.
    from modelkiln.benchmarks.tasks import run_command

    return run_command(args, console)


def cmd_demo(args: argparse.Namespace) -> int:
    from modelkiln.demo import run_demo

    return run_demo(Path(args.out), num_images=args.num_images, console=console)


def cmd_build(args: argparse.Namespace) -> int:
    from modelkiln.build import default_out, load_recipe, run_build

    recipe = load_recipe(args.recipe)
    out = Path(args.out) if args.out else default_out(recipe)
    # Plain lines, not a spinner: a CI log should show every step and whether it was cached.
    summary = run_build(recipe, out, log=lambda message: console.print(f"  {message}"))
    for row in summary["artifacts"]:
        size = "-" if row["size_bytes"] is None else f"{row['size_bytes'] / 1e6:.2f} MB"
        console.print(f"  {'ok' if row['passed'] else 'FAIL':4} {row['name']:16} {size}")
    if not summary["passed"]:
        raise ValidationFailedError(
            f"build of {recipe.path.name} failed: {'; '.join(summary['failures'])}. See {out / 'summary.md'}."
        )
    console.print(f"built {len(summary['artifacts'])} artifacts into {out / 'artifacts'}")
    _next(f"less {out / 'summary.md'}")
    return 0


def _add_generation_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, help="caption length limit (default: the model's)")
    parser.add_argument("--num-beams", type=int, help="beam search width; 1 is greedy (default: the model's)")
    parser.add_argument("--do-sample", action="store_true", help="sample instead of searching")
    parser.add_argument("--top-k", type=int, help="sample from the k most likely tokens")
    parser.add_argument("--top-p", type=float, help="sample from the smallest set with this probability mass")
    parser.add_argument("--temperature", type=float, help="sampling temperature")
    parser.add_argument("--seed", type=int, help="sampling seed, for reproducible captions")


def _add_runtime_flags(parser: argparse.ArgumentParser) -> None:
    from modelkiln.backends import BACKENDS

    parser.add_argument("--backend", default="cpu", choices=list(BACKENDS), help="execution backend")
    parser.add_argument("--threads", type=int, help="intra-op threads (default: all cores)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kiln", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"modelkiln {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    export = commands.add_parser("export", help="export a model to an ONNX artifact")
    export.add_argument("--model", required=True, help="hub id or local directory saved with save_pretrained")
    export.add_argument("--out", required=True, help="artifact directory to create")
    export.add_argument("--family", help="force a family instead of detecting it (see `kiln families`)")
    export.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    export.add_argument(
        "--allow-pickle", action="store_true", help="load .bin/.pt checkpoints (runs their code)"
    )
    export.add_argument("--trust-remote-code", action="store_true", help="run model code from the checkpoint")
    export.add_argument("--external-data", action="store_true", help="keep weights beside each graph")
    export.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH[:SCALE]",
        help="diffusion: fuse this LoRA (diffusers/PEFT format) before export (repeatable)",
    )
    export.add_argument("--max-sequence-length", type=int, help="diffusion: T5 prompt length in tokens")
    export.add_argument(
        "--without",
        action="append",
        default=[],
        metavar="COMPONENT",
        help="diffusion: leave out an optional component (SD3: text_encoder_3, i.e. T5) (repeatable)",
    )
    export.add_argument(
        "--no-fuse-attention",
        action="store_true",
        help="keep standard ONNX ops only: no onnxruntime MultiHeadAttention (for runtimes other than onnxruntime)",
    )
    export.set_defaults(run=cmd_export, loads_models=True)

    caption = commands.add_parser("caption", help="caption images with an artifact")
    caption.add_argument("artifact")
    caption.add_argument("images", nargs="+", help="image files")
    caption.add_argument("--json", action="store_true", help="print JSON")
    caption.add_argument("--prompt", help="text the caption starts from (families that take one, e.g. BLIP)")
    _add_generation_flags(caption)
    _add_runtime_flags(caption)
    caption.set_defaults(run=cmd_caption)

    generate = commands.add_parser("generate", help="make images from a prompt with a text-to-image artifact")
    generate.add_argument("artifact")
    generate.add_argument("prompt", help="what to draw")
    generate.add_argument(
        "--out", default="image.png", help="image file (several: stem-0.png, stem-1.png, ...)"
    )
    generate.add_argument("--negative-prompt", help="what to steer away from (guided families)")
    generate.add_argument("--steps", type=int, help="denoising steps (default: the family's)")
    generate.add_argument("--guidance-scale", type=float, help="guidance weight (default: the family's)")
    generate.add_argument("--height", type=int, help="image height in pixels (default: the model's)")
    generate.add_argument("--width", type=int, help="image width in pixels (default: the model's)")
    generate.add_argument("--seed", type=int, help="noise seed; the same seed gives diffusers' image")
    generate.add_argument("--num-images", type=int, help="images for the prompt (default 1)")
    _add_runtime_flags(generate)
    generate.set_defaults(run=cmd_generate)

    validate = commands.add_parser("validate", help="compare an artifact with its PyTorch source")
    validate.add_argument("artifact")
    validate.add_argument("--model", required=True, help="the source the artifact was exported from")
    validate.add_argument("--images", help="folder of validation images (default: drawn fixture images)")
    validate.add_argument("--num-images", type=int, default=8, help="drawn images when --images is not given")
    validate.add_argument(
        "--prompt",
        action="append",
        default=[],
        help="captioners: also compare captions with this prompt; diffusion: the prompts to render (repeatable)",
    )
    validate.add_argument(
        "--atol", type=float, help="absolute tolerance per component (default 1e-4, diffusion 1e-3)"
    )
    validate.add_argument("--steps", type=int, help="diffusion: denoising steps per image (default 4)")
    validate.add_argument("--height", type=int, help="diffusion: image height (default: the model's)")
    validate.add_argument("--width", type=int, help="diffusion: image width (default: the model's)")
    validate.add_argument(
        "--min-psnr", type=float, help="diffusion: fail below this PSNR vs diffusers (default 40 dB)"
    )
    validate.add_argument("--report", help="also write the JSON report to this file")
    validate.add_argument("--json", action="store_true", help="print the JSON report")
    validate.add_argument(
        "--allow-pickle", action="store_true", help="load .bin/.pt checkpoints (runs their code)"
    )
    validate.add_argument("--backend", default="cpu", help="execution backend")
    validate.set_defaults(run=cmd_validate, loads_models=True)

    from modelkiln.quantize.schemes import SCHEMES

    quantize = commands.add_parser(
        "quantize", help="make a quantized variant and measure it against its parent"
    )
    quantize.add_argument("artifact")
    quantize.add_argument("--scheme", required=True, choices=list(SCHEMES), help="quantization scheme")
    quantize.add_argument("--out", required=True, help="variant directory to create")
    quantize.add_argument("--components", nargs="+", help="graphs to quantize (default: the family's recipe)")
    quantize.add_argument("--exclude", action="append", default=[], help="node or module pattern kept fp32")
    options_help = "; ".join(
        f"{s.name}: {', '.join(f'{k}={v}' for k, v in s.options.items())}" for s in SCHEMES.values()
    )
    quantize.add_argument(
        "--option", action="append", default=[], help=f"scheme option KEY=VALUE ({options_help})"
    )
    quantize.add_argument(
        "--min-agreement", type=float, help="fail below this caption match rate vs the parent (0..1)"
    )
    quantize.add_argument(
        "--max-new-empty",
        type=int,
        default=0,
        help="captioners: fail when more held-out images than this get an empty caption where the parent "
        "captioned (a broken quantized decoder, transformers#30383); default 0, -1 turns the gate off",
    )
    quantize.add_argument(
        "--num-images", type=int, default=16, help="held-out images for the quality figures"
    )
    quantize.add_argument(
        "--min-psnr", type=float, help="diffusion: fail when an image's PSNR vs the parent is below this (dB)"
    )
    quantize.add_argument(
        "--num-prompts", type=int, default=4, help="diffusion: held-out prompts for quality"
    )
    quantize.add_argument(
        "--quality-steps", type=int, default=4, help="diffusion: denoising steps per quality image"
    )
    quantize.add_argument(
        "--image-size", type=int, help="diffusion: quality image side (default: the model's)"
    )
    quantize.add_argument(
        "--calibration-prompts", help="diffusion: text file of calibration prompts, one a line (int8-static)"
    )
    quantize.add_argument(
        "--calibration-steps", type=int, default=8, help="diffusion: denoising steps per calibration prompt"
    )
    quantize.add_argument("--calibration-images", help="folder of calibration images for int8-static")
    quantize.add_argument("--num-calibration", type=int, default=8, help="calibration images for int8-static")
    quantize.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    quantize.add_argument("--json", action="store_true", help="print the recipe and quality figures as JSON")
    quantize.set_defaults(run=cmd_quantize, loads_models=True)

    inspect = commands.add_parser("inspect", help="summarise an artifact's manifest")
    inspect.add_argument("artifact")
    inspect.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    inspect.set_defaults(run=cmd_inspect)

    verify = commands.add_parser("verify", help="check every file's hash against the manifest")
    verify.add_argument("artifact")
    verify.add_argument("--json", action="store_true", help="print the problems found as JSON")
    verify.set_defaults(run=cmd_verify)

    families = commands.add_parser("families", help="list the supported model families")
    families.add_argument("--json", action="store_true", help="print the families as JSON")
    families.set_defaults(run=cmd_families)

    bench = commands.add_parser("bench", help="latency, memory, size and quality of variants vs PyTorch")
    source = bench.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="source model: hub id or local directory (the eager baseline)")
    source.add_argument(
        "--preset",
        choices=["tiny", "full"],
        help="random-weight source built locally: ViT-GPT2, or see --family",
    )
    bench.add_argument(
        "--family",
        help="sd3: bench text-to-image (SD3.5-Medium-width presets); default: detected from --model",
    )
    bench.add_argument(
        "--steps", type=int, help="text-to-image: denoising steps per image (default: the preset's)"
    )
    bench.add_argument("--size", type=int, help="text-to-image: image side in pixels (default: the preset's)")
    bench.add_argument(
        "--variant", action="append", default=[], help="artifact directory to compare (repeatable)"
    )
    bench.add_argument("--schemes", help="comma-separated schemes to export and quantize on the fly")
    bench.add_argument("--out", required=True, help="results folder (report.json, report.md, plots)")
    bench.add_argument(
        "--artifacts", help="folder for presets and on-the-fly artifacts (default OUT/artifacts)"
    )
    bench.add_argument("--threads", type=int, default=2, help="intra-op threads for every variant")
    bench.add_argument("--repeats", type=int, default=5, help="timed passes over the images")
    bench.add_argument("--warmup", type=int, default=1, help="untimed passes first")
    bench.add_argument("--images", type=int, default=4, help="drawn images (text-to-image: prompts) per pass")
    bench.add_argument("--max-new-tokens", type=int, default=16, help="tokens every variant decodes")
    bench.add_argument("--no-rss", action="store_true", help="skip the peak-memory subprocesses")
    bench.add_argument(
        "--peers", help="comma-separated toolchains to time too (optimum): each gets its own virtualenv, once"
    )
    bench.add_argument("--peers-dir", help="folder for peer virtualenvs (default ~/.cache/modelkiln/peers)")
    bench.add_argument(
        "--gate",
        action="store_true",
        help="exit 1 when a variant misses kiln quantize's quality gates (default: mark it in the report)",
    )
    bench.add_argument("--json", action="store_true", help="print a summary of the report as JSON")
    bench.set_defaults(run=cmd_bench, loads_models=True)

    build = commands.add_parser("build", help="build every artifact a recipe (TOML) declares, with gates")
    build.add_argument("recipe", help="recipe .toml file, or a shipped recipe name (shapes-captioner)")
    build.add_argument("--out", help="build folder (default build/<recipe name>); unchanged steps are cached")
    build.set_defaults(run=cmd_build, loads_models=True)

    demo = commands.add_parser("demo", help="export, run and validate the shipped shapes captioner")
    demo.add_argument("--out", default="kiln-demo", help="folder for the artifact and the drawn images")
    demo.add_argument("--num-images", type=int, default=6, help="images to draw and caption")
    demo.set_defaults(run=cmd_demo, loads_models=True)
    return parser


def cmd_families(args: argparse.Namespace) -> int:
    from modelkiln.registry import FAMILIES

    if args.json:
        _print_json(
            [{"name": f.name, "task": f.task, "description": f.description} for f in FAMILIES.values()]
        )
    else:
        name_width = max(len(name) for name in FAMILIES)
        task_width = max(len(family.task) for family in FAMILIES.values())
        for family in FAMILIES.values():
            print(f"{family.name:{name_width}}  {family.task:{task_width}}  {family.description}")
    _next("kiln export --model SRC --out DIR")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Commands that load PyTorch models run with the libraries' progress bars and chatter hidden.
    parser.set_defaults(loads_models=False)
    args = parser.parse_args(argv)
    args.argv = argv  # the exact command line, for reports
    try:
        with _quiet_model_loading() if args.loads_models else contextlib.nullcontext():
            return args.run(args)
    except KilnError as exc:
        # Escaped: messages quote user text and TOML sections like [export], which rich reads as markup.
        console.print(f"[red]error:[/red] {escape(str(exc))}")
        return exc.exit_code
    except ModuleNotFoundError as exc:
        extra = EXTRA_OF.get((exc.name or "").split(".")[0])
        if extra is None:
            raise
        console.print(
            f"[red]error:[/red] kiln {args.command} needs the {extra} tools ({exc.name} is not installed). "
            f"Install them with: pip install {escape(repr(f'modelkiln[{extra}]'))}"
        )
        return 2
    except KeyboardInterrupt:
        console.print("interrupted; no partial artifact was left behind")
        return 130


if __name__ == "__main__":
    sys.exit(main())
