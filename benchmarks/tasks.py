"""The benchmarks `kiln bench` and `kiln build` run: a plain-dict registry keyed by the runtime task.

    task = get_task("text-to-image")                     # or "image-to-text"
    config = task.configure(BenchConfig(out=Path("bench"), preset="tiny"), TaskOptions(per_pass=2))
    report = task.run(config, print)                     # report.json's content, also written to disk
    code = run_command(args, console)                    # `kiln bench` from its parsed arguments

`kiln bench` takes the task from ``--model`` (its detected family's task, or the one ``--family``
forces) or, for ``--preset``, from ``--family`` (no family: the ViT-GPT2 captioner presets); `kiln
build` from the task of the artifact it exported.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.markup import escape

from modelkiln.errors import KilnError, ValidationFailedError
from modelkiln.exporters.source import resolve_source
from modelkiln.registry import bench_families, detect_family, get_family

from .captioning import harness as captioning
from .core.config import BenchConfig, TaskOptions
from .text_to_image import harness as text_to_image

Log = Callable[[str], None]


@dataclass(frozen=True)
class BenchTask:
    """One kind of benchmark: how to configure it, run it and show its report."""

    description: str  # one line for error messages
    configure: Callable[[BenchConfig, TaskOptions], BenchConfig]  # the task's own config of a request
    run: Callable[[BenchConfig, Log], dict]  # measure, write report.json/.md and plots; the report
    print_rows: Callable[[dict, object], None]  # (report, console): one line per variant and target
    p50_s: Callable[[dict], float]  # a report row's median end-to-end seconds per input (summaries)


BENCH_TASKS: dict[str, BenchTask] = {
    "image-to-text": BenchTask(
        "captioning: --family vit-gpt2|blip|blip-2 presets or a captioner --model",
        configure=captioning.configure, run=captioning.run_bench,
        print_rows=captioning.print_rows, p50_s=captioning.p50_s,
    ),
    "text-to-image": BenchTask(
        "text-to-image: --family sd3|flux|stable-diffusion presets or a diffusers pipeline --model",
        configure=text_to_image.configure, run=text_to_image.run_diffusion_bench,
        print_rows=text_to_image.print_rows, p50_s=text_to_image.p50_s,
    ),
}  # fmt: skip


def get_task(key: str) -> BenchTask:
    if key not in BENCH_TASKS:
        valid = "; ".join(t.description for t in BENCH_TASKS.values())
        raise KilnError(f"kiln bench has no {key} benchmark. It runs: {valid}.")
    return BENCH_TASKS[key]


def bench_task(args: argparse.Namespace) -> str:
    """The task of the requested benchmark (see the module docstring)."""
    if args.family:
        family = get_family(args.family)
    elif args.model:
        # Only the config is read here; the harness refuses pickle weights with what to do instead.
        family = detect_family(resolve_source(args.model, allow_pickle=True).config, args.model)
    else:
        return "image-to-text"
    if family.bench is None:
        # The family's task has a benchmark, but it does not run this family's sources yet.
        raise KilnError(
            f"--family {family.name}: the {family.task} benchmark runs "
            f"{', '.join(bench_families(family.task))} so far. "
            "Time this family's artifacts with kiln generate, or bench an sd3 pipeline."
        )
    return family.bench.task


def _names(text: str | None) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip()) if text else ()


def config_of(args: argparse.Namespace, task: BenchTask) -> BenchConfig:
    """The task's config from `kiln bench`'s parsed arguments."""
    argv = sys.argv[1:] if args.argv is None else args.argv
    base = BenchConfig(
        out=Path(args.out), model=args.model, preset=args.preset, family=args.family,
        variants=tuple(args.variant), schemes=_names(args.schemes), work_dir=Path(args.artifacts) if args.artifacts else None,
        threads=args.threads, repeats=args.repeats, warmup=args.warmup, measure_rss=not args.no_rss,
        command=" ".join(["kiln", *argv]),
    )  # fmt: skip
    options = TaskOptions(
        per_pass=args.images, max_new_tokens=args.max_new_tokens, peers=_names(args.peers),
        peers_dir=Path(args.peers_dir) if args.peers_dir else None, family=args.family,
        steps=args.steps, size=args.size,
    )  # fmt: skip
    return task.configure(base, options)


def bench_summary(report: dict, task: BenchTask) -> dict:
    """report.json without per-job detail: what a CI step compares."""
    eager = task.p50_s(report["variants"][0])
    rows = [
        {
            "name": row["name"],
            "p50_s": task.p50_s(row),
            "speedup_vs_eager": eager / task.p50_s(row),
            "size_bytes": row.get("size_bytes"),
            "peak_rss_bytes": row.get("peak_rss_bytes"),
            "quality": row.get("quality"),
            "gate": row.get("gate", []),
        }
        for row in report["variants"]
    ]
    return {"command": report["command"], "variants": rows, "targets": report["targets"]}


def run_command(args: argparse.Namespace, console) -> int:
    """`kiln bench`: run the task the arguments ask for, print its summary; exit 1 on a missed gate with --gate."""
    task = get_task(bench_task(args))
    config = config_of(args, task)
    # Plain lines, not a spinner: the harness shows its own progress bar while it times.
    # markup=False: logged pip commands hold brackets (optimum-onnx[onnxruntime]) that rich would eat.
    report = task.run(config, lambda message: console.print(f"  {message}", markup=False))
    task.print_rows(report, console)
    missed = {row["name"]: row["gate"] for row in report["variants"] if row.get("gate")}
    for name, misses in missed.items():
        console.print(f"  gate   {name} misses kiln quantize's gates: {'; '.join(misses)}")
    if args.json:
        print(json.dumps(bench_summary(report, task), indent=2, default=str))
    report_md = Path(args.out) / "report.md"
    console.print(f"next: [bold]{escape(f'less {report_md}')}[/bold]")
    if missed and args.gate:
        raise ValidationFailedError(
            f"{len(missed)} variant(s) missed their quality gates: {', '.join(missed)}."
        )
    return 0
