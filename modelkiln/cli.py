"""The ``kiln`` command line: export, run, validate and inspect artifacts.

    kiln demo                                   # export the shipped captioner, caption, validate
    kiln export --model SRC --out DIR [--family F] [--opset N]
    kiln caption DIR IMAGE... [--num-beams N] [--max-new-tokens N] [--json]
    kiln validate DIR --model SRC [--json]
    kiln inspect DIR
    kiln verify DIR
    kiln bench --preset tiny|full | --model SRC [--variant DIR]... [--schemes S,S] --out DIR

Bad input ends with one ``error:`` line naming the fix and exit code 2; a failed check exits 1. Each
command's last line suggests the natural next command.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from rich.console import Console

from modelkiln import __version__
from modelkiln.errors import KilnError, ValidationFailedError

console = Console(stderr=True, highlight=False, soft_wrap=True)


@contextlib.contextmanager
def _status(message: str) -> Iterator[Callable[[str], None]]:
    """A spinner on stderr for a long step; yields a function that updates its text."""
    with console.status(message) as status:
        yield lambda text: status.update(f"{message}: {text}")


def _next(command: str) -> None:
    console.print(f"next: [bold]{command}[/bold]")


def cmd_export(args: argparse.Namespace) -> int:
    from modelkiln.exporters.export import ExportConfig, export_model

    config = ExportConfig(
        family=args.family,
        opset=args.opset,
        allow_pickle=args.allow_pickle,
        trust_remote_code=args.trust_remote_code,
        overwrite=args.overwrite,
        external_data=True if args.external_data else None,
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
    _next(f"kiln validate {args.artifact} --model SOURCE")
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


def cmd_validate(args: argparse.Namespace) -> int:
    from modelkiln.validate import ValidateConfig, validate_artifact

    config = ValidateConfig(
        atol=args.atol,
        prompts=(None, *args.prompt),
        images=args.images,
        num_images=args.num_images,
        allow_pickle=args.allow_pickle,
        backend=args.backend,
    )
    with _status(f"validating {args.artifact} against {args.model}"):
        report = validate_artifact(args.artifact, args.model, config)
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report, indent=2))
    _print_validation(report)
    if not report["passed"]:
        raise ValidationFailedError(f"{args.artifact} does not match {args.model}; see the FAIL lines above.")
    console.print(f"validation passed; recorded in {args.artifact}/manifest.json")
    _next(f"kiln caption {args.artifact} IMAGE")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from modelkiln.manifest import read_manifest

    manifest = read_manifest(args.artifact)
    print(
        f"family     {manifest.family} ({manifest.task}), "
        f"precision {manifest.precision}, opset {manifest.opset}"
    )
    print(f"source     {manifest.source.model} (weights sha256 {manifest.source.weights_sha256[:16]}...)")
    print(f"tools      {', '.join(f'{k} {v}' for k, v in manifest.tools.items())}")
    for name, spec in manifest.components.items():
        print(f"component  {name}: {spec.file}{' + ' + spec.external_data if spec.external_data else ''}")
        for kind, values in (("in ", spec.inputs), ("out", spec.outputs)):
            for value in values[:6]:
                print(f"    {kind} {value.name} {value.dtype} {value.shape}")
            if len(values) > 6:
                print(f"    {kind} ... {len(values) - 6} more")
    validation = manifest.validation
    print(
        f"validation {'none yet' if validation is None else ('passed' if validation['passed'] else 'FAILED')}"
    )
    _next(f"kiln verify {args.artifact}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from modelkiln.manifest import read_manifest, verify_files

    manifest = read_manifest(args.artifact)
    problems = verify_files(args.artifact, manifest)
    for problem in problems:
        console.print(f"  {problem}")
    if problems:
        raise ValidationFailedError(
            f"{args.artifact}: {len(problems)} file(s) differ from the manifest. "
            "Re-export or re-copy the artifact."
        )
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
        num_images=args.num_images,
        calibration_images=args.calibration_images,
        num_calibration=args.num_calibration,
        overwrite=args.overwrite,
    )
    with _status(f"quantizing {args.artifact} with {args.scheme}") as update:
        manifest = quantize_artifact(args.artifact, args.out, config, log=update)
    parent_size = sum(p.stat().st_size for p in Path(args.artifact).iterdir() if p.is_file())
    size = sum(p.stat().st_size for p in Path(args.out).iterdir() if p.is_file())
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
    _next(f"kiln caption {args.out} IMAGE")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from modelkiln.benchmarks.harness import BenchConfig, run_bench

    config = BenchConfig(
        out=Path(args.out),
        model=args.model,
        preset=args.preset,
        variants=tuple(args.variant),
        schemes=tuple(s.strip() for s in args.schemes.split(",") if s.strip()) if args.schemes else (),
        work_dir=Path(args.artifacts) if args.artifacts else None,
        threads=args.threads,
        repeats=args.repeats,
        warmup=args.warmup,
        images=args.images,
        max_new_tokens=args.max_new_tokens,
        measure_rss=not args.no_rss,
        command=" ".join(["kiln", *sys.argv[1:]]) if args.argv is None else " ".join(["kiln", *args.argv]),
    )
    # Plain lines, not a spinner: the harness shows its own progress bar while it times.
    report = run_bench(config, log=lambda message: console.print(f"  {message}"))
    eager = report["variants"][0]["latency"]["p50_s"]
    for row in report["variants"]:
        p50 = row["latency"]["p50_s"]
        console.print(f"  {row['name']:14} p50 {p50 * 1e3:8.1f} ms  {eager / p50:5.2f}x eager")
    for check in report["targets"]:
        console.print(f"  {'met' if check['met'] else 'MISSED':6} {check['target']}: {check['value']:.2f}")
    _next(f"less {Path(args.out) / 'report.md'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from modelkiln.demo import run_demo

    return run_demo(Path(args.out), num_images=args.num_images, console=console)


def _add_generation_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, help="caption length limit (default: the model's)")
    parser.add_argument("--num-beams", type=int, help="beam search width; 1 is greedy (default: the model's)")
    parser.add_argument("--do-sample", action="store_true", help="sample instead of searching")
    parser.add_argument("--top-k", type=int, help="sample from the k most likely tokens")
    parser.add_argument("--top-p", type=float, help="sample from the smallest set with this probability mass")
    parser.add_argument("--temperature", type=float, help="sampling temperature")
    parser.add_argument("--seed", type=int, help="sampling seed, for reproducible captions")


def _add_runtime_flags(parser: argparse.ArgumentParser) -> None:
    from modelkiln.runtime.session import BACKENDS

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
    export.set_defaults(run=cmd_export)

    caption = commands.add_parser("caption", help="caption images with an artifact")
    caption.add_argument("artifact")
    caption.add_argument("images", nargs="+", help="image files")
    caption.add_argument("--json", action="store_true", help="print JSON")
    caption.add_argument("--prompt", help="text the caption starts from (families that take one, e.g. BLIP)")
    _add_generation_flags(caption)
    _add_runtime_flags(caption)
    caption.set_defaults(run=cmd_caption)

    validate = commands.add_parser("validate", help="compare an artifact with its PyTorch source")
    validate.add_argument("artifact")
    validate.add_argument("--model", required=True, help="the source the artifact was exported from")
    validate.add_argument("--images", help="folder of validation images (default: drawn fixture images)")
    validate.add_argument("--num-images", type=int, default=8, help="drawn images when --images is not given")
    validate.add_argument(
        "--prompt", action="append", default=[], help="also compare captions with this prompt (repeatable)"
    )
    validate.add_argument("--atol", type=float, default=1e-4, help="absolute tolerance per component")
    validate.add_argument("--report", help="also write the JSON report to this file")
    validate.add_argument("--json", action="store_true", help="print the JSON report")
    validate.add_argument(
        "--allow-pickle", action="store_true", help="load .bin/.pt checkpoints (runs their code)"
    )
    validate.add_argument("--backend", default="cpu", help="execution backend")
    validate.set_defaults(run=cmd_validate)

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
        "--min-agreement", type=float, help="fail below this caption match rate vs the parent"
    )
    quantize.add_argument(
        "--num-images", type=int, default=16, help="held-out images for the quality figures"
    )
    quantize.add_argument("--calibration-images", help="folder of calibration images for int8-static")
    quantize.add_argument("--num-calibration", type=int, default=8, help="calibration images for int8-static")
    quantize.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    quantize.set_defaults(run=cmd_quantize)

    inspect = commands.add_parser("inspect", help="summarise an artifact's manifest")
    inspect.add_argument("artifact")
    inspect.set_defaults(run=cmd_inspect)

    verify = commands.add_parser("verify", help="check every file's hash against the manifest")
    verify.add_argument("artifact")
    verify.set_defaults(run=cmd_verify)

    families = commands.add_parser("families", help="list the supported model families")
    families.set_defaults(run=cmd_families)

    bench = commands.add_parser("bench", help="latency, memory, size and quality of variants vs PyTorch")
    source = bench.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="source model: hub id or local directory (the eager baseline)")
    source.add_argument("--preset", choices=["tiny", "full"], help="random-weight ViT-GPT2 built locally")
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
    bench.add_argument("--images", type=int, default=4, help="drawn images per pass")
    bench.add_argument("--max-new-tokens", type=int, default=16, help="tokens every variant decodes")
    bench.add_argument("--no-rss", action="store_true", help="skip the peak-memory subprocesses")
    bench.set_defaults(run=cmd_bench)

    demo = commands.add_parser("demo", help="export, run and validate the shipped shapes captioner")
    demo.add_argument("--out", default="kiln-demo", help="folder for the artifact and the drawn images")
    demo.add_argument("--num-images", type=int, default=6, help="images to draw and caption")
    demo.set_defaults(run=cmd_demo)
    return parser


def cmd_families(args: argparse.Namespace) -> int:
    from modelkiln.registry import FAMILIES

    for family in FAMILIES.values():
        print(f"{family.name:10} {family.task:14} {family.description}")
    _next("kiln export --model SRC --out DIR")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = argv  # the exact command line, for reports
    try:
        return args.run(args)
    except KilnError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return exc.exit_code
    except KeyboardInterrupt:
        console.print("interrupted; no partial artifact was left behind")
        return 130


if __name__ == "__main__":
    sys.exit(main())
