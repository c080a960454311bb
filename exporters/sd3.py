"""Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline``, MMDiT) to ONNX, one graph per component.

Graphs: ``text_encoder`` and ``text_encoder_2`` (CLIP-L and CLIP-G with projection: pooled embedding
and penultimate hidden states), ``text_encoder_3`` (T5-XXL, only if the pipeline has it: diffusers
runs SD3 without it, on zeros), ``transformer`` (``SD3Transformer2DModel``, including SD3.5-Medium's
dual-attention layers and qk-norm) and ``vae_decoder``. Batch, latent height/width and the text
length are dynamic, so one artifact serves 512x512 and 768x1024 alike (within ``pos_embed_max_size``).

Used by ``modelkiln.exporters.export.export_model``; see that module for the call.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modelkiln.exporters.diffusion import (
    CLIP_LENGTH,
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
    pipeline_class="StableDiffusion3Pipeline",
    denoiser="transformer",
    lora_targets=("transformer", "text_encoder", "text_encoder_2"),
    optional=("text_encoder_3", "tokenizer_3"),
)
DEFAULT_MAX_SEQUENCE_LENGTH = 256  # diffusers' default T5 length for SD3


def load_model(
    source: Source,
    trust_remote_code: bool = False,
    lora: tuple[Lora, ...] = (),
    max_sequence_length: int | None = None,
    without: tuple[str, ...] = (),
) -> PipelineModels:
    length = max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH
    return PipelineModels(source, PIPELINE, lora, without, max_sequence_length=length)


# Tracing patch: the centred crop of the position embedding, made exact at every size.
#
# diffusers' PatchEmbed.cropped_pos_embed slices rows top:top + h with top = (max - h) // 2, h the
# latent patches. torch.export simplifies the slice end to max // 2 + h + (-h) // 2, and the ONNX
# translation of a symbolic floor division (onnxscript's operator_floordiv) is a truncating Div, which
# is wrong for the negative -h: at every odd patch count the graph's crop kept one row (or column) too
# many and onnxruntime failed on the broadcast ("6 by 8"). The patched crop below gathers the rows
# arange(h) + top and columns arange(w) + left instead: the only floor divisions left have
# non-negative operands, so truncation equals floor, and the crop follows the dynamic shape exactly
# (nothing shape-dependent is left to feed from outside the graph). Same values as diffusers' crop.
def _exact_cropped_pos_embed(self, height: int, width: int) -> torch.Tensor:
    """PatchEmbed.cropped_pos_embed, with index gathers in place of the slice (see above)."""
    limit = self.pos_embed_max_size
    rows, cols = height // self.patch_size, width // self.patch_size
    if rows > limit or cols > limit:
        raise ValueError(f"{rows}x{cols} patches exceed pos_embed_max_size {limit}.")
    grid = self.pos_embed.reshape(1, limit, limit, -1)
    device = grid.device
    grid = grid.index_select(1, torch.arange(rows, device=device) + (limit - rows) // 2)
    grid = grid.index_select(2, torch.arange(cols, device=device) + (limit - cols) // 2)
    return grid.reshape(1, -1, grid.shape[-1])


def _patch_pos_embed_crop(transformer: nn.Module) -> None:
    """Install the exact crop on this transformer's patch embedding only (no global patching)."""
    embed = getattr(transformer, "pos_embed", None)
    if getattr(embed, "pos_embed_max_size", None):
        embed.cropped_pos_embed = types.MethodType(_exact_cropped_pos_embed, embed)


def denoiser_component(transformer: nn.Module, text_length: int, fuse: bool) -> Component:
    config = transformer.config
    patch = config.patch_size
    # Unequal, non-square example sides keep the exporter from tying height to width.
    inputs = {
        "hidden_states": torch.randn(2, config.in_channels, 4 * patch, 6 * patch),
        "encoder_hidden_states": torch.randn(2, text_length, config.joint_attention_dim),
        "pooled_projections": torch.randn(2, config.pooled_projection_dim),
        "timestep": torch.tensor([1000.0, 500.0]),
    }
    axes = {
        "hidden_states": {0: "batch", 2: "latent_height", 3: "latent_width"},
        "encoder_hidden_states": {0: "batch", 1: "text_sequence"},
        "pooled_projections": {0: "batch"},
        "timestep": {0: "batch"},
        "noise_pred": {0: "batch", 2: "latent_height", 3: "latent_width"},
    }
    _patch_pos_embed_crop(transformer)
    call = DenoiserCall(transformer, tuple(inputs))
    # Fused where the target allows: measured faster on onnxruntime (benchmarks/results/sd3-step-full).
    return Component("transformer", call, inputs, ("noise_pred",), axes, fuse_attention=fuse)


def build_components(models: PipelineModels, target: Target) -> Iterator[Component]:
    """Each component in turn for ``target``, loaded just before its export and released right after."""
    length = models.options["max_sequence_length"]
    for name in ("text_encoder", "text_encoder_2"):
        yield clip_component(name, models.module(name), "pooled+penultimate")
        models.release(name)
    if models.has("text_encoder_3"):
        yield t5_component("text_encoder_3", models.module("text_encoder_3"), length)
        models.release("text_encoder_3")
    yield denoiser_component(models.module("transformer"), CLIP_LENGTH + length, target.fuse_attention)
    models.release("transformer")
    yield vae_decoder_component(models.module("vae"))
    models.release("vae")


def runtime_config(models: PipelineModels) -> dict[str, Any]:
    """What the runtime needs beyond the graphs and the copied scheduler/tokenizer folders."""
    transformer = models.config("transformer")
    return {
        "pipeline": PIPELINE.pipeline_class,
        "max_sequence_length": models.options["max_sequence_length"],
        "has_t5": models.has("text_encoder_3"),
        # Optional components left out; validation leaves them out of the diffusers reference too.
        "without": list(models.without),
        "joint_attention_dim": transformer["joint_attention_dim"],
        "patch_size": transformer["patch_size"],
        "pos_embed_max_size": transformer.get("pos_embed_max_size"),
        # The transformer graph crops its position embedding exactly at odd patch counts (see
        # _exact_cropped_pos_embed); artifacts without this key take even patch counts only.
        "exact_pos_embed_crop": True,
        "default_sample_size": transformer["sample_size"],
        "default_steps": 28,
        "default_guidance_scale": 7.0,
        **vae_runtime_config(models),
    }


def save_runtime_files(source: Source, models: PipelineModels, directory: Path) -> None:
    save_pipeline_files(source, directory, models.without)
