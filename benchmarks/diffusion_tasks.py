"""Which benchmark `kiln bench` runs: a plain-dict registry of bench tasks keyed by the runtime task.

    task = bench_task(args)            # "image-to-text" or "text-to-image"
    code = dispatch(args, console)     # runs the text-to-image bench; None: cli.cmd_bench's captioner path

The task comes from ``--model`` (its detected family's task, or the one ``--family`` forces) or, for
``--preset``, from ``--family`` (no family: the ViT-GPT2 captioner presets). The captioner entry's
runner is ``None`` because its code lives in ``cli.cmd_bench`` itself; when that settles, it can move
here as one more runner.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from modelkiln.errors import KilnError


@dataclass(frozen=True)
class BenchTask:
    """One kind of benchmark `kiln bench` can run."""

    description: str  # one line for error messages
    run: (
        Callable[[argparse.Namespace, object], int] | None
    )  # (args, console) -> exit code; None: the CLI's own


@dataclass(frozen=True)
class DiffusionFamily:
    """A text-to-image family the benchmark runs."""

    presets: tuple[str, ...]  # --preset names that build a source of this family (diffusion_presets)


# Text-to-image families the benchmark knows (runners, FLOP count, presets); others are refused by name.
DIFFUSION_FAMILIES: dict[str, DiffusionFamily] = {"sd3": DiffusionFamily(presets=("tiny", "full"))}


def _config(args: argparse.Namespace):
    from .diffusion_harness import DiffusionBenchConfig

    schemes = tuple(s.strip() for s in args.schemes.split(",") if s.strip()) if args.schemes else ()
    argv = sys.argv[1:] if args.argv is None else args.argv
    return DiffusionBenchConfig(
        out=Path(args.out), model=args.model, preset=args.preset, family=args.family or "sd3",
        variants=tuple(args.variant), schemes=schemes, work_dir=Path(args.artifacts) if args.artifacts else None,
        threads=args.threads, repeats=args.repeats, warmup=args.warmup, prompts=args.images, steps=args.steps,
        size=args.size, measure_rss=not args.no_rss, command=" ".join(["kiln", *argv]),
    )  # fmt: skip


def run_text_to_image(args: argparse.Namespace, console) -> int:
    """The text-to-image bench from parsed `kiln bench` arguments; prints a summary like the captioner's."""
    from .diffusion_harness import run_diffusion_bench
    from .diffusion_report import derived

    if args.peers:
        raise KilnError("--peers compares captioning toolchains only; drop it for a text-to-image benchmark.")
    report = run_diffusion_bench(
        _config(args), log=lambda message: console.print(f"  {message}", markup=False)
    )
    figures = derived(report)
    for row in report["variants"]:
        step, figure = row["latency"]["step"]["p50_s"], figures[row["name"]]
        console.print(
            f"  {row['name']:14} step p50 {step * 1e3:9.1f} ms  {figure['step_speedup']:5.2f}x eager  "
            f"pipeline {figure['pipeline_speedup']:5.2f}x  PSNR {row['quality']['psnr_mean']:6.1f} dB"
        )
    for check in report["targets"]:
        console.print(f"  {'met' if check['met'] else 'MISSED':6} {check['target']}: {check['value']:.3f}x")
    console.print(f"[bold]next:[/bold] less {Path(args.out) / 'report.md'}")
    return 0


BENCH_TASKS: dict[str, BenchTask] = {
    "image-to-text": BenchTask("captioning: ViT-GPT2 presets or a captioner --model", run=None),
    "text-to-image": BenchTask(
        "text-to-image: --family sd3 presets or a diffusers pipeline --model", run=run_text_to_image
    ),
}


def bench_task(args: argparse.Namespace) -> str:
    """The task of the requested benchmark (see the module docstring)."""
    from modelkiln.registry import detect_family, get_family

    if args.family:
        family = get_family(args.family)
    elif args.model:
        from modelkiln.exporters.source import resolve_source

        # Only the config is read here; the harness refuses pickle weights with what to do instead.
        family = detect_family(resolve_source(args.model, allow_pickle=True).config, args.model)
    else:
        return "image-to-text"
    if family.task == "text-to-image" and family.name not in DIFFUSION_FAMILIES:
        raise KilnError(
            f"--family {family.name}: the text-to-image benchmark runs {', '.join(DIFFUSION_FAMILIES)} so far. "
            "Time this family's artifacts with kiln generate, or bench an sd3 pipeline."
        )
    return family.task


def dispatch(args: argparse.Namespace, console) -> int | None:
    """Run the benchmark the arguments ask for, unless it is the CLI's own (then None)."""
    task = bench_task(args)
    if task not in BENCH_TASKS:
        valid = "; ".join(t.description for t in BENCH_TASKS.values())
        raise KilnError(f"kiln bench has no {task} benchmark. It runs: {valid}.")
    runner = BENCH_TASKS[task].run
    return None if runner is None else runner(args, console)
