"""kiln caption DIR IMAGE... [--num-beams N] [--max-new-tokens N] [--json]"""

from __future__ import annotations

import argparse
import json

from modelkiln.cli.common import add_runtime_flags, next_hint, source_of

HELP = "caption images with an artifact"
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifact")
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--prompt", help="text the caption starts from (families that take one, e.g. BLIP)")
    for flag, kind, text in GENERATION_OPTIONS[:2]:
        parser.add_argument(flag, type=kind, help=text)
    parser.add_argument("--do-sample", action="store_true", help="sample instead of searching")
    for flag, kind, text in GENERATION_OPTIONS[2:]:
        parser.add_argument(flag, type=kind, help=text)
    add_runtime_flags(parser)


def _generation_options(args: argparse.Namespace) -> dict:
    keywords = [flag[2:].replace("-", "_") for flag, _, _ in GENERATION_OPTIONS]  # argparse's dest names
    options = {key: getattr(args, key) for key in keywords} | {"do_sample": True if args.do_sample else None}
    return {key: value for key, value in options.items() if value is not None}


def run(args: argparse.Namespace) -> int:
    # Here, not at the top: the runtime loads numpy and onnxruntime, which `kiln --help` never waits for.
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
    next_hint(f"kiln validate {args.artifact} --model {source_of(args.artifact)}")
    return 0
