"""Source pipelines for ``kiln bench --family stable-diffusion --preset``: the SD 1.5 UNet at full size.

The UNet is SD 1.5's own configuration (320/640/1280/1280 channels, 2 layers per block, cross-attention
768 wide, 8 heads, 860M parameters) with random weights; the CLIP text encoder and the VAE are narrow
stand-ins with the interface widths the UNet needs (768-wide text states, 4 latent channels, 8x scale).
Nothing downloads::

    SD1_PRESETS["full"].save(Path("/tmp/sd15"))      # a StableDiffusionPipeline directory
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from modelkiln.fixtures.tiny_diffusion import clip_tokenizer

from .presets import clip_config, save_pipeline, vae_stand_in

# The model builders below import diffusers, transformers and torch inside each function: the task
# registry imports this module, and `kiln bench`'s argument checks must not wait for torch.


@dataclass(frozen=True)
class Sd1Preset:
    """Sizes of one SD 1.x preset and the generation settings it is benchmarked at."""

    unet_channels: tuple[int, ...]  # UNet block widths (SD 1.5: 320, 640, 1280, 1280)
    layers_per_block: int  # ResNet (+ transformer) layers per down block (2; up blocks have one more)
    cross_attention_dim: int  # CLIP text states' width the UNet attends to (768)
    attention_head_dim: int  # SD 1.x's attention_head_dim: the head count (8), as diffusers reads it
    norm_num_groups: int  # GroupNorm groups (32)
    vae_channels: tuple[int, ...]  # stand-in VAE block widths; 4 blocks give SD's 8x scale factor
    text_width: int  # hidden width of the CLIP stand-in, which projects nothing: its states are this wide
    size: int  # image side in pixels the benchmark generates at (512: 64x64 latents)
    steps: int  # denoising steps per image
    guidance_scale: float  # > 1: classifier-free guidance, so every UNet call has batch 2
    max_sequence_length: int | None  # SD 1.x has no T5: None (the runners then set no T5 length)
    seed: int  # torch seed of the weights

    def save(self, directory: Path) -> None:
        save_pipeline(build_sd1_pipeline(self), directory)


SD1_PRESETS: dict[str, Sd1Preset] = {
    # Seconds end to end: SD's block layout at fixture widths.
    "tiny": Sd1Preset((16, 32), 1, 32, 8, 8, (8, 16), 32, 32, 2, 7.5, None, 0),
    # SD 1.5's UNet at full size, 512x512, guided (batch 2).
    "full": Sd1Preset((320, 640, 1280, 1280), 2, 768, 8, 32, (8, 8, 16, 16), 768, 512, 2, 7.5, None, 0),
}


def _unet(preset: Sd1Preset):
    from diffusers import UNet2DConditionModel

    # SD's layout: cross-attention in every block but the deepest (down) and the first (up).
    plain = len(preset.unet_channels) - 1
    return UNet2DConditionModel(
        sample_size=preset.size // 2 ** (len(preset.vae_channels) - 1), in_channels=4, out_channels=4,
        block_out_channels=preset.unet_channels, layers_per_block=preset.layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * plain + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * plain,
        cross_attention_dim=preset.cross_attention_dim, attention_head_dim=preset.attention_head_dim,
        norm_num_groups=preset.norm_num_groups,
    ).eval()  # fmt: skip


def build_sd1_pipeline(preset: Sd1Preset):
    """A ``StableDiffusionPipeline`` of the preset's sizes with seeded random weights."""
    import torch
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel

    torch.manual_seed(preset.seed)
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1
    )
    return StableDiffusionPipeline(
        unet=_unet(preset),
        scheduler=scheduler,
        vae=vae_stand_in(preset.vae_channels, 4, preset.size, scaling_factor=0.18215),
        text_encoder=CLIPTextModel(clip_config(preset.text_width, preset.text_width)).eval(),
        tokenizer=clip_tokenizer(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
