"""Source pipelines for ``kiln bench --family flux --preset``: FLUX.1 widths, random weights, built locally.

The transformer keeps FLUX.1's real widths (24 heads x 128 = 3072, T5 states 4096 wide, CLIP-L pooled
768, 64 packed latent channels, RoPE axes 16/56/56) at reduced depth, since a step's time is the
blocks' and every block of a kind costs the same; the text encoders and the VAE are narrow stand-ins
with the interface widths Flux needs. ``full``/``tiny`` are FLUX.1-dev (guidance embedding, dynamic
shift), the ``-schnell`` ones FLUX.1-schnell (no guidance input, fixed shift). Nothing downloads::

    FLUX_PRESETS["full"].save(Path("/tmp/flux"))      # a FluxPipeline directory
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from modelkiln.fixtures.tiny_diffusion import clip_tokenizer, t5_tokenizer

from .presets import clip_config, save_pipeline, t5_stand_in, vae_stand_in

# The model builders below import diffusers, transformers and torch inside each function: the task
# registry imports this module, and `kiln bench`'s argument checks must not wait for torch.


@dataclass(frozen=True)
class FluxPreset:
    """Sizes of one FLUX.1 preset and the generation settings it is benchmarked at."""

    heads: int  # transformer attention heads (FLUX.1: 24)
    head_dim: int  # channels per head (FLUX.1: 128, so the width is 3072)
    double_layers: int  # dual-stream (image + text) blocks (FLUX.1: 19)
    single_layers: int  # single-stream blocks over the joined sequence (FLUX.1: 38)
    joint_attention_dim: int  # T5-XXL's width, the text states' (4096)
    pooled_projection_dim: int  # CLIP-L's pooled width (768)
    axes_dims_rope: tuple[int, int, int]  # RoPE channels per position axis; they sum to head_dim
    guidance_embeds: bool  # FLUX.1-dev: distilled guidance is an embedding input; schnell: none
    latent_channels: int  # VAE latent channels (16); the transformer sees them packed 2x2 (64)
    vae_channels: tuple[int, ...]  # stand-in VAE block widths; 4 blocks give Flux's 8x scale factor
    text_width: int  # hidden width of the CLIP stand-in's layers, and the T5 stand-in's MLP width
    size: int  # image side in pixels the benchmark generates at
    steps: int  # denoising steps per image
    guidance_scale: float  # dev: the guidance embedding's value (batch stays 1); schnell: unused
    max_sequence_length: int  # T5 tokens the transformer attends to beside the image tokens
    seed: int  # torch seed of the weights

    def save(self, directory: Path) -> None:
        save_pipeline(build_flux_pipeline(self), directory)


def _flux(size: int, guidance: bool, **depth: int) -> FluxPreset:
    """FLUX.1's widths at ``depth`` (double_layers, single_layers), 2 steps, 512 T5 tokens."""
    return FluxPreset(
        24, 128, joint_attention_dim=4096, pooled_projection_dim=768, axes_dims_rope=(16, 56, 56),
        guidance_embeds=guidance, latent_channels=16, vae_channels=(8, 8, 16, 16), text_width=32, size=size,
        steps=2, guidance_scale=3.5 if guidance else 0.0, max_sequence_length=512, seed=0, **depth,
    )  # fmt: skip


def _tiny(guidance: bool) -> FluxPreset:
    return FluxPreset(
        2, 16, 1, 1, 32, 32, (4, 6, 6), guidance, 4, (8, 16), 16, 32, 2, 3.5 if guidance else 0.0, 24, 0
    )


FLUX_PRESETS: dict[str, FluxPreset] = {
    # Seconds end to end: one block of each kind, fixture widths.
    "tiny": _tiny(guidance=True),
    "tiny-schnell": _tiny(guidance=False),
    # FLUX.1's widths at 1 of 19 double and 1 of 38 single blocks, 512x512 (1024 image + 512 text
    # tokens): a step of seconds on 2 cores, ~2.1 GB of fp32 weights.
    "full": _flux(512, True, double_layers=1, single_layers=1),
    "full-schnell": _flux(512, False, double_layers=1, single_layers=1),
}


def _transformer(preset: FluxPreset):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1, in_channels=4 * preset.latent_channels, num_layers=preset.double_layers,
        num_single_layers=preset.single_layers, attention_head_dim=preset.head_dim,
        num_attention_heads=preset.heads, joint_attention_dim=preset.joint_attention_dim,
        pooled_projection_dim=preset.pooled_projection_dim, guidance_embeds=preset.guidance_embeds,
        axes_dims_rope=preset.axes_dims_rope,
    ).eval()  # fmt: skip


def _scheduler(preset: FluxPreset):
    from diffusers import FlowMatchEulerDiscreteScheduler

    if not preset.guidance_embeds:  # FLUX.1-schnell's: a fixed shift of 1
        return FlowMatchEulerDiscreteScheduler(shift=1.0)
    return FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def build_flux_pipeline(preset: FluxPreset):
    """A ``FluxPipeline`` of the preset's sizes with seeded random weights."""
    import torch
    from diffusers import FluxPipeline
    from transformers import CLIPTextModel

    torch.manual_seed(preset.seed)
    vae = vae_stand_in(
        preset.vae_channels, preset.latent_channels, preset.size, shift_factor=0.1159,
        scaling_factor=0.3611, use_quant_conv=False, use_post_quant_conv=False,
    )  # fmt: skip
    return FluxPipeline(
        transformer=_transformer(preset),
        scheduler=_scheduler(preset),
        vae=vae,
        # CLIPTextModel's pooled output is its hidden width: the stand-in is as wide as the pooled input.
        text_encoder=CLIPTextModel(
            clip_config(preset.pooled_projection_dim, preset.pooled_projection_dim)
        ).eval(),
        tokenizer=clip_tokenizer(),
        text_encoder_2=t5_stand_in(preset.joint_attention_dim, preset.text_width),
        tokenizer_2=t5_tokenizer(preset.max_sequence_length),
    )
