"""SD3 / SD3.5 export, generation and validation against diffusers' StableDiffusion3Pipeline.

Tiny seeded pipelines: "sd3.5-medium" (dual-attention layer, RMS qk-norm, T5) and "sd3" (no T5, as
diffusers allows). Images are generated at sizes other than the export's example, from the same
latents or seed as diffusers, and compared by PSNR.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TEXT_LENGTHS
from diffusers import StableDiffusion3Pipeline

from modelkiln import runtime
from modelkiln.cli import main
from modelkiln.errors import GenerationConfigError, NonFiniteOutputError, SourceModelError
from modelkiln.exporters.export import ExportConfig, export_model
from modelkiln.fixtures.tiny_diffusion import build_pipeline, save_tiny_lora
from modelkiln.manifest import read_manifest
from modelkiln.metrics import psnr

LENGTH = TEXT_LENGTHS["sd3.5-medium"]  # T5 tokens, as every test exporting this pipeline asks


@pytest.fixture(scope="module")
def sd35(tiny_diffusion):
    return tiny_diffusion("sd3.5-medium", max_sequence_length=LENGTH)


@pytest.fixture(scope="module")
def sd3(tiny_diffusion, tmp_path_factory):
    """(source, artifact, LoRA dir): SD3 exported without T5 (diffusers then conditions on zeros in its
    place) and with a random LoRA fused at scale 0.8."""
    lora = tmp_path_factory.mktemp("sd3-lora")
    save_tiny_lora(build_pipeline("sd3"), lora)
    return (*tiny_diffusion("sd3", without=("text_encoder_3",), lora=(f"{lora}:0.8",)), lora)


def _reference(source, **components):
    pipe = StableDiffusion3Pipeline.from_pretrained(source, dtype=torch.float32, **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _both(pipe, reference, prompt, **options):
    ours = pipe(prompt, output_type="np", **options).images
    if "seed" in options:
        options["generator"] = torch.Generator().manual_seed(options.pop("seed"))
    return ours, reference(prompt, output_type="np", **options).images


def test_manifest_declares_components_and_dynamic_axes(sd35):
    _, artifact = sd35
    manifest = read_manifest(artifact)
    assert list(manifest.components) == [
        "text_encoder",
        "text_encoder_2",
        "text_encoder_3",
        "transformer",
        "vae_decoder",
    ]
    transformer = {spec.name: spec.shape for spec in manifest.components["transformer"].inputs}
    assert transformer["hidden_states"] == ["batch", 4, "latent_height", "latent_width"]
    assert transformer["encoder_hidden_states"][:2] == ["batch", "text_sequence"]
    assert manifest.runtime["max_sequence_length"] == LENGTH and manifest.runtime["has_t5"]
    for folder in ("scheduler", "tokenizer", "tokenizer_2", "tokenizer_3"):
        assert (artifact / folder).is_dir()


@pytest.mark.parametrize("size", [(48, 80), (64, 32)])
def test_sd35_matches_diffusers_from_identical_latents(sd35, size):
    source, artifact = sd35
    pipe = runtime.load(artifact)
    height, width = size
    latents = torch.randn(1, 4, height // 2, width // 2, generator=torch.Generator().manual_seed(7))
    ours, theirs = _both(
        pipe, _reference(source), "a red cat", latents=latents, num_inference_steps=3,
        height=height, width=width, max_sequence_length=LENGTH,
    )  # fmt: skip
    assert ours.shape == (1, height, width, 3)
    assert psnr(ours, theirs) >= 40


def test_seed_guidance_negatives_and_copies_match_diffusers(sd35):
    source, artifact = sd35
    options = {
        "negative_prompt": ["blurry", "a red dog"],
        "num_images_per_prompt": 2,
        "num_inference_steps": 2,
        "guidance_scale": 5.0,
        "height": 32,
        "width": 48,
        "seed": 3,
        "max_sequence_length": LENGTH,
    }
    ours, theirs = _both(runtime.load(artifact), _reference(source), ["a red cat", "a dog"], **options)
    assert ours.shape == (4, 32, 48, 3)
    assert min(psnr(a, b) for a, b in zip(ours, theirs, strict=True)) >= 40
    assert psnr(ours[0], ours[1]) < 40  # copies of one prompt start from different noise


def test_validate_cli_records_psnr_and_fails_below_the_gate(sd35, capsys):
    source, artifact = sd35
    args = [
        "validate",
        str(artifact),
        "--model",
        str(source),
        "--steps",
        "2",
        "--height",
        "32",
        "--width",
        "48",
    ]
    assert main([*args, "--prompt", "a cat"]) == 0
    report = read_manifest(artifact).validation
    assert report["passed"] and set(report["components"]) == set(read_manifest(artifact).components)
    assert report["images"]["a cat"]["psnr"] >= 40 and report["images"]["a cat"]["ssim"] > 0.99
    assert main([*args, "--min-psnr", "1000"]) == 1
    assert "PSNR" in capsys.readouterr().err


def test_generate_cli_writes_the_seeded_image(sd35, tmp_path):
    _, artifact = sd35
    out = tmp_path / "cat.png"
    args = ["generate", str(artifact), "a red cat", "--steps", "2", "--height", "32", "--width", "48"]
    assert main([*args, "--seed", "5", "--out", str(out)]) == 0
    expected = runtime.load(artifact)("a red cat", num_inference_steps=2, height=32, width=48, seed=5).images[
        0
    ]
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(expected))


def test_nan_is_an_error_not_a_black_image(sd35):
    pipe = runtime.load(sd35[1])
    latents = torch.full((1, 4, 16, 16), float("nan"))
    with pytest.raises(NonFiniteOutputError, match=r"'transformer' produced NaN/Inf.*fp32 artifact"):
        pipe("a cat", latents=latents, num_inference_steps=1, height=32, width=32)


def test_sizes_the_model_cannot_take_are_refused(sd35):
    pipe = runtime.load(sd35[1])
    with pytest.raises(
        GenerationConfigError, match=r"height 50 is not a positive multiple of 4.*Use 48 or 52"
    ):
        pipe("a cat", height=50, width=32)
    with pytest.raises(
        GenerationConfigError,
        match=r"height 256 is larger than .*\(pos_embed_max_size 32 patches\) allows \(128 px per side\)\. Use 128",
    ):
        pipe("a cat", height=256, width=32)
    with pytest.raises(GenerationConfigError, match="seed or generator, not both"):
        pipe("a cat", seed=1, generator=torch.Generator())


def test_only_optional_components_can_be_left_out(sd3, tmp_path):
    with pytest.raises(
        SourceModelError, match=r"--without transformer.*Optional components: text_encoder_3, tokenizer_3"
    ):
        export_model(sd3[0], tmp_path / "x", ExportConfig(without=("transformer",)))


def test_sd3_without_t5_and_a_fused_lora_matches_diffusers_with_the_lora_loaded(sd3):
    source, artifact, lora = sd3
    manifest = read_manifest(artifact)
    assert "text_encoder_3" not in manifest.components and not manifest.runtime["has_t5"]
    assert not (artifact / "tokenizer_3").exists()
    assert manifest.source.lora[0]["scale"] == 0.8
    # diffusers without T5 conditions on zeros in its place; the LoRA is loaded unfused at 0.8.
    plain = _reference(source, text_encoder_3=None, tokenizer_3=None)
    size = {"num_inference_steps": 2, "height": 32, "width": 32}
    generator = torch.Generator().manual_seed(2)
    without_lora = plain("a red cat", output_type="np", generator=generator, **size).images
    plain.load_lora_weights(str(lora), adapter_name="style")
    plain.set_adapters(["style"], adapter_weights=[0.8])
    ours, theirs = _both(runtime.load(artifact), plain, "a red cat", seed=2, **size)
    assert psnr(ours[0], theirs[0]) >= 40
    assert psnr(ours[0], without_lora[0]) < psnr(ours[0], theirs[0]) - 20  # the LoRA is in the weights
