"""FLUX.1 (dev and schnell): export -> manifest -> runtime images vs diffusers' FluxPipeline, LoRA fusing.

Each tiny pipeline is exported once per module (an export takes about a minute here); every test
reuses those artifacts, at image sizes and text lengths other than the export's examples.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TEXT_LENGTHS
from diffusers import FluxPipeline

from modelkiln import runtime
from modelkiln.errors import GenerationConfigError, NonFiniteOutputError
from modelkiln.exporters import flux
from modelkiln.exporters.export import ExportConfig, export_model
from modelkiln.exporters.source import resolve_source
from modelkiln.exporters.targets import get_target
from modelkiln.fixtures.tiny_diffusion import save_tiny_lora
from modelkiln.manifest import read_manifest
from modelkiln.metrics import psnr
from modelkiln.registry import get_family

TEXT_LENGTH = TEXT_LENGTHS["flux-dev"]  # T5 length of both exports (diffusers' default is 512)
# 40x24 px -> 20x12 latents -> 10x6 patches: not the exporter's 4x6-patch example.
SIZE = {"height": 40, "width": 24}
STEPS = 3


def _export(name: str, tiny_diffusion):
    """(diffusers pipeline, source dir, artifact dir) for one tiny Flux variant, exported once per session."""
    source, artifact = tiny_diffusion(name, max_sequence_length=TEXT_LENGTH)
    pipe = FluxPipeline.from_pretrained(source, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe, source, artifact


@pytest.fixture(scope="module")
def dev(tiny_diffusion):
    return _export("flux-dev", tiny_diffusion)


@pytest.fixture(scope="module")
def schnell(tiny_diffusion):
    return _export("flux-schnell", tiny_diffusion)


@pytest.fixture(scope="module", params=["flux-dev", "flux-schnell"])
def exported(request):
    """Each variant's (pipeline, source, artifact), for the tests both must pass."""
    return request.getfixturevalue(request.param.removeprefix("flux-"))


@pytest.fixture(scope="module")
def dev_lora(dev, tmp_path_factory):
    """(LoRA dir, artifact) for FLUX.1-dev with a random LoRA fused at scale 0.8."""
    pipe, source, _ = dev
    lora = tmp_path_factory.mktemp("flux-lora")
    save_tiny_lora(pipe, lora)
    artifact = tmp_path_factory.mktemp("flux-lora-art") / "artifact"
    export_model(source, artifact, ExportConfig(max_sequence_length=TEXT_LENGTH, lora=(f"{lora}:0.8",)))
    return lora, artifact


def packed_latents(batch: int, seed: int = 0) -> torch.Tensor:
    """Packed Flux latents for SIZE with the tiny VAE (factor 2): [B, 10 * 6 patches, 4 channels * 4]."""
    return torch.randn(batch, 60, 16, generator=torch.Generator().manual_seed(seed))


def both(ours, theirs, prompt, **options):
    """The same call on the artifact and on diffusers, as float images."""
    # The T5 length is explicit: the artifact defaults to its export's, diffusers to 512.
    options = {
        "num_inference_steps": STEPS,
        "output_type": "np",
        "max_sequence_length": TEXT_LENGTH,
        **SIZE,
        **options,
    }
    return ours(prompt, **options).images, theirs(prompt, **options).images


def test_manifest_components_and_dynamic_axes(exported):
    pipe, _, artifact = exported
    manifest = read_manifest(artifact)
    assert manifest.family == "flux"
    assert set(manifest.components) == {"text_encoder", "text_encoder_2", "transformer", "vae_decoder"}
    inputs = {spec.name: spec.shape for spec in manifest.components["transformer"].inputs}
    assert inputs["hidden_states"] == ["batch", "image_sequence", 16]
    assert inputs["encoder_hidden_states"] == ["batch", "text_sequence", 32]
    assert inputs["img_ids"] == ["image_sequence", 3] and inputs["txt_ids"] == ["text_sequence", 3]
    assert inputs["timestep"] == ["batch"]
    guided = pipe.transformer.config.guidance_embeds
    assert ("guidance" in inputs) == guided
    outputs = {spec.name: spec.shape for spec in manifest.components["transformer"].outputs}
    assert outputs["noise_pred"] == ["batch", "image_sequence", 16]
    encoder_2 = {spec.name: spec.shape for spec in manifest.components["text_encoder_2"].inputs}
    assert encoder_2["input_ids"] == ["batch", "sequence"]
    assert manifest.runtime["guidance_embeds"] == guided
    assert manifest.runtime["max_sequence_length"] == TEXT_LENGTH
    assert (manifest.runtime["default_steps"], manifest.runtime["default_guidance_scale"]) == (28, 3.5)
    assert get_family("flux").quantize_recipes["int8-dynamic"] == ("transformer",)


def test_identical_latents_match_diffusers(exported):
    pipe, _, artifact = exported
    ours = runtime.load(artifact)
    prompts = ["a red cat", "a photo of the dog"]
    got, want = both(ours, pipe, prompts, latents=packed_latents(2), guidance_scale=4.5)
    assert got.shape == want.shape == (2, 40, 24, 3)
    for image, reference in zip(got, want, strict=True):
        assert psnr(image, reference) >= 40


def test_seed_matches_diffusers_generator(exported):
    pipe, _, artifact = exported
    ours = runtime.load(artifact)
    options = {"num_inference_steps": STEPS, "output_type": "np", "num_images_per_prompt": 2, **SIZE}
    # A shorter T5 length than the export's: the text sequence is dynamic too.
    options["max_sequence_length"] = 16
    got = ours("a dog", seed=7, **options).images
    want = pipe("a dog", generator=torch.Generator().manual_seed(7), **options).images
    assert psnr(got[0], want[0]) >= 40 and psnr(got[1], want[1]) >= 40
    assert psnr(got[0], got[1]) < 40  # each copy from its own noise


def test_guidance_is_an_input_only_for_dev(dev, schnell):
    latents = packed_latents(1, seed=3)
    for (_, _, artifact), changes in ((dev, True), (schnell, False)):
        pipe = runtime.load(artifact)
        low, high = (
            pipe(
                "a cat",
                latents=latents.clone(),
                guidance_scale=scale,
                num_inference_steps=2,
                output_type="np",
                **SIZE,
            )
            for scale in (1.0, 8.0)
        )
        assert (np.abs(low.images - high.images).max() > 1e-3) == changes


def test_graphs_match_their_pytorch_wrappers(dev):
    """Every graph against its wrapper on the feeds a real run gave it (a new size and text length)."""
    _, source, artifact = dev
    pipe = runtime.load(artifact)
    pipe.recorder = {}
    pipe("a red cat", num_inference_steps=1, max_sequence_length=20, **SIZE)
    models = flux.load_model(resolve_source(str(source)), max_sequence_length=TEXT_LENGTH)
    for component in flux.build_components(models, get_target(pipe.manifest.target)):
        feeds = pipe.recorder[component.name]
        with torch.no_grad():
            expected = component.module(*(torch.from_numpy(feeds[name]) for name in component.example_inputs))
        (got, *_) = pipe.sessions[component.name].run(None, feeds)
        np.testing.assert_allclose(got, expected.numpy(), atol=1e-4, rtol=1e-4, err_msg=component.name)


def test_nan_latents_raise(dev):
    pipe = runtime.load(dev[2])
    latents = torch.full((1, 60, 16), float("nan"))
    with pytest.raises(NonFiniteOutputError, match="graph 'transformer' produced NaN/Inf in 'noise_pred'"):
        pipe("a cat", latents=latents, num_inference_steps=1, **SIZE)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        # Other non-multiples are rounded down, as diffusers does (tests/runtime/test_resolutions.py).
        ({"height": 2}, "height 2 is not a positive multiple of 4.*Use 4"),
        ({"width": -4}, "width -4 is not a positive multiple of 4.*Use 4"),
        ({"negative_prompt": "blurry"}, "Flux artifacts do not run negative_prompt"),
        ({"max_sequence_length": 513}, "max_sequence_length 513 is above Flux's 512"),
        (
            {"latents": torch.zeros(1, 24, 16)},
            r"latents have shape \(1, 24, 16\); this request needs \(1, 60, 16\)",
        ),
    ],
)
def test_bad_requests_are_refused(schnell, options, message):
    pipe = runtime.load(schnell[2])
    with pytest.raises(GenerationConfigError, match=message):
        pipe("a cat", num_inference_steps=1, **{**SIZE, **options})


def test_lora_is_fused_and_matches_diffusers(dev, dev_lora):
    _, source, base_artifact = dev
    lora, artifact = dev_lora
    manifest = read_manifest(artifact)
    assert [(entry["path"], entry["scale"]) for entry in manifest.source.lora] == [(str(lora), 0.8)]
    base, fused = runtime.load(base_artifact), runtime.load(artifact)
    # Identical feeds to both artifacts: the LoRA touches the transformer and CLIP, not T5.
    base.recorder = {}
    base("a red cat", num_inference_steps=1, **SIZE)
    for name, changed in (("transformer", True), ("text_encoder", True), ("text_encoder_2", False)):
        feeds = base.recorder[name]
        (before,) = base.sessions[name].run(None, feeds)
        (after,) = fused.sessions[name].run(None, feeds)
        assert (np.abs(before - after).max() > 1e-3) == changed, name
    reference = FluxPipeline.from_pretrained(source, dtype=torch.float32)
    reference.set_progress_bar_config(disable=True)
    reference.load_lora_weights(lora, adapter_name="a")
    reference.set_adapters(["a"], adapter_weights=[0.8])
    latents = packed_latents(1, seed=5)
    got, want = both(fused, reference, "a red cat", latents=latents)
    without, _ = both(base, reference, "a red cat", latents=latents)
    # The tiny LoRA moves the image only to ~45 dB, so 40 dB alone would not prove it was fused.
    assert psnr(got[0], want[0]) >= 40
    assert psnr(got[0], want[0]) > psnr(without[0], want[0]) + 20
