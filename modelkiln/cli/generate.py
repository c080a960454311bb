"""kiln generate DIR "a prompt" [--steps N] [--seed S] [--height H] [--width W] --out image.png"""

from __future__ import annotations

import argparse
from pathlib import Path

from modelkiln.cli.common import add_runtime_flags, console, next_hint, source_of
from modelkiln.errors import KilnError

HELP = "make images from a prompt with a text-to-image artifact"
LOADS_MODELS = False  # runs the artifact; loads no PyTorch source model

# Optional flags passed on to the pipeline: (flag, type, the pipeline's keyword, help). Left out, the
# pipeline's own default applies.
IMAGE_OPTIONS: tuple[tuple[str, type, str, str], ...] = (
    ("--negative-prompt", str, "negative_prompt", "what to steer away from (guided families)"),
    ("--steps", int, "num_inference_steps", "denoising steps (default: the family's)"),
    ("--guidance-scale", float, "guidance_scale", "guidance weight (default: the family's)"),
    ("--height", int, "height", "image height in pixels (default: the model's)"),
    ("--width", int, "width", "image width in pixels (default: the model's)"),
    ("--seed", int, "seed", "noise seed; the same seed gives diffusers' image"),
    ("--num-images", int, "num_images_per_prompt", "images for the prompt (default 1)"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifact")
    parser.add_argument("prompt", help="what to draw")
    parser.add_argument(
        "--out", default="image.png", help="image file (several: stem-0.png, stem-1.png, ...)"
    )
    for flag, kind, _, text in IMAGE_OPTIONS:
        parser.add_argument(flag, type=kind, help=text)
    add_runtime_flags(parser)


def run(args: argparse.Namespace) -> int:
    # Here, not at the top: the runtime loads numpy and onnxruntime, and rich's progress bars take
    # 20 ms, none of which `kiln --help` should wait for.
    from rich.progress import Progress

    from modelkiln import runtime

    pipe = runtime.load(args.artifact, backend=args.backend, threads=args.threads)
    if getattr(pipe, "task", None) != "text-to-image":
        raise KilnError(
            f"{args.artifact} is a {pipe.task} artifact; `kiln generate` runs text-to-image ones."
        )
    given = {keyword: getattr(args, flag[2:].replace("-", "_")) for flag, _, keyword, _ in IMAGE_OPTIONS}
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("denoising", total=None)
        result = pipe(
            args.prompt,
            **{key: value for key, value in given.items() if value is not None},
            callback=lambda step, total: progress.update(task, completed=step, total=total),
        )
    paths = _image_paths(Path(args.out), len(result.images))
    for image, path in zip(result.images, paths, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        console.print(f"wrote {path} ({image.width}x{image.height})")
    next_hint(f"kiln validate {args.artifact} --model {source_of(args.artifact)}")
    return 0


def _image_paths(out: Path, count: int) -> list[Path]:
    """``out`` for one image; ``stem-0.png``, ``stem-1.png`` ... for several."""
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(count)]
