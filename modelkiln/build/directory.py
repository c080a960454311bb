"""The build directory: claimed, pruned of what the recipe no longer makes, and the source it hashes.

It holds ``artifacts/fp32`` (the export) and ``artifacts/<variant>``, ``reports/``, ``summary.json``,
``summary.md`` and ``.kiln/steps`` (the step cache).
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from modelkiln.build.recipe import EXPORT_NAME, Recipe
from modelkiln.errors import KilnError
from modelkiln.exporters.export import tool_versions
from modelkiln.exporters.source import SIDE_FILES, resolve_source
from modelkiln.manifest import sha256_file

STEPS_DIR = Path(".kiln") / "steps"  # one JSON record per step: its key and its result


@dataclass(frozen=True)
class Build:
    """One run of a recipe: where it writes and what every step key shares."""

    recipe: Recipe  # what to build
    out: Path  # build directory (absolute)
    source_sha256: str  # hash of the source's weight and side files (config, tokenizer, processor)
    weights_sha256: str  # the source weights' hash, as manifests record it
    tools: dict[str, str]  # library versions; a new version re-runs every step
    log: Callable[[str], None]  # progress lines
    statuses: dict[str, str] = field(default_factory=dict)  # step id -> "built" or "cached", in run order

    @property
    def export_dir(self) -> Path:
        return self.out / "artifacts" / EXPORT_NAME


def default_out(recipe: Recipe) -> Path:
    """Where `kiln build` writes without --out: build/<recipe name> in the current folder."""
    return Path("build") / recipe.path.stem


def _claim(out: Path) -> None:
    """Refuse to write into a folder that is neither empty nor an earlier build (its files would be pruned)."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / STEPS_DIR).is_dir())):
        raise KilnError(
            f"{out} exists and is not a kiln build directory. Choose another --out (kiln build owns it "
            "and removes outputs the recipe no longer has)."
        )
    (out / STEPS_DIR).mkdir(parents=True, exist_ok=True)


def _fingerprint(source) -> str:
    """sha256 over the source's weight and side files: a changed tokenizer re-exports too."""
    side = sorted({p.relative_to(source.path).as_posix() for g in SIDE_FILES for p in source.path.rglob(g)})
    digest = hashlib.sha256(source.weights_sha256.encode())
    for name in side:
        digest.update(f"{name}\0{sha256_file(source.path / name)}\n".encode())
    return digest.hexdigest()


def start_build(recipe: Recipe, out: Path, log: Callable[[str], None]) -> Build:
    log(f"hashing the source {recipe.source.model}")
    source = resolve_source(recipe.source.model, allow_pickle=recipe.source.allow_pickle)
    out = out.absolute()
    _claim(out)  # after the source resolved, so a mistyped hub id leaves no empty build folder
    weights = source.weights_sha256
    build = Build(recipe, out, _fingerprint(source), weights, tool_versions(), log)
    _prune(build)
    return build


def _expected(build: Build) -> set[str]:
    """Every top-level entry of artifacts/, reports/ and .kiln/steps this recipe produces."""
    recipe = build.recipe
    names = [EXPORT_NAME, *(v.name for v in recipe.variants)]
    expected = {f"artifacts/{name}" for name in names}
    expected |= {f"reports/quantize-{v.name}.json" for v in recipe.variants}
    steps = ["export", *(f"variant-{v.name}" for v in recipe.variants)]
    if recipe.validate.enabled:
        expected.add("reports/validation.json")
        steps.append("validate")
    if recipe.bench.enabled:
        expected.add("reports/bench")
        steps.append("bench")
    return expected | {(STEPS_DIR / f"{step}.json").as_posix() for step in steps}


def _prune(build: Build) -> None:
    """Remove what the recipe no longer makes (a dropped variant, an interrupted export's staging folder)."""
    expected = _expected(build)
    for folder in ("artifacts", "reports", STEPS_DIR.as_posix()):
        for entry in sorted((build.out / folder).glob("*")) + sorted((build.out / folder).glob(".*")):
            if entry.relative_to(build.out).as_posix() not in expected:
                build.log(f"removing {entry.relative_to(build.out)} (not in the recipe any more)")
                if entry.is_dir():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
