"""Stable Diffusion 1.x / 2.x (``StableDiffusionPipeline``, UNet) to ONNX, one graph per component.

Graphs: ``text_encoder`` (CLIP, last hidden states), ``unet`` (``UNet2DConditionModel``: noisy
latents, timestep and text states -> predicted noise, or velocity for v-prediction models, which the
shipped scheduler config says) and ``vae_decoder``. Batch, latent height/width and the text length
are dynamic. A DreamBooth fine-tune is just another pipeline directory; ``--lora PATH[:SCALE]``
(repeatable) fuses LoRAs into the UNet and text encoder before export.

Used by ``modelkiln.exporters.export.export_model``::

    export_model("my-dreambooth-sd15", "out/sd15", ExportConfig(lora=("style-lora:0.8",)))
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modelkiln.errors import UnsupportedModelError
from modelkiln.exporters.diffusion import (
    CLIP_LENGTH,
    Lora,
    PipelineModels,
    PipelineSpec,
    clip_component,
    save_pipeline_files,
    vae_decoder_component,
    vae_runtime_config,
)
from modelkiln.exporters.onnx_export import Component
from modelkiln.exporters.source import Source
from modelkiln.exporters.targets import Target

PIPELINE = PipelineSpec(
    pipeline_class="StableDiffusionPipeline", denoiser="unet", lora_targets=("unet", "text_encoder")
)
SD_IMAGE_SIZE_MULTIPLE = 8  # StableDiffusionPipeline.check_inputs: height and width divisible by 8


def load_model(
    source: Source, trust_remote_code: bool = False, lora: tuple[Lora, ...] = ()
) -> PipelineModels:
    models = PipelineModels(source, PIPELINE, lora)
    _check_unet(models.config("unet"), source)
    return models


def _check_unet(config: dict[str, Any], source: Source) -> None:
    """Refuse UNets that need inputs this graph does not take, rather than export them silently wrong."""
    extras = {
        "time_cond_proj_dim": "a guidance embedding (LCM-distilled UNet)",
        "addition_embed_type": "added text/time embeddings (an SDXL-style UNet)",
        "class_embed_type": "class labels (an upscaler UNet)",
    }
    for key, what in extras.items():
        if config.get(key) is not None:
            raise UnsupportedModelError(
                f"{source.path}/unet sets {key}={config[key]!r}: it takes {what}, which the "
                "stable-diffusion family's UNet graph does not feed. Export a plain SD 1.x/2.x text-to-image "
                "pipeline (DreamBooth fine-tunes and LoRAs are fine)."
            )


class UNetDenoiser(nn.Module):
    """One UNet call: noisy latents + timestep + text states -> the UNet's prediction."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


def denoiser_component(unet: nn.Module, fuse: bool) -> Component:
    config = unet.config
    # Tracing patch (by example, nothing monkeypatched): latent sides that do not divide by the UNet's
    # total upsampling 2**n. On such sides diffusers' UNet2DConditionModel.forward sets
    # forward_upsample_size and every upsampler interpolates to the size of its skip connection;
    # on sides that divide, it upsamples by exactly 2. Traced on divisible sides, the graph held only
    # the x2 branch and broke wherever the skips are odd (SD 1.5 at 72, 520 or 1000 px: 9, 65, 125
    # latents). Traced on sides that do not divide, it holds the size-following branch, which gives
    # the x2 result bit for bit wherever that applies, so one graph takes every side diffusers does.
    # Unequal sides keep the exporter from tying height to width.
    multiple = 2**unet.num_upsamplers
    inputs = {
        "sample": torch.randn(2, config.in_channels, 3 * multiple + 1, 5 * multiple + 1),
        "timestep": torch.tensor([981.0, 501.0]),
        "encoder_hidden_states": torch.randn(2, CLIP_LENGTH, config.cross_attention_dim),
    }
    axes = {
        "sample": {0: "batch", 2: "latent_height", 3: "latent_width"},
        "timestep": {0: "batch"},
        "encoder_hidden_states": {0: "batch", 1: "text_sequence"},
        "noise_pred": {0: "batch", 2: "latent_height", 3: "latent_width"},
    }
    # Fused where the target allows: its self-attention over 4096 latent tokens (SD 1.5 at 512 px) is
    # most of a step's time, and one SD 1.5 transformer block at 64x64 latents ran 1.11x faster fused on
    # this 2-core CPU (outputs within 1e-6). Also no 1 GB score tensor per head batch in the arena.
    return Component("unet", UNetDenoiser(unet), inputs, ("noise_pred",), axes, fuse_attention=fuse)


@contextlib.contextmanager
def _quiet_symbolic_fallback() -> Iterator[None]:
    """The size-following upsampling (see denoiser_component) divides symbolic sizes; torch's sympy
    interpreter logs a warning when it cannot fold that division and then falls back correctly. The
    line would look like a failure in `kiln export`'s output, so it is muted for the UNet's export."""
    logger = logging.getLogger("torch.utils._sympy.interp")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def build_components(models: PipelineModels, target: Target) -> Iterator[Component]:
    """Each component in turn for ``target``, loaded just before its export and released right after."""
    yield clip_component("text_encoder", models.module("text_encoder"), "hidden")
    models.release("text_encoder")
    # The component is exported while this generator waits at the yield, so the logger stays quiet
    # for exactly that export (see _quiet_symbolic_fallback).
    with _quiet_symbolic_fallback():
        yield denoiser_component(models.module("unet"), target.fuse_attention)
    models.release("unet")
    yield vae_decoder_component(models.module("vae"))
    models.release("vae")


def runtime_config(models: PipelineModels) -> dict[str, Any]:
    """What the runtime needs beyond the graphs and the copied scheduler/tokenizer folders.

    Defaults are diffusers': 50 steps, guidance 7.5, sides of unet.sample_size latents. Epsilon or
    v-prediction is the scheduler config's ``prediction_type``, applied by the scheduler itself.
    """
    unet = models.config("unet")
    return {
        "pipeline": PIPELINE.pipeline_class,
        "default_sample_size": unet["sample_size"],
        "default_steps": 50,
        "default_guidance_scale": 7.5,
        # One upsampler per UNet block but the last (artifacts from before the size-following UNet
        # graph needed latent sides that divide by their product; see denoiser_component).
        "unet_size_multiple": 2 ** (len(unet["block_out_channels"]) - 1),
        # The image side rule of diffusers' StableDiffusionPipeline.check_inputs (a literal 8, whatever
        # the VAE); the UNet graph takes every latent size it leads to.
        "image_size_multiple": SD_IMAGE_SIZE_MULTIPLE,
        **vae_runtime_config(models),
        "latent_channels": unet["in_channels"],  # diffusers draws unet.in_channels latent channels
    }


def save_runtime_files(source: Source, models: PipelineModels, directory: Path) -> None:
    save_pipeline_files(source, directory)
