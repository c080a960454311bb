"""`kiln build`: a recipe builds end to end, re-runs from cache, rebuilds byte-identically, and fails
on a failed gate (exit 1) or a malformed recipe (exit 2, naming the key)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from modelkiln.build import RECIPES_DIR, RecipeError, load_recipe, run_build
from modelkiln.cli import main
from modelkiln.fixtures import CAPTIONER_DIR, shapes
from modelkiln.manifest import extra_files, read_manifest, verify_files
from modelkiln.registry import FAMILIES

# A tiny recipe: external data, a calibrated scheme reading a folder beside the recipe, small counts.
RECIPE = """
[source]
model = "{model}"

[export]
external_data = true

[validate]
beams = [1]
num_images = 2
max_new_tokens = 6
{validate_extra}

[[variants]]
name = "int8"
scheme = "int8-dynamic"
num_images = 2
gates = {{ {int8_gates} }}

[[variants]]
name = "int8-static"
scheme = "int8-static"
calibration_images = "calib"
num_calibration = 2
num_images = 2

[[variants]]
name = "fp16"
scheme = "fp16"
num_images = 2
"""
VARIANTS = ["int8", "int8-static", "fp16"]
STEPS = ["export", "validate", *(f"variant-{name}" for name in VARIANTS)]


def write_recipe(
    folder: Path, name: str, source: Path, int8_gates="max_new_empty_captions = 0", extra=""
) -> Path:
    # The source as a path relative to the recipe: it must resolve against the recipe, not the cwd.
    model = os.path.relpath(source, folder)
    text = RECIPE.format(model=model, int8_gates=int8_gates, validate_extra=extra)
    path = folder / name
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def recipe(small_source, tmp_path_factory):
    folder = tmp_path_factory.mktemp("recipe")
    (folder / "calib").mkdir()
    for seed in range(2):
        shapes.draw(seed)[0].save(folder / "calib" / f"{seed}.png")
    return write_recipe(folder, "tiny.toml", small_source)


@pytest.fixture(scope="module")
def built(recipe, tmp_path_factory):
    """(build folder, summary) of the first, clean build."""
    out = tmp_path_factory.mktemp("build") / "tiny"
    return out, run_build(load_recipe(recipe), out)


def file_hashes(out: Path) -> dict[str, str]:
    """Everything but the summaries (their step statuses say built or cached)."""
    return {
        p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*"))
        if p.is_file() and not p.name.startswith("summary.")
    }


def test_build_writes_artifacts_reports_and_a_summary_row_per_variant(built):
    out, summary = built
    assert summary["passed"] and summary["failures"] == []
    assert json.loads((out / "summary.json").read_text()) == summary
    rows = {row["name"]: row for row in summary["artifacts"]}
    assert list(rows) == ["fp32", *VARIANTS]
    markdown = (out / "summary.md").read_text()
    for name in rows:
        assert f"| {name} |" in markdown
        artifact = out / "artifacts" / name
        assert (
            verify_files(artifact, read_manifest(artifact)) == []
            and extra_files(artifact, read_manifest(artifact)) == []
        )
    assert (out / "artifacts" / "fp32" / "decoder.onnx.data").is_file()  # [export] external_data
    assert read_manifest(out / "artifacts" / "fp32").validation["passed"]
    assert json.loads((out / "reports" / "validation.json").read_text())["passed"]
    int8 = read_manifest(out / "artifacts" / "int8")
    assert int8.parent["path"] == "../fp32"  # no build-folder path in a manifest
    assert rows["int8"]["gates"][0]["gate"] == "max_new_empty_captions" and rows["int8"]["gates"][0]["passed"]
    assert (
        "calib" in read_manifest(out / "artifacts" / "int8-static").quantization["calibration"]["description"]
    )
    assert summary["steps"] == dict.fromkeys(STEPS, "built")


def test_unchanged_rerun_is_cached_and_touches_no_file(built, recipe, capsys):
    out, _ = built
    before = {path: os.stat(out / path).st_mtime_ns for path in file_hashes(out)}
    assert main(["build", str(recipe), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    for step in STEPS:
        assert f"{step}: cached" in err
    assert json.loads((out / "summary.json").read_text())["steps"] == dict.fromkeys(STEPS, "cached")
    assert {path: os.stat(out / path).st_mtime_ns for path in file_hashes(out)} == before


def test_two_clean_builds_in_different_folders_are_byte_identical(built, recipe, tmp_path):
    out, summary = built
    again = run_build(load_recipe(recipe), tmp_path / "elsewhere" / "tiny")
    assert file_hashes(tmp_path / "elsewhere" / "tiny") == file_hashes(out)
    assert {**again, "steps": {}} == {**summary, "steps": {}}


def test_impossible_gate_fails_the_build_with_exit_1_and_keeps_no_variant(built, recipe, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(built[0], out)  # a moved build folder keeps its cache: only the gate is re-checked
    strict = write_recipe(recipe.parent, "strict.toml", built[1]["source"]["model"], "min_agreement = 1.5")
    assert main(["build", str(strict), "--out", str(out)]) == 1
    assert "min_agreement 1.5 not met" in capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert not summary["passed"] and summary["steps"] == dict.fromkeys(STEPS, "cached")
    assert [row["name"] for row in summary["artifacts"] if not row["passed"]] == ["int8"]
    assert not (out / "artifacts" / "int8").exists() and (out / "artifacts" / "fp16").is_dir()
    assert not json.loads((out / "reports" / "quantize-int8.json").read_text())["passed"]


def test_failed_validation_fails_the_build(built, recipe, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(built[0], out)
    exact = write_recipe(recipe.parent, "exact.toml", built[1]["source"]["model"], extra="atol = 0\nrtol = 0")
    assert main(["build", str(exact), "--out", str(out)]) == 1
    assert "validation of fp32 against PyTorch failed" in capsys.readouterr().err
    assert not read_manifest(out / "artifacts" / "fp32").validation["passed"]


def test_a_variant_dropped_from_the_recipe_is_removed(built, recipe, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(built[0], out)
    fewer = recipe.parent / "fewer.toml"
    fewer.write_text(recipe.read_text().split('[[variants]]\nname = "fp16"')[0])
    summary = run_build(load_recipe(fewer), out)
    assert [row["name"] for row in summary["artifacts"]] == ["fp32", "int8", "int8-static"]
    assert (
        not (out / "artifacts" / "fp16").exists()
        and not (out / ".kiln" / "steps" / "variant-fp16.json").exists()
    )


def test_a_folder_that_is_not_a_build_is_refused(recipe, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["build", str(recipe), "--out", str(tmp_path)]) == 2
    assert "not a kiln build directory" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


BAD_RECIPES = {
    "[export]\nopsett = 18": r"unknown key 'opsett' in section export\. Valid keys: opset, external_data, lora,",
    "[bnech]\nenabled = true": r"unknown top-level key 'bnech'\. Valid keys: source, export, validate, variants",
    '[[variants]]\nname = "a"\nschem = "fp16"': r"unknown key 'schem' in variants entry #1\. Valid keys: name, scheme",
    "[bench]\nrepeats = true": r"repeats in section bench must be an integer, got true",
    "[validate]\nbeams = [0]": r"beams in section validate must be at least 1, got 0",
    '[export]\ntarget = "trt"': r"target in section export: unknown target 'trt'\. Valid targets: onnxruntime, portable",
    '[[variants]]\nname = "a"\nscheme = "int4-weight"\noptions = { block_size = "64" }': r"option block_size takes an integer",
    '[[variants]]\nname = "a"\nscheme = "int8"': r"unknown scheme 'int8'\. Valid schemes: int8-dynamic",
    '[[variants]]\nname = "a"\nscheme = "fp16"\ngates = { agreement = 1 }': r"gate 'agreement' is neither min_",
    '[[variants]]\nname = "fp32"\nscheme = "fp16"': r"not 'fp32' \(the export's folder\)",
}


@pytest.mark.parametrize(("body", "message"), BAD_RECIPES.items(), ids=range(len(BAD_RECIPES)))
def test_a_malformed_recipe_names_the_wrong_key_and_the_valid_ones(tmp_path, body, message):
    path = tmp_path / "bad.toml"
    path.write_text(f'[source]\nmodel = "org/model"\n{body}\n')
    with pytest.raises(RecipeError, match=message):
        load_recipe(path)


def test_a_malformed_recipe_exits_2_before_any_work(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text('[source]\nmodel = "org/model"\n[export]\nopsett = 18\n')
    assert main(["build", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "unknown key 'opsett'" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_shipped_recipes_parse_and_the_fixture_recipe_builds_the_shipped_captioner():
    recipes = {path.stem: load_recipe(path) for path in sorted(RECIPES_DIR.glob("*.toml"))}
    assert {*FAMILIES, "shapes-captioner"} <= set(recipes)  # an example recipe for every family
    assert Path(recipes["shapes-captioner"].source.model) == CAPTIONER_DIR.resolve()
    assert load_recipe("shapes-captioner") == recipes["shapes-captioner"]  # shipped recipes by name
    workflow = (RECIPES_DIR / "github-ci.yml").read_text()
    assert "kiln build" in workflow and "actions/upload-artifact" in workflow


def test_a_diffusion_recipe_benchmarks_the_text_to_image_task(tmp_path):
    """[bench] on a diffusion source runs the text-to-image benchmark, not the captioner's."""
    from modelkiln.benchmarks.text_to_image.presets import build_diffusion_preset

    source = build_diffusion_preset("tiny", tmp_path / "presets")
    recipe = tmp_path / "sd3.toml"
    recipe.write_text(
        f'[source]\nmodel = "{source}"\n\n[validate]\nenabled = false\n\n'
        "[bench]\nenabled = true\nrepeats = 1\nwarmup = 0\nimages = 1\nmeasure_rss = false\nplots = false\n"
    )
    out = tmp_path / "build"
    summary = run_build(load_recipe(recipe), out)
    assert summary["passed"] and summary["steps"]["bench"] == "built"
    report = json.loads((out / "reports" / "bench" / "report.json").read_text())
    assert report["task"] == "text-to-image" and report["family"] == "sd3"
    assert [row["name"] for row in report["variants"]] == ["pytorch-eager", "onnx-fp32"]
    assert report["settings"]["prompts"] == 1 and report["variants"][1]["latency"]["pipeline"]["count"] == 1
    rows = summary["bench"]["rows"]
    assert [row["artifact"] for row in rows] == [None, "artifacts/fp32"] and rows[1]["p50_ms"] > 0
