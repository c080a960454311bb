"""`kiln build RECIPE.toml`: one declarative recipe in; artifacts, their reports and a summary out.

A recipe names the source model, the export options, how strictly to validate against PyTorch, the
quantized variants with their quality gates, and whether to benchmark. ``run_build`` runs the steps::

    recipe = load_recipe("recipes/vit-gpt2.toml")       # RecipeError (exit 2) naming a wrong key
    summary = run_build(recipe, Path("build/vit-gpt2"))
    summary["passed"]                                   # False: validation or a quality gate failed

The build directory holds ``artifacts/fp32`` (the export) and ``artifacts/<variant>``, ``reports/``
(validation, one quality report per variant, the benchmark), ``summary.json``, ``summary.md`` and
``.kiln/steps`` (the step cache). Each step is keyed by a hash of its inputs (its settings, the parent
artifact's hash, the source files' hash, the tool versions): an unchanged step logs "cached" and
touches nothing. Artifacts hold no timestamps or build-directory paths, so two clean builds of one
recipe are byte-identical; benchmark timings are measurements and naturally differ.

The steps call the generic export, validate, quantize and bench APIs only; nothing here depends on
the model family.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from modelkiln.build.cache import to_json, write_text
from modelkiln.build.directory import Build, default_out, start_build
from modelkiln.build.recipe import RECIPES_DIR, Recipe, RecipeError, find_recipe, load_recipe
from modelkiln.build.steps import bench_step, export_step, validate_step, variant_step
from modelkiln.build.summary import markdown, summarise

__all__ = [
    "RECIPES_DIR",
    "Build",
    "Recipe",
    "RecipeError",
    "default_out",
    "find_recipe",
    "load_recipe",
    "run_build",
]


def run_build(
    recipe: Recipe, out: str | os.PathLike, log: Callable[[str], None] = lambda message: None
) -> dict:
    """Build every artifact of ``recipe`` into ``out``; return the summary (also summary.json/.md there)."""
    # 1. Claim the build folder, hash the source, drop what the recipe no longer makes.
    build = start_build(recipe, Path(out), log)
    # 2. Export the fp32 artifact and validate it against PyTorch.
    export = export_step(build)
    validation = validate_step(build, export)
    # 3. Make every variant from the export and check its quality gates.
    variants = [variant_step(build, export, variant) for variant in recipe.variants]
    # 4. Benchmark what passed.
    bench = bench_step(build, export, variants)
    # 5. Summarise for people (summary.md) and machines (summary.json).
    summary = summarise(build, export, validation, variants, bench)
    write_text(build.out / "summary.json", to_json(summary))
    write_text(build.out / "summary.md", markdown(build, summary))
    return summary
