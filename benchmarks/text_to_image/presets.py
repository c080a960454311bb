"""Source pipelines for ``kiln bench --family sd3 --preset``: SD3.5-Medium-shaped, random weights, built locally.

The benchmark's target is the transformer step, so the transformer keeps SD3.5-Medium's real widths
(24 heads x 64, joint attention 4096 wide, pooled 2048, 16 latent channels, a 384x384 position table,
RMS qk-norm, MMDiT-X dual attention in the first layers) at reduced depth, while the text encoders and
the VAE are tiny stand-ins with the interface widths SD3 needs. Nothing downloads::

    path = build_diffusion_preset("full", Path("/tmp/kiln-bench"))   # a StableDiffusion3Pipeline dir
    preset = DIFFUSION_PRESETS["full"]                                # its sizes and run settings

A saved preset is reused when its ``preset.json`` matches the sizes asked for (core.source). The
stand-in text encoders and VAE here serve the Flux and SD 1.x presets too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from modelkiln.fixtures.tiny_diffusion import TOKEN_LENGTH, clip_tokenizer, t5_tokenizer

from ..core.source import build_preset_source
from .runners import quiet_loading

# The model builders below import diffusers, transformers and torch inside each function: the task
# registry imports this module, and `kiln bench`'s argument checks must not wait for torch.


@dataclass(frozen=True)
class DiffusionPreset:
    """Sizes of one SD3-family preset and the generation settings it is benchmarked at."""

    heads: int  # transformer attention heads (SD3.5-Medium: 24)
    head_dim: int  # channels per head (SD3.5-Medium: 64, so the width is 1536)
    layers: int  # transformer blocks (SD3.5-Medium: 24); the last one is context-pre-only
    dual_attention_layers: tuple[int, ...]  # blocks with MMDiT-X's second image attention
    joint_attention_dim: int  # T5's width, which the text states are padded to (4096)
    pooled_projection_dim: int  # CLIP-L + CLIP-G pooled widths (768 + 1280 = 2048)
    clip_projections: tuple[int, int]  # pooled widths of the two CLIPs; they sum to pooled_projection_dim
    pos_embed_max_size: int  # side of the position table in patches (384: the table is 0.9 GB fp32)
    latent_channels: int  # VAE latent channels (16 for SD3)
    vae_channels: tuple[int, ...]  # VAE block widths; 4 blocks give SD3's 8x VAE scale factor
    text_width: int  # hidden width of the tiny CLIP and T5 stand-ins (T5 keeps the 4096 output)
    size: int  # image side in pixels the benchmark generates at
    steps: int  # denoising steps per image
    guidance_scale: float  # > 1: classifier-free guidance, so every transformer call has batch 2
    max_sequence_length: int  # T5 tokens; the transformer sees 77 + this many text tokens
    seed: int  # torch seed of the weights

    def save(self, directory: Path) -> None:
        save_pipeline(build_sd3_pipeline(self), directory)


DIFFUSION_PRESETS: dict[str, DiffusionPreset] = {
    # Seconds end to end: the fixture-sized SD3.5-Medium layout (dual attention, qk-norm, T5).
    "tiny": DiffusionPreset(4, 8, 2, (0,), 48, 32, (16, 16), 32, 4, (8, 16), 16, 32, 2, 4.5, 24, 0),
    # SD3.5-Medium's transformer widths at 3 of its 24 blocks (one dual-attention, one plain, the
    # context-pre-only last), 512 px: a denoising step of a few seconds on 2 cores.
    "full": DiffusionPreset(
        24, 64, 3, (0,), 4096, 2048, (768, 1280), 384, 16, (8, 8, 16, 16), 32, 512, 4, 4.5, 256, 0
    ),
}


def _transformer(preset: DiffusionPreset):
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=preset.size // 2 ** (len(preset.vae_channels) - 1),
        patch_size=2,
        in_channels=preset.latent_channels,
        out_channels=preset.latent_channels,
        num_layers=preset.layers,
        attention_head_dim=preset.head_dim,
        num_attention_heads=preset.heads,
        joint_attention_dim=preset.joint_attention_dim,
        caption_projection_dim=preset.heads * preset.head_dim,
        pooled_projection_dim=preset.pooled_projection_dim,
        pos_embed_max_size=preset.pos_embed_max_size,
        dual_attention_layers=preset.dual_attention_layers,
        qk_norm="rms_norm",
    ).eval()


def clip_config(width: int, output: int):
    """A 2-layer CLIP text config ``width`` wide; ``output`` is the pooled width the denoiser reads."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=0, eos_token_id=2, pad_token_id=1, vocab_size=1000, hidden_size=width,
        intermediate_size=2 * width, num_attention_heads=4, num_hidden_layers=2,
        projection_dim=output, max_position_embeddings=TOKEN_LENGTH, hidden_act="gelu",
    )  # fmt: skip


def _clip(preset: DiffusionPreset, projection: int):
    from transformers import CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(clip_config(preset.text_width, projection)).eval()


def t5_stand_in(width: int, feed_forward: int):
    """A 1-layer T5 encoder whose output is ``width`` wide (the interface); heads x d_kv stay tiny."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=96, d_model=width, d_kv=8, d_ff=feed_forward,
        num_layers=1, num_heads=4, relative_attention_num_buckets=8,
    )  # fmt: skip
    return T5EncoderModel(config).eval()


def vae_stand_in(channels: tuple[int, ...], latent_channels: int, size: int, **scaling):
    """A narrow AutoencoderKL with one block per entry of ``channels`` (4 blocks: an 8x scale factor)."""
    from diffusers import AutoencoderKL

    blocks = len(channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
        layers_per_block=1, latent_channels=latent_channels, norm_num_groups=4, sample_size=size, **scaling,
    ).eval()  # fmt: skip


def _vae(preset: DiffusionPreset):
    return vae_stand_in(
        preset.vae_channels, preset.latent_channels, preset.size, shift_factor=0.0609,
        scaling_factor=1.5305, use_quant_conv=False, use_post_quant_conv=False,
    )  # fmt: skip


def build_sd3_pipeline(preset: DiffusionPreset):
    """A ``StableDiffusion3Pipeline`` of the preset's sizes with seeded random weights."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    torch.manual_seed(preset.seed)
    return StableDiffusion3Pipeline(
        transformer=_transformer(preset),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(preset),
        text_encoder=_clip(preset, preset.clip_projections[0]),
        tokenizer=clip_tokenizer(),
        text_encoder_2=_clip(preset, preset.clip_projections[1]),
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=t5_stand_in(preset.joint_attention_dim, preset.text_width),
        tokenizer_3=t5_tokenizer(preset.max_sequence_length),
    )


def save_pipeline(pipeline, directory: Path) -> None:
    quiet_loading()  # no per-shard bars while saving
    pipeline.save_pretrained(directory)


def build_diffusion_preset(name: str, cache_dir: Path) -> Path:
    """The SD3 preset's pipeline directory under ``cache_dir``, built unless an identical one is there."""
    return build_preset_source("sd3", name, cache_dir)
