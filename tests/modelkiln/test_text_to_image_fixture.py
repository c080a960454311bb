"""The shipped text-to-image fixture: diffusers loads it as saved, it is small and pickle-free, it exports
through the normal `kiln export` path, its artifact matches diffusers from identical latents, and the
images it draws show their prompts (read back by the shipped captioner)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import shapes_sd3_artifact
from PIL import Image

pytest.importorskip("diffusers")

from modelkiln import runtime
from modelkiln.demo import contact_sheet
from modelkiln.fixtures import TEXT_TO_IMAGE_DIR, shapes
from modelkiln.manifest import CALIBRATION_PROMPTS_NAME, read_manifest
from modelkiln.metrics import psnr
from modelkiln.quantize.calibration import calibration_prompts
from modelkiln.validation import DiffusionValidateConfig, validate_diffusion
from modelkiln.validation.prompt_accuracy import (
    PromptAccuracyConfig,
    pipeline_generate,
    prompt_sample,
    score,
    seeded_latents,
    shipped_reader,
)

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}
SAMPLE = PromptAccuracyConfig(prompts=12, batch=12)  # one of every colour, size, shape and background


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return shapes_sd3_artifact(tmp_path_factory)


@pytest.fixture(scope="module")
def eager():
    import diffusers

    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(TEXT_TO_IMAGE_DIR)  # nothing passed: as saved
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_fixture_is_small_pickle_free_and_says_how_it_was_made():
    files = [path for path in TEXT_TO_IMAGE_DIR.rglob("*") if path.is_file()]
    assert sum(path.stat().st_size for path in files) <= 10 * 1024 * 1024
    assert not {path.suffix for path in files} & PICKLE_SUFFIXES
    record = json.loads((TEXT_TO_IMAGE_DIR / "training.json").read_text())
    assert record["command"].startswith("python -m modelkiln.fixtures.train_text_to_image")
    # The shipped run reads back 81.2% of prompts exactly (shape 89%, size and colour 93.5%, background
    # 100%); these bars catch a fixture replaced by a weaker, untrained or broken one.
    accuracy = record["prompt_accuracy"]
    assert accuracy["prompts"] == 138 and accuracy["exact"] >= 0.8, accuracy
    assert min(accuracy["attributes"].values()) >= 0.88, accuracy
    assert record["accepted"] is True
    assert record["resumed_from"]["resumed_from"]["prompt_accuracy"]["exact"] < accuracy["exact"]  # the chain


def test_diffusers_loads_the_real_sd3_classes(eager):
    assert type(eager.transformer).__name__ == "SD3Transformer2DModel"
    assert type(eager.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert (
        type(eager.text_encoder).__name__
        == type(eager.text_encoder_2).__name__
        == "CLIPTextModelWithProjection"
    )
    assert eager.tokenizer("a small red circle on a white background")["input_ids"][1:-1] == [
        eager.tokenizer.get_vocab()[word]
        for word in ["a", "small", "red", "circle", "on", "a", "white", "background"]
    ]


def test_artifact_matches_diffusers_from_identical_latents(artifact):
    prompts = ("a small red circle on a white background", "a large blue triangle on a gray background")
    config = DiffusionValidateConfig(steps=4, height=48, width=48, prompts=prompts, update_manifest=False)
    report = validate_diffusion(artifact, str(TEXT_TO_IMAGE_DIR), config)
    assert report["passed"], report


def test_export_carries_the_fixtures_calibration_prompts_which_static_quantization_takes(artifact, tmp_path):
    assert (artifact / CALIBRATION_PROMPTS_NAME).read_bytes() == (
        TEXT_TO_IMAGE_DIR / CALIBRATION_PROMPTS_NAME
    ).read_bytes()
    assert CALIBRATION_PROMPTS_NAME in read_manifest(artifact).files  # listed and hash-checked
    captions = {attributes.caption: attributes for attributes in shapes.every_caption()}
    default, description = calibration_prompts(None, 8, artifact)  # `kiln quantize`'s default count
    assert description == f"8 prompts from the artifact's {CALIBRATION_PROMPTS_NAME}"
    chosen = [captions[prompt] for prompt in default]  # KeyError: a word the tokenizer lacks
    for name in ("size", "colour", "shape", "background"):  # every value of every attribute
        assert {getattr(a, name) for a in chosen} == {getattr(a, name) for a in captions.values()}, name
    assert len(set(calibration_prompts(None, 16, artifact)[0])) == 16
    mine = tmp_path / "mine.txt"
    mine.write_text("a small red circle on a black background\n")
    assert calibration_prompts(str(mine), 8, artifact)[0] == ["a small red circle on a black background"]


def test_onnx_draws_the_same_images_as_diffusers_and_they_show_their_prompts(artifact, eager):
    read = shipped_reader()
    sample = prompt_sample(SAMPLE.prompts)
    prompts = [a.caption for a in sample]
    latents = np.stack([seeded_latents(SAMPLE.seed + i, SAMPLE.latent_shape) for i in range(len(prompts))])
    onnx_images = pipeline_generate(runtime.load(artifact), SAMPLE)(prompts, latents)
    eager_images = pipeline_generate(eager, SAMPLE)(prompts, latents)
    worst = min(
        psnr(np.asarray(a) / 255.0, np.asarray(b) / 255.0)
        for a, b in zip(onnx_images, eager_images, strict=True)
    )
    assert worst >= 40, worst
    captions = read(onnx_images)
    assert captions == read(eager_images)
    # The images measure_pipeline would draw (same prompts, same seeded latents), scored without redrawing.
    report = score(sample, captions)
    # On these 12 prompts the shipped fixture reads back 9 exactly (three small shapes on black). A broken
    # pipeline (wrong latents, scaling, text conditioning) loses backgrounds and colours first; the bars
    # leave room for an int8-sized difference in two images, not for a broken pipeline.
    assert report["attributes"]["background"] >= 0.9 and report["attributes"]["colour"] >= 0.75, report
    assert report["exact"] >= 0.6, report["misses"]


def test_contact_sheet_shows_every_image_with_its_prompt():
    images = [Image.new("RGB", (48, 48), colour) for colour in ("red", "blue")]
    sheet = contact_sheet(images, ["a", "b"], ["a", "x"])
    assert sheet.height > 48 * 3 and sheet.width >= 2 * 48 * 3
    pixels = np.asarray(sheet)
    assert (pixels[:144] == (255, 0, 0)).all(axis=-1).any() and (pixels[:144] == (0, 0, 255)).all(
        axis=-1
    ).any()


def test_quantize_reports_prompt_accuracy_of_variant_and_parent_and_gates_on_it(artifact, tmp_path):
    from modelkiln.errors import ValidationFailedError
    from modelkiln.quantize.quantize import QuantizeConfig, quantize_artifact

    fast = {"num_prompts": 1, "quality_steps": 1, "image_size": 48, "prompt_accuracy_prompts": 4}
    quality = quantize_artifact(
        artifact, tmp_path / "v", QuantizeConfig("int8-dynamic", **fast)
    ).quantization["quality"]
    for prefix in ("prompt_accuracy", "parent_prompt_accuracy"):
        figures = [quality[prefix]] + [
            quality[f"{prefix}_{name}"] for name in ("size", "colour", "shape", "background")
        ]
        assert all(0.0 <= value <= 1.0 for value in figures), quality
    assert quality["prompt_accuracy_weakest"] in ("size", "colour", "shape", "background")
    # A gate no 4-prompt sample can pass above its own figure fails, naming the figure and the weakest attribute.
    limit = min(1.0, quality["prompt_accuracy"] + 0.25)
    if limit > quality["prompt_accuracy"]:
        with pytest.raises(
            ValidationFailedError, match=r"prompt accuracy .* < --min-prompt-accuracy .*weakest"
        ):
            quantize_artifact(
                artifact, tmp_path / "w", QuantizeConfig("int8-dynamic", min_prompt_accuracy=limit, **fast)
            )
        assert not (tmp_path / "w").exists()
