"""kiln caption DIR INPUT... [--out FILE] [--batch-size N] [--engine local|ray] [--num-beams N] [--json]"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TimeRemainingColumn
from rich.text import Text

from modelkiln.cli.common import add_runtime_flags, console, next_hint, source_of
from modelkiln.errors import KilnError

HELP = "caption images, folders or tables with an artifact; --out writes metadata.jsonl, resumably"
LOADS_MODELS = False  # the torch-free runtime: works in the runtime-only install

# Optional generation flags, each the pipeline keyword of the same name: (flag, type, help). Left out,
# the model's generation config applies. --do-sample (a switch) goes between the first two and the rest.
GENERATION_OPTIONS: tuple[tuple[str, type, str], ...] = (
    ("--max-new-tokens", int, "caption length limit (default: the model's)"),
    ("--num-beams", int, "beam search width; 1 is greedy (default: the model's)"),
    ("--top-k", int, "sample from the k most likely tokens"),
    ("--top-p", float, "sample from the smallest set with this probability mass"),
    ("--temperature", float, "sampling temperature"),
    ("--seed", int, "sampling seed, for reproducible captions"),
)
# Flags of the Ray engine only (argparse dest names): given with --engine local they are an error.
RAY_FLAGS = ("workers", "threads_per_worker", "ray_address")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifact")
    parser.add_argument(
        "images",
        nargs="+",
        metavar="INPUT",
        help="image files, folders (recursive), .txt lists of paths, .jsonl/.parquet tables of paths or bytes",
    )
    parser.add_argument("--json", action="store_true", help="print JSON (with --out: the run's summary)")
    parser.add_argument("--prompt", help="text the caption starts from (families that take one, e.g. BLIP)")
    for flag, kind, text in GENERATION_OPTIONS[:2]:
        parser.add_argument(flag, type=kind, help=text)
    parser.add_argument("--do-sample", action="store_true", help="sample instead of searching")
    for flag, kind, text in GENERATION_OPTIONS[2:]:
        parser.add_argument(flag, type=kind, help=text)
    add_runtime_flags(parser)
    _add_dataset_arguments(parser)


def _add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("datasets (with --out)")
    group.add_argument(
        "--out", help="metadata.jsonl (imagefolder: file_name, text), .parquet or .csv; re-run to resume"
    )
    group.add_argument("--batch-size", type=int, default=8, help="images per captioning call (default 8)")
    group.add_argument("--glob", default="**/*", help="which files of a folder to caption (default **/*)")
    group.add_argument(
        "--image-column", help="table column of image paths or bytes (default: image, file_name...)"
    )
    group.add_argument("--chunk-size", type=int, default=512, help="results per crash-safe journal chunk")
    group.add_argument("--overwrite", action="store_true", help="drop the output and its journal, start over")
    group.add_argument(
        "--engine", default="local", choices=["local", "ray"], help="ray: pip install 'modelkiln[ray]'"
    )
    group.add_argument("--workers", type=int, help="ray: caption actors (default: CPUs / threads per worker)")
    group.add_argument(
        "--threads-per-worker", type=int, help="ray: CPUs and onnxruntime threads per actor (1)"
    )
    group.add_argument(
        "--ray-address", help="ray: an existing cluster (default: a local Ray on this machine)"
    )


def _generation_options(args: argparse.Namespace) -> dict:
    keywords = [flag[2:].replace("-", "_") for flag, _, _ in GENERATION_OPTIONS]  # argparse's dest names
    options = {key: getattr(args, key) for key in keywords} | {"do_sample": True if args.do_sample else None}
    return {key: value for key, value in options.items() if value is not None}


def run(args: argparse.Namespace) -> int:
    if args.out is None:
        return _print_captions(args)
    return _caption_dataset(args)


def _print_captions(args: argparse.Namespace) -> int:
    # Here, not at the top: the runtime loads numpy and onnxruntime, which `kiln --help` never waits for.
    from modelkiln import runtime
    from modelkiln.runtime.datasets import expand

    items = list(expand(args.images, Path.cwd(), args.glob, args.image_column))
    if any(item.path is None for item in items):
        raise KilnError("image bytes from a table can only be captioned into a file: pass --out.")
    pipe = runtime.load(args.artifact, backend=args.backend, threads=args.threads)
    results = pipe(
        [item.path for item in items],
        prompt=args.prompt,
        batch_size=args.batch_size,
        **_generation_options(args),
    )
    captions = [result[0]["generated_text"] for result in results]
    names = [item.file_name for item in items]  # relative to the working folder when inside it
    if args.json:
        print(json.dumps([{"image": n, "generated_text": c} for n, c in zip(names, captions, strict=True)]))
    else:
        for name, caption in zip(names, captions, strict=True):
            print(f"{name}: {caption}")
    next_hint(f"kiln validate {args.artifact} --model {source_of(args.artifact)}")
    return 0


class _RateColumn(ProgressColumn):
    """Images per second over rich's recent window."""

    def render(self, task) -> Text:
        return Text(f"{task.speed or 0:.1f} images/s")


def _engine(args: argparse.Namespace):
    from modelkiln.runtime.datasets import get_engine  # here, not at the top: see _print_captions

    given = {name: getattr(args, name) for name in RAY_FLAGS if getattr(args, name) is not None}
    if args.engine != "ray":
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            raise KilnError(f"{flags} set the Ray engine: add --engine ray, or leave them out.")
        return get_engine(args.engine)
    if args.threads is not None:
        raise KilnError(
            "--threads sets the local engine's threads: with --engine ray, use --threads-per-worker."
        )
    options = {"workers": given.get("workers"), "address": given.get("ray_address")}
    return get_engine("ray", threads_per_worker=given.get("threads_per_worker", 1), **options)


def _caption_dataset(args: argparse.Namespace) -> int:
    from modelkiln.runtime import caption_dataset  # here, not at the top: see _print_captions

    options = {"batch_size": args.batch_size, "prompt": args.prompt, "generation": _generation_options(args)}
    options |= {"glob": args.glob, "image_column": args.image_column, "chunk_size": args.chunk_size}
    columns = (BarColumn(), MofNCompleteColumn(), _RateColumn(), TimeRemainingColumn())
    with Progress("captioning", *columns, console=console, transient=True) as progress:
        task = progress.add_task("captioning", total=None)
        try:
            summary = caption_dataset(
                args.artifact, args.images, args.out, engine=_engine(args), backend=args.backend,
                threads=args.threads, overwrite=args.overwrite,
                progress=lambda done, total: progress.update(task, completed=done, total=total), **options,
            )  # fmt: skip
        except KeyboardInterrupt:
            console.print(
                "interrupted: the images captioned so far are journaled; run the same command to go on"
            )
            return 130
    _report(args, summary)
    return 0


def _report(args: argparse.Namespace, summary) -> None:
    if args.json:
        fields = ("total", "captioned", "resumed", "failed", "seconds", "images_per_s", "out", "failed_file")
        print(json.dumps({name: getattr(summary, name) for name in fields}, default=str))
    failed = f", {summary.failed} failed (listed in {summary.failed_file})" if summary.failed else ""
    console.print(
        f"captioned {summary.captioned} of {summary.total} images ({summary.resumed} done before{failed}) in "
        f"{summary.seconds:.1f} s, {summary.images_per_s:.1f} images/s -> {summary.out}"
    )
    if summary.out.name == "metadata.jsonl":  # an imagefolder data set, what training scripts read
        load = f"datasets.load_dataset('imagefolder', data_dir='{summary.out.parent}')"
        next_hint(f'python -c "import datasets; print({load})"')
    else:
        next_hint(f"kiln validate {args.artifact} --model {source_of(args.artifact)}")
