"""Pieces every cached-decoder family shares: head reshapes, cache tensor names and their axes.

Family files (``vit_gpt2.py``, ``blip.py``, ``blip_2.py``) build their step modules from these so the
runtime sees one naming scheme: ``past_key_values.{i}.key|value`` in, ``present.{i}.key|value`` out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .onnx_export import Component
from .source import (
    Source,
    check_model_class,
    image_processor_config,
    load_pretrained,
    save_image_processor_config,
)


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    batch, seq, width = x.shape
    # [B, S, D] -> [B, H, S, D/H]
    return x.view(batch, seq, num_heads, width // num_heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    batch, heads, seq, head_dim = x.shape
    # [B, H, S, hd] -> [B, S, H*hd]
    return x.transpose(1, 2).reshape(batch, seq, heads * head_dim)


def causal_mask(attention_mask: torch.Tensor, new: int, past: int) -> torch.Tensor:
    """Additive mask [B, 1, T, P+T] of a decoder step: each of the ``new`` tokens sees the ``past`` ones
    and itself, and no padded position (0 where allowed, the float32 minimum elsewhere)."""
    query_pos = torch.arange(new, device=attention_mask.device) + past
    key_pos = torch.arange(past + new, device=attention_mask.device)
    causal = key_pos[None, :] <= query_pos[:, None]  # [T, P+T]
    allowed = causal[None, None] & attention_mask[:, None, None, :].bool()  # [B, 1, T, P+T]
    zero = torch.zeros((), dtype=torch.float32)
    return torch.where(allowed, zero, torch.finfo(torch.float32).min)


def cache_names(prefix: str, layers: int) -> list[str]:
    """``prefix.0.key, prefix.0.value, prefix.1.key, ...``: one name per layer and kind."""
    return [f"{prefix}.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


def cache_axes(layers: int) -> dict[str, dict[int, str]]:
    """Dynamic axes of the self-attention cache: the past grows into the present each step."""
    return {
        **{name: {0: "batch", 2: "past_sequence"} for name in cache_names("past_key_values", layers)},
        **{name: {0: "batch", 2: "total_sequence"} for name in cache_names("present", layers)},
    }


@dataclass(frozen=True)
class CacheShape:
    """Self-attention cache layout of a decoder."""

    layers: int  # decoder layers, one key and one value tensor each
    heads: int  # attention heads per layer
    head_dim: int  # width of one head


def cross_attention_components(
    encoder: nn.Module,
    decoder: nn.Module,
    pixel_values: torch.Tensor,
    cache: CacheShape,
    vocab_size: int,
    positions: bool,
    fuse_encoder_attention: bool = False,
) -> list[Component]:
    """Encoder (image -> per-layer cross K/V) and cached decoder step, for cross-attention captioners.

    ``positions``: whether the decoder step takes ``position_ids`` (GPT-2) or derives them (BLIP).
    ``fuse_encoder_attention``: the encoder's attention is SDPA the fusion matches (ViT; BLIP's is not).
    """
    cross_names = cache_names("cross_attention", cache.layers)
    with torch.no_grad():
        cross = encoder(pixel_values)
    batch, new, past = 2, 3, 4  # distinct sizes >1, so the tracer keeps every axis symbolic
    decoder_inputs = {
        "input_ids": torch.randint(0, vocab_size, (batch, new)),
        "attention_mask": torch.ones(batch, past + new, dtype=torch.int64),
        **({"position_ids": torch.arange(past, past + new).repeat(batch, 1)} if positions else {}),
        **{
            name: torch.randn(batch, cache.heads, past, cache.head_dim)
            for name in cache_names("past_key_values", cache.layers)
        },
        # Encoder outputs are transposed views; the tracer needs plain strides.
        **{name: tensor.contiguous() for name, tensor in zip(cross_names, cross, strict=True)},
    }
    batch_axis = {0: "batch"}
    decoder_axes = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "total_sequence"},
        **({"position_ids": {0: "batch", 1: "sequence"}} if positions else {}),
        "logits": batch_axis,
        **cache_axes(cache.layers),
        **{name: batch_axis for name in cross_names},
    }
    return [
        Component(
            name="encoder",
            module=encoder,
            example_inputs={"pixel_values": pixel_values},
            output_names=tuple(cross_names),
            dynamic_axes={"pixel_values": batch_axis, **{name: batch_axis for name in cross_names}},
            fuse_attention=fuse_encoder_attention,
        ),
        Component(
            name="decoder",
            module=decoder,
            example_inputs=decoder_inputs,
            output_names=("logits", *cache_names("present", cache.layers)),
            dynamic_axes=decoder_axes,
        ),
    ]


def load_captioner(source: Source, model_class, trust_remote_code: bool) -> nn.Module:
    """The captioner in fp32 eval mode, after the checks that need no weights: the architecture, then the
    image processor settings the artifact ships, so a wrong checkpoint fails before minutes of loading."""
    check_model_class(source, model_class)
    image_processor_config(source)
    return load_pretrained(source, model_class, trust_remote_code)


def save_processor_files(source: Source, directory: Path) -> None:
    """Tokenizer and image processor config, from either checkpoint layout: every captioner ships them."""
    from transformers import AutoTokenizer

    # Saving through transformers always writes tokenizer.json, which the torch-free runtime reads.
    AutoTokenizer.from_pretrained(source.path).save_pretrained(directory)
    save_image_processor_config(source, directory)


def save_text_files(source: Source, directory: Path, fallback_config) -> None:
    """Tokenizer, image processor config and generation config: what makes an artifact self-contained.

    ``fallback_config`` gives the generation defaults of older checkpoints without generation_config.json.
    """
    from transformers import GenerationConfig

    save_processor_files(source, directory)
    try:
        generation = GenerationConfig.from_pretrained(source.path)
    except OSError:  # older checkpoints keep their generation defaults in config.json only
        generation = GenerationConfig.from_model_config(fallback_config)
    generation.save_pretrained(directory)


def reference_processor(source: Source):
    """The model's own image processor, to preprocess validation images on the PyTorch side."""
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(source.path)
