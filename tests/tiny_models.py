"""Tiny seeded models, tokenizers and processors built in-process (nothing downloads in tests).

path = save_tiny_vit_gpt2(tmp_path, TINY_VIT_GPT2["a"])   # a directory like save_pretrained writes
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

WORDS = [f"w{i}" for i in range(40)]
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]


@dataclass(frozen=True)
class TinyViTGPT2:
    """Sizes of one tiny ViT-GPT2; two differ in image size, patch size, widths and head counts."""

    image_size: int  # ViT input side; the processor resizes to it
    patch_size: int  # ViT patch side: sets the encoder sequence length
    vit_hidden: int  # ViT width; differs from gpt_hidden in one config to exercise enc_to_dec_proj
    vit_heads: int  # ViT attention heads
    gpt_hidden: int  # GPT-2 width
    gpt_heads: int  # GPT-2 heads: changes the KV cache shape
    gpt_layers: int  # GPT-2 layers: changes the number of cache tensors
    inverse_layer_scale: bool  # GPT-2's scale_attn_by_inverse_layer_idx option
    num_beams: int  # generation_config default, as the real checkpoint sets 4
    seed: int  # torch seed of the weights


TINY_VIT_GPT2 = {
    "a": TinyViTGPT2(32, 8, 32, 4, 48, 4, 2, False, 1, 0),
    "b": TinyViTGPT2(48, 16, 64, 2, 64, 8, 3, True, 4, 1),
}


def word_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(SPECIALS + WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def build_tiny_vit_gpt2(sizes: TinyViTGPT2):
    from transformers import GPT2Config, VisionEncoderDecoderConfig, VisionEncoderDecoderModel, ViTConfig

    torch.manual_seed(sizes.seed)
    encoder = ViTConfig(
        image_size=sizes.image_size,
        patch_size=sizes.patch_size,
        hidden_size=sizes.vit_hidden,
        num_hidden_layers=2,
        num_attention_heads=sizes.vit_heads,
        intermediate_size=2 * sizes.vit_hidden,
    )
    decoder = GPT2Config(
        vocab_size=len(SPECIALS) + len(WORDS),
        n_positions=40,
        n_embd=sizes.gpt_hidden,
        n_layer=sizes.gpt_layers,
        n_head=sizes.gpt_heads,
        add_cross_attention=True,
        scale_attn_by_inverse_layer_idx=sizes.inverse_layer_scale,
        # Wide init makes random logits peaked and image-dependent, so captions vary and hit EOS sometimes.
        initializer_range=0.3,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = 1, 0, 2
    return VisionEncoderDecoderModel(config).eval()


def save_tiny_vit_gpt2(directory: Path, sizes: TinyViTGPT2) -> Path:
    from transformers import GenerationConfig, ViTImageProcessorPil

    directory.mkdir(parents=True, exist_ok=True)
    build_tiny_vit_gpt2(sizes).save_pretrained(directory)
    word_tokenizer().save_pretrained(directory)
    size = {"height": sizes.image_size, "width": sizes.image_size}
    ViTImageProcessorPil(size=size, do_convert_rgb=True).save_pretrained(directory)
    GenerationConfig(
        decoder_start_token_id=1,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        max_length=12,
        num_beams=sizes.num_beams,
    ).save_pretrained(directory)
    return directory
