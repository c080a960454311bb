"""Tiny seeded models, tokenizers and processors built in-process (nothing downloads in tests).

path = save_tiny_vit_gpt2(tmp_path, TINY_VIT_GPT2["a"])   # a directory like save_pretrained writes
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from modelkiln.benchmarks.captioning import presets

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
    return presets.word_tokenizer(len(SPECIALS) + len(WORDS))


def build_tiny_vit_gpt2(sizes: TinyViTGPT2):
    """The same builder the benchmark presets use, at these sizes (ViT: 2 layers, MLP twice as wide)."""
    preset = presets.Preset(
        image_size=sizes.image_size,
        patch_size=sizes.patch_size,
        vit_hidden=sizes.vit_hidden,
        vit_layers=2,
        vit_heads=sizes.vit_heads,
        vit_intermediate=2 * sizes.vit_hidden,
        gpt_hidden=sizes.gpt_hidden,
        gpt_layers=sizes.gpt_layers,
        gpt_heads=sizes.gpt_heads,
        vocab_size=len(SPECIALS) + len(WORDS),
        positions=40,
        # Wide init makes random logits peaked and image-dependent, so captions vary and hit EOS sometimes.
        initializer_range=0.3,
        seed=sizes.seed,
        inverse_layer_scale=sizes.inverse_layer_scale,
    )
    return presets.build_model(preset)


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
        # Random weights sometimes put EOS first; an empty caption fails validation by design, so the
        # tiny models always say something (PyTorch and the runtime both honour it).
        min_new_tokens=2,
        num_beams=sizes.num_beams,
    ).save_pretrained(directory)
    return directory


# --- BLIP-2 (OPT language model) ----------------------------------------------------------------------------

BLIP2_CORPUS = [
    "a cat sitting on a red chair next to the window",
    "two dogs play with a ball in the green park",
    "question: what is in the picture? answer: a small boat on the water",
    "a man riding a bike down the street at night",
    "the blue sky above a tall building and some trees",
]
OPT_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]  # OPT's ids 0..3; "</s>" is both BOS and EOS


@dataclass(frozen=True)
class TinyBlip2:
    """Sizes of one tiny BLIP-2; two differ in query count, widths, depth and OPT's layer-norm placement."""

    image_size: int  # vision input side; the processor resizes to it
    patch_size: int  # vision patch side: sets the Q-Former's cross-attention length
    vision_hidden: int  # vision width
    qformer_hidden: int  # Q-Former width; language_projection maps it to opt_hidden
    qformer_layers: int  # Q-Former depth
    cross_attention_frequency: int  # Q-Former layers with image cross-attention: every n-th
    num_query_tokens: int  # query embeddings put in front of the prompt
    opt_hidden: int  # OPT width
    opt_heads: int  # OPT heads: changes the KV cache shape
    opt_layers: int  # OPT layers: changes the number of cache tensors
    layer_norm_before: bool  # OPT's do_layer_norm_before (False: the 350m post-norm layout, no final norm)
    seed: int  # torch seed of the weights


TINY_BLIP2 = {
    "a": TinyBlip2(32, 8, 32, 32, 1, 1, 4, 48, 4, 2, True, 0),
    "b": TinyBlip2(48, 16, 48, 40, 2, 2, 6, 64, 8, 3, False, 1),
}


def byte_bpe_tokenizer():
    """A GPT-2-style byte-level BPE trained here, with OPT's specials and its BOS-only post-processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=OPT_SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(BLIP2_CORPUS, trainer)
    # OPT's tokenizer prepends "</s>" (its BOS) to every text and appends nothing.
    tokenizer.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def tiny_blip2_processor(sizes: TinyBlip2):
    from transformers import Blip2Processor, BlipImageProcessorPil

    size = {"height": sizes.image_size, "width": sizes.image_size}
    images = BlipImageProcessorPil(size=size, do_convert_rgb=True)
    # The processor adds "<image>" to the tokenizer as a special token: its id is the model's image token.
    return Blip2Processor(images, byte_bpe_tokenizer(), num_query_tokens=sizes.num_query_tokens)


def build_tiny_blip2(sizes: TinyBlip2, vocab_size: int, image_token_index: int):
    from transformers import Blip2Config, Blip2ForConditionalGeneration, OPTConfig

    torch.manual_seed(sizes.seed)
    vision = {
        "image_size": sizes.image_size,
        "patch_size": sizes.patch_size,
        "hidden_size": sizes.vision_hidden,
        "intermediate_size": 2 * sizes.vision_hidden,
        "num_hidden_layers": 1,  # one layer exercises the graph; more only slow the export down
        "num_attention_heads": 4,
    }
    qformer = {
        "hidden_size": sizes.qformer_hidden,
        "intermediate_size": 2 * sizes.qformer_hidden,
        "num_hidden_layers": sizes.qformer_layers,
        "num_attention_heads": 4,
        "encoder_hidden_size": sizes.vision_hidden,
        "cross_attention_frequency": sizes.cross_attention_frequency,
    }
    text = OPTConfig(
        vocab_size=vocab_size,
        hidden_size=sizes.opt_hidden,
        word_embed_proj_dim=sizes.opt_hidden,
        num_hidden_layers=sizes.opt_layers,
        num_attention_heads=sizes.opt_heads,
        ffn_dim=2 * sizes.opt_hidden,
        max_position_embeddings=64,
        do_layer_norm_before=sizes.layer_norm_before,
        # Wide init makes random logits peaked and image-dependent, so captions vary and hit EOS sometimes.
        init_std=0.3,
        bos_token_id=2,
        eos_token_id=2,
        pad_token_id=1,
    )
    config = Blip2Config(
        vision_config=vision,
        qformer_config=qformer,
        text_config=text.to_dict(),
        num_query_tokens=sizes.num_query_tokens,
        image_token_index=image_token_index,
        initializer_range=0.3,
    )
    return Blip2ForConditionalGeneration(config).eval()


def save_tiny_blip2(directory: Path, sizes: TinyBlip2) -> Path:
    from transformers import GenerationConfig

    directory.mkdir(parents=True, exist_ok=True)
    processor = tiny_blip2_processor(sizes)
    tokenizer = processor.tokenizer
    image_token_index = tokenizer.convert_tokens_to_ids("<image>")
    build_tiny_blip2(sizes, len(tokenizer), image_token_index).save_pretrained(directory)
    processor.save_pretrained(directory)
    processor.image_processor.save_pretrained(directory)  # preprocessor_config.json, as hub checkpoints ship
    GenerationConfig(bos_token_id=2, eos_token_id=2, pad_token_id=1, max_length=30).save_pretrained(directory)
    return directory


# --- BLIP (BERT-style text decoder) -------------------------------------------------------------------------

BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]  # [DEC] is BLIP's decoder bos
BLIP_WORDS = ["a", "photography", "of", "picture", "the", ".", "##s", *(f"w{i}" for i in range(30))]


@dataclass(frozen=True)
class TinyBlip:
    """Sizes of one tiny BLIP; two differ in image and patch size, widths, head counts and depth."""

    image_size: int  # vision input side; the processor resizes to it
    patch_size: int  # vision patch side: sets the cross-attention length
    vision_hidden: int  # vision width: the text decoder's cross-attention key/value input width
    vision_heads: int  # vision attention heads
    text_hidden: int  # text decoder width
    text_heads: int  # text decoder heads: changes the KV cache shape
    text_layers: int  # text decoder layers: changes the number of cache tensors
    nested_processor: bool  # save only BlipProcessor's processor_config.json (image processor nested in it)
    seed: int  # torch seed of the weights


TINY_BLIP = {
    "a": TinyBlip(32, 8, 32, 4, 48, 4, 2, True, 0),
    "b": TinyBlip(48, 16, 64, 2, 64, 8, 3, False, 1),
}


def bert_wordpiece_tokenizer():
    """A lower-casing BERT WordPiece tokenizer ([CLS] text [SEP]) with BLIP's [DEC] as its bos token."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast

    vocab = {token: i for i, token in enumerate(BERT_SPECIALS + BLIP_WORDS)}
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    return BertTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="[DEC]",
        unk_token="[UNK]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        mask_token="[MASK]",
    )


def build_tiny_blip(sizes: TinyBlip):
    from transformers import BlipConfig, BlipForConditionalGeneration

    torch.manual_seed(sizes.seed)
    vision = {
        "image_size": sizes.image_size,
        "patch_size": sizes.patch_size,
        "hidden_size": sizes.vision_hidden,
        "intermediate_size": 2 * sizes.vision_hidden,
        "num_hidden_layers": 2,
        "num_attention_heads": sizes.vision_heads,
        "initializer_range": 0.3,
    }
    text = {
        "vocab_size": len(BERT_SPECIALS) + len(BLIP_WORDS),
        "hidden_size": sizes.text_hidden,
        "encoder_hidden_size": sizes.vision_hidden,
        "intermediate_size": 2 * sizes.text_hidden,
        "num_hidden_layers": sizes.text_layers,
        "num_attention_heads": sizes.text_heads,
        "max_position_embeddings": 40,
        # Wide init makes random logits peaked and image-dependent, so captions vary and hit [SEP] sometimes.
        "initializer_range": 0.3,
        "pad_token_id": 0,
        "sep_token_id": 3,
        "bos_token_id": 5,
        "eos_token_id": 3,
    }
    config = BlipConfig(vision_config=vision, text_config=text, initializer_range=0.3)
    return BlipForConditionalGeneration(config).eval()


def save_tiny_blip(directory: Path, sizes: TinyBlip) -> Path:
    from transformers import BlipImageProcessorPil, BlipProcessor

    directory.mkdir(parents=True, exist_ok=True)
    build_tiny_blip(sizes).save_pretrained(directory)
    size = {"height": sizes.image_size, "width": sizes.image_size}
    images = BlipImageProcessorPil(size=size)
    if sizes.nested_processor:
        # transformers 5 writes processor_config.json with the image processor nested in it.
        BlipProcessor(image_processor=images, tokenizer=bert_wordpiece_tokenizer()).save_pretrained(directory)
    else:
        bert_wordpiece_tokenizer().save_pretrained(directory)
        images.save_pretrained(directory)  # preprocessor_config.json, as hub checkpoints ship
    return directory


# --- Checkpoint layouts ------------------------------------------------------------------------------------

# How a captioner's processor is saved beside its weights. "legacy": as hub checkpoints ship it, the image
# processor's own preprocessor_config.json beside the tokenizer files (and, as transformers 4 wrote for
# processors with settings of their own such as BLIP-2's num_query_tokens, a processor_config.json holding
# only those). "transformers-5": what transformers 5's processor.save_pretrained writes, one
# processor_config.json with the image processor nested in it, beside the tokenizer files.
LAYOUTS = ("legacy", "transformers-5")
# What save_tiny_* functions write for the model itself; everything else they write is the processor's.
MODEL_FILES = frozenset({"config.json", "generation_config.json", "model.safetensors"})


def tiny_vit_gpt2_processor(sizes: TinyViTGPT2):
    """TrOCRProcessor: transformers' processor for VisionEncoderDecoderModel captioners (any tokenizer)."""
    from transformers import TrOCRProcessor, ViTImageProcessorPil

    size = {"height": sizes.image_size, "width": sizes.image_size}
    images = ViTImageProcessorPil(size=size, do_convert_rgb=True)
    return TrOCRProcessor(image_processor=images, tokenizer=word_tokenizer())


def tiny_blip_processor(sizes: TinyBlip):
    from transformers import BlipImageProcessorPil, BlipProcessor

    size = {"height": sizes.image_size, "width": sizes.image_size}
    return BlipProcessor(
        image_processor=BlipImageProcessorPil(size=size), tokenizer=bert_wordpiece_tokenizer()
    )


def save_processor_in_layout(directory: Path, processor, layout: str) -> Path:
    """Replace the processor files in ``directory`` (a save_tiny_* folder) by ``processor`` saved in ``layout``."""
    import json

    for path in directory.iterdir():
        if path.name not in MODEL_FILES:
            path.unlink()
    if layout == "transformers-5":
        processor.save_pretrained(directory)
        return directory
    processor.image_processor.save_pretrained(directory)  # preprocessor_config.json
    processor.tokenizer.save_pretrained(directory)
    # transformers 4 wrote processor_config.json only for settings beyond the sub-processors.
    own = {
        k: v
        for k, v in processor.to_dict().items()
        if k not in (*processor.get_attributes(), "processor_class")
    }
    if own:
        own["processor_class"] = type(processor).__name__
        (directory / "processor_config.json").write_text(json.dumps(own, indent=2) + "\n")
    return directory


def save_tiny_captioner(directory: Path, family: str, layout: str) -> Path:
    """A tiny checkpoint of a captioning family (config "a") with its processor saved in ``layout``."""
    savers = {
        "vit-gpt2": (save_tiny_vit_gpt2, TINY_VIT_GPT2["a"], tiny_vit_gpt2_processor),
        "blip": (save_tiny_blip, TINY_BLIP["a"], tiny_blip_processor),
        "blip-2": (save_tiny_blip2, TINY_BLIP2["a"], tiny_blip2_processor),
    }
    save, sizes, processor = savers[family]
    return save_processor_in_layout(save(directory, sizes), processor(sizes), layout)
