"""Source pipelines for ``kiln bench --family sd3 --preset``: SD3.5-Medium-shaped, random weights, built locally.

The benchmark's target is the transformer step, so the transformer keeps SD3.5-Medium's real widths
(24 heads x 64, joint attention 4096 wide, pooled 2048, 16 latent channels, a 384x384 position table,
RMS qk-norm, MMDiT-X dual attention in the first layers) at reduced depth, while the text encoders and
the VAE are tiny stand-ins with the interface widths SD3 needs. Nothing downloads::

    path = build_diffusion_preset("full", Path("/tmp/kiln-bench"))   # a StableDiffusion3Pipeline dir
    preset = DIFFUSION_PRESETS["full"]                                # its sizes and run settings

A saved preset is reused when its ``preset.json`` matches the sizes asked for.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from modelkiln.fixtures.tiny_diffusion import TOKEN_LENGTH, clip_tokenizer, t5_tokenizer

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


def _clip(preset: DiffusionPreset, projection: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        bos_token_id=0, eos_token_id=2, pad_token_id=1, vocab_size=1000, hidden_size=preset.text_width,
        intermediate_size=2 * preset.text_width, num_attention_heads=4, num_hidden_layers=2,
        projection_dim=projection, max_position_embeddings=TOKEN_LENGTH, hidden_act="gelu",
    )  # fmt: skip
    return CLIPTextModelWithProjection(config).eval()


def _t5(preset: DiffusionPreset):
    from transformers import T5Config, T5EncoderModel

    # d_model is the interface width (joint_attention_dim); heads x d_kv and d_ff stay tiny.
    config = T5Config(
        vocab_size=96, d_model=preset.joint_attention_dim, d_kv=8, d_ff=preset.text_width,
        num_layers=1, num_heads=4, relative_attention_num_buckets=8,
    )  # fmt: skip
    return T5EncoderModel(config).eval()


def _vae(preset: DiffusionPreset):
    from diffusers import AutoencoderKL

    blocks = len(preset.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=preset.vae_channels,
        down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
        layers_per_block=1, latent_channels=preset.latent_channels, norm_num_groups=4,
        sample_size=preset.size, shift_factor=0.0609, scaling_factor=1.5305,
        use_quant_conv=False, use_post_quant_conv=False,
    ).eval()  # fmt: skip


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
        text_encoder_3=_t5(preset),
        tokenizer_3=t5_tokenizer(preset.max_sequence_length),
    )


def build_diffusion_preset(name: str, cache_dir: Path) -> Path:
    """The preset's pipeline directory under ``cache_dir``, built unless an identical one is there."""
    preset = DIFFUSION_PRESETS[name]
    directory = Path(cache_dir) / f"source-sd3-{name}"
    marker = directory / "preset.json"
    wanted = json.loads(json.dumps(asdict(preset)))  # tuples as JSON lists, as the marker stores them
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        return directory
    quiet_loading()  # no per-shard bars while saving
    build_sd3_pipeline(preset).save_pretrained(directory)
    # Written last: its presence marks a complete save.
    marker.write_text(json.dumps(wanted, indent=2) + "\n")
    return directory
