"""kiln verify DIR [--json]: every file of an artifact against its sha256 in the manifest."""

from __future__ import annotations

import argparse

from rich.markup import escape

from modelkiln.cli.common import console, next_hint, print_json
from modelkiln.errors import ValidationFailedError

HELP = "check every file's hash against the manifest"
LOADS_MODELS = False  # hashes files: works in the runtime-only install


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifact")
    parser.add_argument("--json", action="store_true", help="print the problems found as JSON")


def run(args: argparse.Namespace) -> int:
    # Here, not at the top: the manifest module (hashing, graph confinement) is not needed to build the
    # parser, and `kiln --help` should not wait for it.
    from modelkiln.manifest import extra_files, read_manifest, verify_files

    manifest = read_manifest(args.artifact)
    problems = verify_files(args.artifact, manifest)  # the files the runtime may open; refuses escapes
    extras = extra_files(args.artifact, manifest)
    if args.json:
        summary = {"artifact": str(args.artifact), "files": len(manifest.files), "problems": problems}
        print_json({**summary, "extra": extras})
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
    next_hint(f"kiln caption {args.artifact} IMAGE")
    return 0
