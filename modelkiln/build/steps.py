"""The steps of a build: export, validation against PyTorch, quantized variants with gates, benchmark.

The steps call the generic export, validate, quantize and bench APIs only; nothing here depends on
the model family.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from modelkiln.build.cache import artifact_intact, run_step, step_key, to_json, write_text
from modelkiln.build.directory import STEPS_DIR, Build
from modelkiln.build.recipe import EXPORT_NAME, ExportRecipe, RecipeError, VariantRecipe, is_figure
from modelkiln.configs import same_named
from modelkiln.errors import ValidationFailedError
from modelkiln.exporters.diffusion import Lora
from modelkiln.exporters.export import ExportConfig, export_model
from modelkiln.manifest import artifact_hash, folder_sha256, read_manifest, sha256_file, write_manifest
from modelkiln.quantize.quantize import QuantizeConfig, quantize_artifact
from modelkiln.validation import (
    DiffusionValidateConfig,
    ValidateConfig,
    validate_artifact,
    validate_diffusion,
)


def export_step(build: Build) -> dict:
    source, export = build.recipe.source, build.recipe.export
    # Every [export] key is the ExportConfig field of the same name: a new export option needs only a
    # new ExportRecipe field.
    config = same_named(
        ExportConfig,
        export,
        family=source.family,
        allow_pickle=source.allow_pickle,
        trust_remote_code=source.trust_remote_code,
        overwrite=True,  # the build owns its folder; staging keeps the old one until the new one is done
    )

    def work() -> dict:
        manifest = export_model(
            source.model, build.export_dir, config, log=lambda m: build.log(f"export: {m}")
        )
        return _artifact_record(manifest)

    key = step_key(
        build, "export", {**asdict(source), **asdict(export), "lora_sha256": _lora_hashes(export)}, {}
    )
    return run_step(build, "export", key, work, lambda result: artifact_intact(build, result))


def _lora_hashes(export: ExportRecipe) -> list[str]:
    """Content hashes of the LoRAs: a retrained LoRA at the same path must re-export."""
    return [sha256_file(Lora.parse(text).weights_file()) for text in export.lora]


def _artifact_record(manifest) -> dict:
    return {
        "artifact": f"artifacts/{EXPORT_NAME}",
        "artifact_sha256": artifact_hash(manifest),
        "family": manifest.family,
        "task": manifest.task,
        "precision": manifest.precision,
    }


def _validate_captions(build: Build) -> dict:
    settings = build.recipe.validate
    # The [validate] keys a captioner reads are its ValidateConfig fields of the same name.
    allow_pickle = build.recipe.source.allow_pickle
    config = same_named(
        ValidateConfig, settings, prompts=(None, *settings.prompts), allow_pickle=allow_pickle
    )
    return validate_artifact(build.export_dir, build.recipe.source.model, config)


def _validate_images(build: Build) -> dict:
    settings = build.recipe.validate
    # The [validate] keys a text-to-image export reads are its DiffusionValidateConfig fields of the
    # same name; an empty prompts list keeps the default prompts.
    config = same_named(
        DiffusionValidateConfig,
        settings,
        prompts=settings.prompts or DiffusionValidateConfig.prompts,
        allow_pickle=build.recipe.source.allow_pickle,
    )
    return validate_diffusion(build.export_dir, build.recipe.source.model, config)


# Task of the export (the registry family's) -> how the build validates it: a report with "passed",
# also recorded in the export's manifest. A new task plugs in its validator here.
VALIDATORS: dict[str, Callable[[Build], dict]] = {
    "image-to-text": _validate_captions,
    "text-to-image": _validate_images,
}


def validate_step(build: Build, export: dict) -> dict | None:
    """Validate the export against PyTorch; the report also lands in the export's manifest."""
    settings = build.recipe.validate
    if not settings.enabled:
        _clear_validation(build)
        return None
    validator = VALIDATORS.get(export["task"])
    if validator is None:
        raise RecipeError(
            f"{build.recipe.path}: kiln build cannot validate {export['task']} artifacts yet (it validates "
            f"{', '.join(VALIDATORS)}). Set enabled = false in section validate, and use `kiln validate`."
        )
    report_path = build.out / "reports" / "validation.json"

    def work() -> dict:
        report = validator(build)
        write_text(report_path, to_json(report))
        return {"passed": report["passed"], "report": "reports/validation.json"}

    def intact(result: dict) -> bool:
        # Re-exporting rewrites the manifest without the report, even when the graphs come out the same.
        recorded = json.loads(report_path.read_text()) if report_path.is_file() else None
        return recorded is not None and read_manifest(build.export_dir).validation == recorded

    config_json = {**asdict(settings), "images_sha256": folder_sha256(settings.images)}
    key = step_key(build, "validate", config_json, {"export": export["artifact_sha256"]})
    return run_step(build, "validate", key, work, intact)


def _clear_validation(build: Build) -> None:
    # A clean build with validation off has none in its manifest; an earlier run's must not linger.
    manifest = read_manifest(build.export_dir)
    if manifest.validation is not None:
        write_manifest(build.export_dir, manifest.with_validation(None))


def variant_step(build: Build, export: dict, variant: VariantRecipe) -> dict:
    """Quantize one variant (cached), then check its gates (every run: they are cheap and not cached)."""
    step = f"variant-{variant.name}"
    try:
        result = run_step(
            build,
            step,
            _variant_key(build, export, variant),
            lambda: _quantize(build, variant),
            lambda result: artifact_intact(build, result),
        )
    except ValidationFailedError as exc:  # the quantizer's own gate (new empty captions): nothing written
        build.statuses[step] = "failed"
        result = {"scheme": variant.scheme, "error": str(exc)}
    gates = _gate_rows(variant, result.get("quality"), build.recipe.path)
    result = {**result, "gates": gates, "passed": "error" not in result and all(g["passed"] for g in gates)}
    if not result["passed"]:
        # Below the gate nothing is left that looks like a usable artifact, as with `kiln quantize`.
        shutil.rmtree(build.out / "artifacts" / variant.name, ignore_errors=True)
        (build.out / STEPS_DIR / f"{step}.json").unlink(missing_ok=True)
    write_text(build.out / "reports" / f"quantize-{variant.name}.json", to_json(result))
    return {"name": variant.name, **result}


def _variant_key(build: Build, export: dict, variant: VariantRecipe) -> str:
    # The recipe's fields (its quality-check settings decide the recorded figures), then what decides the
    # weights as the quantizer records it: resolved options, calibration inputs by content.
    config = {**asdict(variant), **_quantize_config(variant).settings()}
    del config["gates"]  # checked on every run against the recorded figures: a new limit re-quantizes nothing
    return step_key(build, f"variant-{variant.name}", config, {"export": export["artifact_sha256"]})


def _quantize_config(variant: VariantRecipe) -> QuantizeConfig:
    # A variant's keys are its QuantizeConfig fields of the same name (the gates are checked here).
    return same_named(QuantizeConfig, variant, options=dict(variant.options), overwrite=True)


def _quantize(build: Build, variant: VariantRecipe) -> dict:
    config = _quantize_config(variant)
    out = build.out / "artifacts" / variant.name
    log = lambda message: build.log(f"variant-{variant.name}: {message}")  # noqa: E731
    manifest = quantize_artifact(build.export_dir, out, config, log=log)
    return {
        "artifact": f"artifacts/{variant.name}",
        "artifact_sha256": artifact_hash(manifest),
        "scheme": variant.scheme,
        "precision": manifest.precision,
        "quality": manifest.quantization["quality"],
    }


def _gate_rows(variant: VariantRecipe, quality: dict | None, path: Path) -> list[dict]:
    """Each gate against the variant's quality figures; a gate on a figure it lacks is a recipe error."""
    if quality is None:
        return []
    rows = []
    for gate, limit in variant.gates.items():
        bound, _, figure = gate.partition("_")
        value = quality.get(figure)
        if not is_figure(value):
            figures = ", ".join(k for k, v in quality.items() if is_figure(v))
            raise RecipeError(
                f"{path}: variant {variant.name} gate {gate}: its quality report has no figure {figure!r}. "
                f"Gate one of: {figures}."
            )
        passed = value >= limit if bound == "min" else value <= limit
        rows.append({"gate": gate, "limit": limit, "value": value, "passed": passed})
    return rows


def bench_step(build: Build, export: dict, variants: list[dict]) -> dict | None:
    """Benchmark the export and every variant that passed its gates, against PyTorch eager."""
    settings = build.recipe.bench
    if not settings.enabled:
        return None
    targets = [export] + [v for v in variants if v["passed"]]
    report_path = build.out / "reports" / "bench" / "report.json"

    def work() -> dict:
        report, p50_s = _run_bench(build, [build.out / t["artifact"] for t in targets])
        by_path = {str(build.out / t["artifact"]): t["artifact"] for t in targets}
        eager = p50_s(report["variants"][0])
        rows = [
            {
                "name": row["name"],
                "artifact": by_path.get(row["path"]),
                "p50_ms": round(p50_s(row) * 1e3, 2),
                "speedup_vs_eager": round(eager / p50_s(row), 3),
            }
            for row in report["variants"]
        ]
        return {"report": "reports/bench/report.md", "report_sha256": sha256_file(report_path), "rows": rows}

    def intact(result: dict) -> bool:
        return report_path.is_file() and sha256_file(report_path) == result["report_sha256"]

    parents = {t["artifact"]: t["artifact_sha256"] for t in targets}
    return run_step(build, "bench", step_key(build, "bench", asdict(settings), parents), work, intact)


def _run_bench(build: Build, artifacts: list[Path]) -> tuple[dict, Callable[[dict], float]]:
    """The benchmark of the export's task (captioning or text-to-image) over ``artifacts``: its report,
    and how to read a row's median seconds per input."""
    # Imported here, not at the top: the benchmark tasks load onnx and onnxruntime, which a build
    # without [bench] never needs.
    from modelkiln.benchmarks.tasks import BenchConfig, TaskOptions, get_task

    settings = build.recipe.bench
    task = get_task(read_manifest(artifacts[0]).task)
    # threads, repeats, warmup, measure_rss and plots are BenchConfig fields of the same name.
    shared = same_named(
        BenchConfig,
        settings,
        out=build.out / "reports" / "bench",
        model=build.recipe.source.model,
        variants=tuple(str(path) for path in artifacts),
        progress=False,
        command=f"kiln build {build.recipe.path.name}",
    )
    options = TaskOptions(per_pass=settings.images, max_new_tokens=settings.max_new_tokens)
    report = task.run(task.configure(shared, options), lambda message: build.log(f"bench: {message}"))
    return report, task.p50_s
