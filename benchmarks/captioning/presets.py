"""Source models for ``kiln bench --preset``: ViT-GPT2 checkpoints with random weights, built locally.

Nothing downloads: the model, a word-level tokenizer and the image processor are built in-process
and saved like ``save_pretrained`` would, so the benchmark measures real shapes anywhere::

    path = build_preset("full", Path("/tmp/kiln-bench"))   # ViT-B/16 + GPT-2 124M at 224 px

A saved preset is reused when its ``preset.json`` matches the sizes asked for (core.source).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..core.source import build_preset_source

# The builders below import tokenizers, transformers and torch inside each function: the task registry
# imports this module, and `kiln bench`'s argument checks must not wait for torch.
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]  # ids 0..3: pad, decoder start, end, unknown


@dataclass(frozen=True)
class Preset:
    """Sizes of one ViT-GPT2 preset."""

    image_size: int  # ViT input side; the processor resizes to it
    patch_size: int  # ViT patch side: sets the encoder sequence length
    vit_hidden: int  # ViT width
    vit_layers: int  # ViT depth
    vit_heads: int  # ViT attention heads
    vit_intermediate: int  # ViT MLP width
    gpt_hidden: int  # GPT-2 width
    gpt_layers: int  # GPT-2 depth: sets the number of KV cache tensors
    gpt_heads: int  # GPT-2 heads
    vocab_size: int  # tokenizer entries and GPT-2 vocabulary (50257 for the real GPT-2)
    positions: int  # GPT-2 n_positions
    initializer_range: float  # weight init std: 0.02 is GPT-2's own; tiny uses 0.3 so logits are peaked
    seed: int  # torch seed of the weights
    inverse_layer_scale: bool = False  # GPT-2's scale_attn_by_inverse_layer_idx (off in the real model)

    def save(self, directory: Path) -> None:
        save_vit_gpt2(self, directory)


PRESETS: dict[str, Preset] = {
    "tiny": Preset(32, 8, 32, 2, 4, 64, 48, 2, 4, 44, 40, 0.3, 0),
    "full": Preset(224, 16, 768, 12, 12, 3072, 768, 12, 12, 50257, 1024, 0.02, 0),
}


def word_level(specials: list[str], vocab_size: int, unknown: str):
    """A whitespace word-level ``tokenizers.Tokenizer`` with ``vocab_size`` entries: ``specials``, then
    w0, w1, ... (random-weight presets need real vocabulary sizes, not real words)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    words = specials + [f"w{i}" for i in range(vocab_size - len(specials))]
    tokenizer = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token=unknown))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    return tokenizer


def word_tokenizer(vocab_size: int):
    """A whitespace word-level tokenizer with ``vocab_size`` entries (specials, then w0, w1, ...)."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = word_level(SPECIALS, vocab_size, "<unk>")
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def build_model(preset: Preset):
    """A ``VisionEncoderDecoderModel`` (ViT + GPT-2 with cross-attention) with seeded random weights."""
    import torch
    from transformers import GPT2Config, VisionEncoderDecoderConfig, VisionEncoderDecoderModel, ViTConfig

    torch.manual_seed(preset.seed)
    encoder = ViTConfig(
        image_size=preset.image_size,
        patch_size=preset.patch_size,
        hidden_size=preset.vit_hidden,
        num_hidden_layers=preset.vit_layers,
        num_attention_heads=preset.vit_heads,
        intermediate_size=preset.vit_intermediate,
    )
    decoder = GPT2Config(
        vocab_size=preset.vocab_size,
        n_positions=preset.positions,
        n_embd=preset.gpt_hidden,
        n_layer=preset.gpt_layers,
        n_head=preset.gpt_heads,
        add_cross_attention=True,
        scale_attn_by_inverse_layer_idx=preset.inverse_layer_scale,
        initializer_range=preset.initializer_range,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = 1, 0, 2
    return VisionEncoderDecoderModel(config).eval()


def save_vit_gpt2(preset: Preset, directory: Path) -> None:
    """The model, tokenizer, image processor and generation config, as save_pretrained writes them."""
    from transformers import GenerationConfig, ViTImageProcessorPil

    build_model(preset).save_pretrained(directory)
    word_tokenizer(preset.vocab_size).save_pretrained(directory)
    size = {"height": preset.image_size, "width": preset.image_size}
    ViTImageProcessorPil(size=size, do_convert_rgb=True).save_pretrained(directory)
    GenerationConfig(
        decoder_start_token_id=1, bos_token_id=1, eos_token_id=2, pad_token_id=0, num_beams=1
    ).save_pretrained(directory)


def build_preset(name: str, cache_dir: Path) -> Path:
    """The ViT-GPT2 preset's source directory under ``cache_dir``, built unless an identical one is there."""
    return build_preset_source("vit-gpt2", name, cache_dir)
