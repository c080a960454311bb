"""kiln build RECIPE.toml [--out DIR]: export, validate, quantize, bench; exit 1 on a failed gate."""

from __future__ import annotations

import argparse
from pathlib import Path

from modelkiln.cli.common import console, next_hint
from modelkiln.errors import ValidationFailedError

HELP = "build every artifact a recipe (TOML) declares, with gates"
LOADS_MODELS = True  # exports and validates PyTorch models: their libraries' progress bars are hidden


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe .toml file, or a shipped recipe name (shapes-captioner)")
    parser.add_argument(
        "--out", help="build folder (default build/<recipe name>); unchanged steps are cached"
    )


def run(args: argparse.Namespace) -> int:
    # Here, not at the top: the build steps load torch and onnx, which `kiln --help` never waits for.
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
    next_hint(f"less {out / 'summary.md'}")
    return 0
