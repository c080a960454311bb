"""Source models for ``kiln bench --family blip|blip-2 --preset``: random weights at the real widths.

Nothing downloads: the model, a word-level tokenizer of the real vocabulary size and the image
processor are built in-process and saved as ``save_pretrained`` would, so the benchmark measures the
real architectures' shapes anywhere::

    BLIP_PRESETS["full"]     # BLIP-base: ViT-B/16 at 384 px, 12-layer BERT-style text decoder
    BLIP_2_PRESETS["full"]   # BLIP-2 with OPT-2.7B's widths at 8 of its 32 layers, ViT-g at 8 of 39

``core.source.build_preset_source`` saves them (``preset.save(directory)``) and reuses a saved one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .presets import word_level

# The builders below import transformers and torch inside each function: the task registry imports
# this module's table, and `kiln bench`'s argument checks must not wait for torch.
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]  # ids 0..5; [DEC] starts a caption
OPT_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]  # OPT's ids 0..3; "</s>" is both BOS and EOS


@dataclass(frozen=True)
class BlipPreset:
    """Sizes of one BlipForConditionalGeneration preset."""

    image_size: int  # vision input side (BLIP-base captioning: 384)
    patch_size: int  # vision patch side (16): 577 tokens at 384 px
    vision_hidden: int  # ViT width (768); also the text decoder's cross-attention input width
    vision_layers: int  # ViT depth (12)
    vision_heads: int  # ViT heads (12)
    vision_intermediate: int  # ViT MLP width (3072)
    text_hidden: int  # BERT-style text decoder width (768)
    text_layers: int  # text decoder depth (12): sets the number of KV cache tensors
    text_heads: int  # text decoder heads (12)
    text_intermediate: int  # text decoder MLP width (3072)
    vocab_size: int  # tokenizer entries and decoder vocabulary (BLIP-base: 30524)
    positions: int  # text max_position_embeddings (512)
    initializer_range: float  # weight init std: 0.02 is BLIP's own; tiny uses 0.3 so logits are peaked
    seed: int  # torch seed of the weights

    def save(self, directory: Path) -> None:
        save_blip(self, directory)


@dataclass(frozen=True)
class Blip2Preset:
    """Sizes of one Blip2ForConditionalGeneration preset with an OPT language model."""

    image_size: int  # vision input side (224)
    patch_size: int  # vision patch side (14): 257 tokens at 224 px
    vision_hidden: int  # ViT-g width (1408)
    vision_layers: int  # ViT-g depth (39 in BLIP-2; reduced here, see BLIP_2_PRESETS)
    vision_heads: int  # ViT-g heads (16)
    vision_intermediate: int  # ViT-g MLP width (6144)
    qformer_hidden: int  # Q-Former width (768)
    qformer_layers: int  # Q-Former depth (12)
    qformer_heads: int  # Q-Former heads (12)
    qformer_intermediate: int  # Q-Former MLP width (3072)
    num_query_tokens: int  # query embeddings put in front of the prompt (32)
    opt_hidden: int  # OPT width (2560 for OPT-2.7B)
    opt_layers: int  # OPT depth (32 for OPT-2.7B; reduced here, see BLIP_2_PRESETS)
    opt_heads: int  # OPT heads (32)
    opt_ffn: int  # OPT MLP width (10240)
    vocab_size: int  # tokenizer entries with the processor's <image> token (OPT: 50272)
    positions: int  # OPT max_position_embeddings (2048)
    initializer_range: float  # weight init std: 0.02 is OPT's own; tiny uses 0.3 so logits are peaked
    seed: int  # torch seed of the weights

    def save(self, directory: Path) -> None:
        save_blip_2(self, directory)


BLIP_PRESETS: dict[str, BlipPreset] = {
    "tiny": BlipPreset(32, 8, 32, 2, 4, 64, 48, 2, 4, 96, 48, 40, 0.3, 0),
    # BLIP-base captioning (Salesforce/blip-image-captioning-base) at full depth.
    "full": BlipPreset(384, 16, 768, 12, 12, 3072, 768, 12, 12, 3072, 30524, 512, 0.02, 0),
}
BLIP_2_PRESETS: dict[str, Blip2Preset] = {
    "tiny": Blip2Preset(32, 8, 32, 1, 4, 64, 32, 1, 4, 64, 4, 48, 2, 4, 96, 64, 64, 0.3, 0),
    # Salesforce/blip2-opt-2.7b's widths: OPT at 8 of its 32 layers (~3 GB of decoder weights fp32
    # with the 50272 x 2560 embedding), ViT-g at 8 of its 39 layers; the Q-Former at full depth.
    "full": Blip2Preset(
        224, 14, 1408, 8, 16, 6144, 768, 12, 12, 3072, 32, 2560, 8, 32, 10240, 50272, 2048, 0.02, 0
    ),
}


def bert_word_tokenizer(vocab_size: int):
    """BERT's [CLS] text [SEP] framing over a word-level vocabulary, with BLIP's [DEC] as bos."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tokenizer = word_level(BERT_SPECIALS, vocab_size, "[UNK]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="[DEC]", unk_token="[UNK]", sep_token="[SEP]",
        pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]",
    )  # fmt: skip


def build_blip(preset: BlipPreset):
    """A ``BlipForConditionalGeneration`` of the preset's sizes with seeded random weights."""
    import torch
    from transformers import BlipConfig, BlipForConditionalGeneration

    torch.manual_seed(preset.seed)
    vision = {
        "image_size": preset.image_size, "patch_size": preset.patch_size, "hidden_size": preset.vision_hidden,
        "intermediate_size": preset.vision_intermediate, "num_hidden_layers": preset.vision_layers,
        "num_attention_heads": preset.vision_heads, "initializer_range": preset.initializer_range,
    }  # fmt: skip
    text = {
        "vocab_size": preset.vocab_size, "hidden_size": preset.text_hidden,
        "encoder_hidden_size": preset.vision_hidden, "intermediate_size": preset.text_intermediate,
        "num_hidden_layers": preset.text_layers, "num_attention_heads": preset.text_heads,
        "max_position_embeddings": preset.positions, "initializer_range": preset.initializer_range,
        "pad_token_id": 0, "sep_token_id": 3, "bos_token_id": 5, "eos_token_id": 3,
    }  # fmt: skip
    config = BlipConfig(vision_config=vision, text_config=text, initializer_range=preset.initializer_range)
    return BlipForConditionalGeneration(config).eval()


def save_blip(preset: BlipPreset, directory: Path) -> None:
    """Model, tokenizer and image processor, laid out as the hub's BLIP checkpoints ship them."""
    from transformers import BlipImageProcessorPil

    build_blip(preset).save_pretrained(directory)
    bert_word_tokenizer(preset.vocab_size).save_pretrained(directory)
    size = {"height": preset.image_size, "width": preset.image_size}
    BlipImageProcessorPil(size=size).save_pretrained(directory)


def opt_word_tokenizer(words: int):
    """OPT's specials and BOS-first framing over a word-level vocabulary of ``words`` entries."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tokenizer = word_level(OPT_SPECIALS, words, "<unk>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def build_blip_2(preset: Blip2Preset, image_token_index: int):
    """A ``Blip2ForConditionalGeneration`` (OPT) of the preset's sizes with seeded random weights."""
    import torch
    from transformers import Blip2Config, Blip2ForConditionalGeneration, OPTConfig

    torch.manual_seed(preset.seed)
    vision = {
        "image_size": preset.image_size, "patch_size": preset.patch_size, "hidden_size": preset.vision_hidden,
        "intermediate_size": preset.vision_intermediate, "num_hidden_layers": preset.vision_layers,
        "num_attention_heads": preset.vision_heads,
    }  # fmt: skip
    qformer = {
        "hidden_size": preset.qformer_hidden, "intermediate_size": preset.qformer_intermediate,
        "num_hidden_layers": preset.qformer_layers, "num_attention_heads": preset.qformer_heads,
        "encoder_hidden_size": preset.vision_hidden, "cross_attention_frequency": 2,
    }  # fmt: skip
    text = OPTConfig(
        vocab_size=preset.vocab_size, hidden_size=preset.opt_hidden, word_embed_proj_dim=preset.opt_hidden,
        num_hidden_layers=preset.opt_layers, num_attention_heads=preset.opt_heads, ffn_dim=preset.opt_ffn,
        max_position_embeddings=preset.positions, init_std=preset.initializer_range,
        bos_token_id=2, eos_token_id=2, pad_token_id=1,
    )  # fmt: skip
    config = Blip2Config(
        vision_config=vision, qformer_config=qformer, text_config=text.to_dict(),
        num_query_tokens=preset.num_query_tokens, image_token_index=image_token_index,
        initializer_range=preset.initializer_range,
    )  # fmt: skip
    return Blip2ForConditionalGeneration(config).eval()


def save_blip_2(preset: Blip2Preset, directory: Path) -> None:
    """Model, processor (tokenizer with <image>, image processor) and generation config."""
    from transformers import Blip2Processor, BlipImageProcessorPil, GenerationConfig

    size = {"height": preset.image_size, "width": preset.image_size}
    # The processor adds "<image>" as one more token: the words leave it the vocabulary's last id.
    tokenizer = opt_word_tokenizer(preset.vocab_size - 1)
    processor = Blip2Processor(
        BlipImageProcessorPil(size=size, do_convert_rgb=True),
        tokenizer,
        num_query_tokens=preset.num_query_tokens,
    )
    image_token_index = processor.tokenizer.convert_tokens_to_ids("<image>")
    build_blip_2(preset, image_token_index).save_pretrained(directory)
    processor.save_pretrained(directory)
    processor.image_processor.save_pretrained(directory)  # preprocessor_config.json, as hub checkpoints ship
    GenerationConfig(bos_token_id=2, eos_token_id=2, pad_token_id=1).save_pretrained(directory)
