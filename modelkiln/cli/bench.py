"""kiln bench --preset tiny|full | --model SRC [--variant DIR]... [--schemes S,S] [--peers optimum] --out DIR"""

from __future__ import annotations

import argparse

from modelkiln.cli.common import console
from modelkiln.registry import FAMILIES

HELP = "latency, memory, size and quality of variants vs PyTorch"
LOADS_MODELS = True  # loads the PyTorch eager baseline: its libraries' progress bars are hidden


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="source model: hub id or local directory (the eager baseline)")
    presets = sorted(
        {preset for family in FAMILIES.values() if family.bench for preset in family.bench.presets}
    )
    source.add_argument(
        "--preset", choices=presets, help="random-weight source of --family's real widths, built locally"
    )
    with_presets = ", ".join(
        name for name, family in FAMILIES.items() if family.bench and family.bench.presets
    )
    parser.add_argument(
        "--family",
        help=f"{with_presets}: the family of --preset (default vit-gpt2); "
        "with --model: forces the family instead of detecting it",
    )
    parser.add_argument(
        "--steps", type=int, help="text-to-image: denoising steps per image (default: the preset's)"
    )
    parser.add_argument(
        "--size", type=int, help="text-to-image: image side in pixels (default: the preset's)"
    )
    parser.add_argument(
        "--variant", action="append", default=[], help="artifact directory to compare (repeatable)"
    )
    parser.add_argument("--schemes", help="comma-separated schemes to export and quantize on the fly")
    parser.add_argument("--out", required=True, help="results folder (report.json, report.md, plots)")
    parser.add_argument(
        "--artifacts", help="folder for presets and on-the-fly artifacts (default OUT/artifacts)"
    )
    _add_measurement_arguments(parser)
    parser.add_argument(
        "--gate",
        action="store_true",
        help="exit 1 when a variant misses kiln quantize's quality gates (default: mark it in the report)",
    )
    parser.add_argument("--json", action="store_true", help="print a summary of the report as JSON")


def _add_measurement_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads for every variant")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes over the images")
    parser.add_argument("--warmup", type=int, default=1, help="untimed passes first")
    parser.add_argument(
        "--images", type=int, default=4, help="drawn images (text-to-image: prompts) per pass"
    )
    parser.add_argument("--max-new-tokens", type=int, default=16, help="tokens every variant decodes")
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument(
        "--peers", help="comma-separated toolchains to time too (optimum): each gets its own virtualenv, once"
    )
    parser.add_argument("--peers-dir", help="folder for peer virtualenvs (default ~/.cache/modelkiln/peers)")


def run(args: argparse.Namespace) -> int:
    # Imported here, not at the top: the benchmark tasks load onnx and onnxruntime, which the other
    # commands and `kiln --help` do not wait for.
    from modelkiln.benchmarks.tasks import run_command

    return run_command(args, console)
