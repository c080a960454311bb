"""FLUX.1 (``FluxPipeline``: FLUX.1-dev and FLUX.1-schnell) to ONNX, one graph per component.

Graphs: ``text_encoder`` (CLIP-L, pooled output only), ``text_encoder_2`` (T5-XXL hidden states),
``transformer`` (``FluxTransformer2DModel`` on packed 2x2 latent patches; FLUX.1-dev's graph also takes
the distilled ``guidance`` value, schnell's has no such input) and ``vae_decoder``. Batch, image
sequence (latent patches) and text sequence are dynamic, so one artifact serves any size diffusers'
FluxPipeline does (multiples of 16 px; other sides it rounds down, and so does the runtime) and any T5
length up to 512.

Used by ``modelkiln.exporters.export.export_model``; see that module for the call.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modelkiln.exporters.diffusion import (
    DenoiserCall,
    Lora,
    PipelineModels,
    PipelineSpec,
    clip_component,
    save_pipeline_files,
    t5_component,
    vae_decoder_component,
    vae_runtime_config,
)
from modelkiln.exporters.onnx_export import Component
from modelkiln.exporters.source import Source
from modelkiln.exporters.targets import Target

PIPELINE = PipelineSpec(
    pipeline_class="FluxPipeline",
    denoiser="transformer",
    lora_targets=("transformer", "text_encoder"),  # what diffusers' FluxLoraLoaderMixin loads into
)
DEFAULT_MAX_SEQUENCE_LENGTH = 512  # diffusers' default (and largest) T5 length for Flux


def load_model(
    source: Source,
    trust_remote_code: bool = False,
    lora: tuple[Lora, ...] = (),
    max_sequence_length: int | None = None,
) -> PipelineModels:
    return PipelineModels(
        source, PIPELINE, lora, max_sequence_length=max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH
    )


def denoiser_component(transformer: nn.Module, text_length: int, fuse: bool) -> Component:
    from diffusers import FluxPipeline

    config = transformer.config
    # A 4x6 grid of latent patches: unequal sides, so nothing ties the sequence to a square.
    img_ids = FluxPipeline._prepare_latent_image_ids(2, 4, 6, "cpu", torch.float32)  # [24, 3]
    inputs = {
        "hidden_states": torch.randn(2, 24, config.in_channels),
        "encoder_hidden_states": torch.randn(2, text_length, config.joint_attention_dim),
        "pooled_projections": torch.randn(2, config.pooled_projection_dim),
        "timestep": torch.tensor([1.0, 0.5]),
        "img_ids": img_ids,
        "txt_ids": torch.zeros(text_length, 3),
    }
    axes = {
        "hidden_states": {0: "batch", 1: "image_sequence"},
        "encoder_hidden_states": {0: "batch", 1: "text_sequence"},
        "pooled_projections": {0: "batch"},
        "timestep": {0: "batch"},
        "img_ids": {0: "image_sequence"},
        "txt_ids": {0: "text_sequence"},
        "noise_pred": {0: "batch", 1: "image_sequence"},
    }
    if config.guidance_embeds:
        # FLUX.1-dev takes the guidance scale as an embedding (guidance distillation) instead of running
        # a second, unconditional pass; schnell has no such input.
        inputs["guidance"] = torch.tensor([3.5, 3.5])
        axes["guidance"] = {0: "batch"}
    call = DenoiserCall(transformer, tuple(inputs))
    # Fused where the target allows: measured faster on onnxruntime (benchmarks/results/sd3-step-full).
    return Component("transformer", call, inputs, ("noise_pred",), axes, fuse_attention=fuse)


def build_components(models: PipelineModels, target: Target) -> Iterator[Component]:
    """Each component in turn for ``target``, loaded just before its export and released right after."""
    length = models.options["max_sequence_length"]
    yield clip_component("text_encoder", models.module("text_encoder"), "pooled")
    models.release("text_encoder")
    yield t5_component("text_encoder_2", models.module("text_encoder_2"), length)
    models.release("text_encoder_2")
    yield denoiser_component(models.module("transformer"), length, target.fuse_attention)
    models.release("transformer")
    yield vae_decoder_component(models.module("vae"))
    models.release("vae")


def runtime_config(models: PipelineModels) -> dict[str, Any]:
    """What the runtime needs beyond the graphs and the copied scheduler/tokenizer folders."""
    transformer = models.config("transformer")
    return {
        "pipeline": PIPELINE.pipeline_class,
        "max_sequence_length": models.options["max_sequence_length"],
        "guidance_embeds": bool(transformer.get("guidance_embeds", False)),
        "in_channels": transformer["in_channels"],
        # diffusers' FluxPipeline hard-codes these defaults for dev and schnell alike.
        "default_sample_size": 128,
        "default_steps": 28,
        "default_guidance_scale": 3.5,
        **vae_runtime_config(models),
    }


def save_runtime_files(source: Source, models: PipelineModels, directory: Path) -> None:
    save_pipeline_files(source, directory)
