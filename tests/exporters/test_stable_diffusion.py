"""SD 1.x (StableDiffusionPipeline): export, per-graph parity, images vs diffusers, schedulers, LoRA fusing.

One tiny seeded pipeline is exported twice per module (plain, and with one LoRA fused); every other
test reuses those artifacts or stops before any export.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    StableDiffusionPipeline,
)

from modelkiln import runtime
from modelkiln.cli import build_parser
from modelkiln.errors import GenerationConfigError, KilnError, SourceModelError, UnsupportedModelError
from modelkiln.exporters import stable_diffusion
from modelkiln.exporters.diffusion import LORA_FILE
from modelkiln.exporters.export import ExportConfig, export_model
from modelkiln.exporters.source import resolve_source
from modelkiln.fixtures import CAPTIONER_DIR
from modelkiln.fixtures.tiny_diffusion import save_tiny_lora
from modelkiln.manifest import read_manifest, sha256_file
from modelkiln.metrics import psnr

PROMPTS = ["a red cat", "a dog"]
MIN_PSNR = 40.0  # dB between our images and diffusers' on the same latents or seed


def reference(source, loras: tuple[tuple[str, float], ...] = ()) -> StableDiffusionPipeline:
    """The diffusers pipeline from the source directory, with LoRAs loaded as (unfused) adapters."""
    pipe = StableDiffusionPipeline.from_pretrained(source, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    names = [f"adapter{i}" for i in range(len(loras))]
    for name, (path, _) in zip(names, loras, strict=True):
        pipe.load_lora_weights(str(path), adapter_name=name)
    if loras:
        pipe.set_adapters(names, adapter_weights=[scale for _, scale in loras])
    return pipe


@pytest.fixture(scope="module")
def sd1(tiny_diffusion):
    """(source dir, artifact dir): the tiny SD 1.x pipeline, exported once per session."""
    return tiny_diffusion("sd1")


@pytest.fixture(scope="module")
def lora_dir(sd1, tmp_path_factory):
    directory = tmp_path_factory.mktemp("lora")
    save_tiny_lora(reference(sd1[0]), directory)
    return directory


@pytest.fixture(scope="module")
def lora_artifact(sd1, lora_dir, tmp_path_factory):
    """The same pipeline exported with the LoRA fused at scale 0.7."""
    artifact = tmp_path_factory.mktemp("sd1-lora-art") / "artifact"
    export_model(sd1[0], artifact, ExportConfig(lora=(f"{lora_dir}:0.7",)))
    return artifact


def generate_both(artifact, pipe, **options):
    """Images from our artifact and from the diffusers pipeline, both as [N, H, W, 3] in [0, 1]."""
    seed = options.pop("seed", None)
    ours = runtime.load(artifact)(**options, seed=seed, output_type="np").images
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    theirs = pipe(**options, generator=generator, output_type="np").images
    return ours, theirs


# -- the artifact ---------------------------------------------------------------------------------


def test_manifest_lists_components_with_dynamic_axes(sd1):
    artifact = sd1[1]
    manifest = read_manifest(artifact)
    assert manifest.family == "stable-diffusion" and manifest.task == "text-to-image"
    assert list(manifest.components) == ["text_encoder", "unet", "vae_decoder"]
    shapes = {
        (name, tensor.name): tensor.shape
        for name, spec in manifest.components.items()
        for tensor in [*spec.inputs, *spec.outputs]
    }
    assert shapes[("text_encoder", "input_ids")] == ["batch", "sequence"]
    assert shapes[("unet", "sample")] == ["batch", 4, "latent_height", "latent_width"]
    assert shapes[("unet", "timestep")] == ["batch"]
    assert shapes[("unet", "encoder_hidden_states")] == ["batch", "text_sequence", 32]
    assert shapes[("unet", "noise_pred")] == ["batch", 4, "latent_height", "latent_width"]
    assert shapes[("vae_decoder", "latents")] == ["batch", 4, "latent_height", "latent_width"]
    config = manifest.runtime
    assert (config["default_steps"], config["default_guidance_scale"], config["default_sample_size"]) == (
        50,
        7.5,
        16,
    )
    assert (config["scaling_factor"], config["shift_factor"]) == (0.18215, 0.0)
    assert manifest.source.lora == []
    assert (artifact / "scheduler" / "scheduler_config.json").is_file() and (artifact / "tokenizer").is_dir()


def test_each_graph_matches_pytorch_at_other_shapes(sd1):
    """Batch 3, latents taller than wide and a 20-token text: none of them the export example's."""
    source, artifact = sd1
    pipe = reference(source)
    torch.manual_seed(0)
    ids = torch.randint(0, 1000, (3, 77))
    sample, text = torch.randn(3, 4, 12, 8), torch.randn(3, 20, 32)
    timestep = torch.tensor([999.0, 500.0, 1.0])
    latents = torch.randn(3, 4, 6, 10)
    with torch.no_grad():
        expected = {
            "text_encoder": pipe.text_encoder(ids)[0],
            "unet": pipe.unet(sample, timestep, encoder_hidden_states=text).sample,
            "vae_decoder": pipe.vae.decode(latents).sample,
        }
    feeds = {
        "text_encoder": {"input_ids": ids},
        "unet": {"sample": sample, "timestep": timestep, "encoder_hidden_states": text},
        "vae_decoder": {"latents": latents},
    }
    for name, inputs in feeds.items():
        session = ort.InferenceSession(str(artifact / f"{name}.onnx"))
        (ours,) = session.run(None, {key: value.numpy() for key, value in inputs.items()})
        assert ours.shape == tuple(expected[name].shape)
        np.testing.assert_allclose(ours, expected[name].numpy(), atol=1e-4, err_msg=name)


# -- images vs diffusers --------------------------------------------------------------------------


def test_same_latents_give_diffusers_image_at_another_size(sd1):
    source, artifact = sd1
    # 96x64 px = 12x8 latents (VAE factor 8); the UNet was exported on 6x10 latents.
    latents = torch.randn(2, 4, 12, 8, generator=torch.Generator().manual_seed(5))
    options = {"num_inference_steps": 10, "guidance_scale": 7.5, "height": 96, "width": 64}
    ours, theirs = generate_both(artifact, reference(source), prompt=PROMPTS, latents=latents, **options)
    assert ours.shape == theirs.shape == (2, 96, 64, 3)
    assert psnr(ours, theirs) >= MIN_PSNR
    assert ours.std() > 0.05, "a flat image would match trivially"


def test_seed_gives_diffusers_image_with_torch_generator(sd1):
    source, artifact = sd1
    options = {"prompt": "a red cat", "negative_prompt": "a dog", "num_images_per_prompt": 2}
    ours, theirs = generate_both(artifact, reference(source), num_inference_steps=5, seed=3, **options)
    assert ours.shape == (2, 128, 128, 3)  # default size: unet sample_size 16 x vae factor 8
    assert psnr(ours, theirs) >= MIN_PSNR
    assert psnr(ours[0], ours[1]) < 30, "each image per prompt comes from its own noise"


SCHEDULERS = {
    # eta is passed (DDIM takes it); SD 2.x-style v-prediction comes from the scheduler config alone.
    "ddim-v-prediction": (DDIMScheduler, {"prediction_type": "v_prediction", "set_alpha_to_one": False}),
    # Takes the generator in step(), and its init_noise_sigma depends on the timesteps set first.
    "euler-ancestral": (EulerAncestralDiscreteScheduler, {}),
    "dpm-solver": (DPMSolverMultistepScheduler, {}),
}


@pytest.mark.parametrize("guidance_scale", [7.5, 1.0])
@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_other_schedulers_match_diffusers(sd1, name, guidance_scale):
    source, artifact = sd1
    scheduler_class, overrides = SCHEDULERS[name]
    theirs_pipe = reference(source)
    theirs_pipe.scheduler = scheduler_class.from_config(theirs_pipe.scheduler.config, **overrides)
    ours_pipe = runtime.load(artifact)
    ours_pipe.scheduler = scheduler_class.from_config(theirs_pipe.scheduler.config)
    options = {
        "prompt": PROMPTS,
        "num_inference_steps": 6,
        "guidance_scale": guidance_scale,
        "output_type": "np",
    }
    ours = ours_pipe(**options, seed=11).images
    theirs = theirs_pipe(**options, generator=torch.Generator().manual_seed(11)).images
    assert psnr(ours, theirs) >= MIN_PSNR


def test_size_diffusers_refuses_is_refused(sd1):
    pipe = runtime.load(sd1[1])
    # diffusers' rule, whatever the VAE and UNet: sides divide by 8 (the UNet graph takes any latent side).
    assert read_manifest(sd1[1]).runtime["image_size_multiple"] == 8
    with pytest.raises(
        GenerationConfigError, match=r"height 30 is not a positive multiple of 8.*Use 24 or 32\."
    ):
        pipe("a cat", height=30, width=32, num_inference_steps=1)


# -- LoRA -----------------------------------------------------------------------------------------


def test_fused_lora_changes_the_image_and_matches_diffusers_adapter(sd1, lora_dir, lora_artifact):
    source, base_artifact = sd1
    options = {"prompt": PROMPTS, "num_inference_steps": 6, "height": 32, "width": 48, "seed": 21}
    ours, theirs = generate_both(lora_artifact, reference(source, ((lora_dir, 0.7),)), **options)
    base = runtime.load(base_artifact)(**options, output_type="np").images
    assert psnr(ours, theirs) >= MIN_PSNR
    # A tiny random LoRA moves pixels by a few hundredths: well beyond the export's own error.
    assert psnr(ours, base) < MIN_PSNR and np.abs(ours - base).max() > 0.02, (
        "the LoRA should change the image"
    )


def test_manifest_records_the_fused_lora(lora_dir, lora_artifact):
    recorded = read_manifest(lora_artifact).source.lora
    assert recorded == [{"path": str(lora_dir), "scale": 0.7, "sha256": sha256_file(lora_dir / LORA_FILE)}]


def test_two_loras_fuse_like_diffusers_with_both_adapters(sd1, lora_dir, tmp_path):
    """Repeated --lora: both deltas end up in the weights (checked on the fused modules, without export)."""
    source, _ = sd1
    second = tmp_path / "second.safetensors"
    save_tiny_lora(reference(source), tmp_path, seed=2)
    (tmp_path / LORA_FILE).rename(second)
    flags = ["--lora", f"{lora_dir}:0.7", "--lora", f"{second}:0.5"]
    args = build_parser().parse_args(["export", "--model", "m", "--out", "o", *flags])
    options = ExportConfig(lora=tuple(args.lora)).family_options()
    models = stable_diffusion.load_model(resolve_source(str(source)), **options)
    pipe = reference(source, ((lora_dir, 0.7), (second, 0.5)))
    torch.manual_seed(1)
    ids, sample, text = torch.randint(0, 1000, (2, 77)), torch.randn(2, 4, 8, 12), torch.randn(2, 77, 32)
    timestep = torch.tensor([981.0, 21.0])
    with torch.no_grad():
        fused = models.module("unet")(sample, timestep, encoder_hidden_states=text).sample
        adapters = pipe.unet(sample, timestep, encoder_hidden_states=text).sample
        torch.testing.assert_close(fused, adapters, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            models.module("text_encoder")(ids)[0], pipe.text_encoder(ids)[0], atol=1e-5, rtol=1e-5
        )
    assert [lora["scale"] for lora in models.lora_record()] == [0.7, 0.5]


def test_missing_lora_fails_before_loading(sd1, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(SourceModelError, match="no LoRA weights there"):
        export_model(sd1[0], out, ExportConfig(lora=(f"{tmp_path / 'nowhere'}:0.5",)))
    assert not out.exists()


def test_lora_on_a_captioner_does_not_apply(lora_dir, tmp_path):
    with pytest.raises(KilnError, match="--lora does not apply to family 'vit-gpt2'"):
        export_model(CAPTIONER_DIR, tmp_path / "out", ExportConfig(lora=(str(lora_dir),)))


def test_unet_needing_extra_inputs_is_refused(sd1, tmp_path):
    """An LCM-distilled UNet takes a guidance embedding the graph would silently leave out."""
    source = tmp_path / "lcm"
    shutil.copytree(sd1[0], source)
    config_path = source / "unet" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "time_cond_proj_dim": 32}))
    with pytest.raises(UnsupportedModelError, match="time_cond_proj_dim=32"):
        export_model(source, tmp_path / "out")
