"""Pieces every cached-decoder family shares: head reshapes, cache tensor names and their axes.

Family files (``vit_gpt2.py``, ``blip.py``, ``blip_2.py``) build their step modules from these so the
runtime sees one naming scheme: ``past_key_values.{i}.key|value`` in, ``present.{i}.key|value`` out.

The cache takes one of two forms, chosen by the export target (``buffered_cache``):

- a buffer (onnxruntime target): ``past`` and ``present`` are the same [B, H, capacity, hd] buffer, which
  the runtime allocates once per request and binds as both; the step writes its tokens in place
  (``kv_attention.buffer_attention``, onnxruntime's GroupQueryAttention) and cross-attention is fused too.
- a growing past (portable and tensorrt targets, standard ops only): ``present`` is ``past`` with the new
  tokens concatenated, [B, H, past + new, hd], and attention is plain MatMul/Softmax.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from modelkiln.manifest import CAPACITY_AXIS

from .kv_attention import merge_heads, split_heads  # noqa: F401 (families import them from here)
from .onnx_export import Component
from .source import (
    Source,
    check_model_class,
    image_processor_config,
    load_pretrained,
    save_image_processor_config,
)
from .targets import Target


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


# onnxruntime's GroupQueryAttention CPU kernel takes head sizes that are multiples of 8 (the real
# captioners' are: GPT-2 and BLIP 64, OPT-2.7B 80); other decoders keep a growing past on every target.
BUFFER_HEAD_MULTIPLE = 8


def buffered_cache(target: Target, cache: CacheShape) -> bool:
    """Whether a decoder exported for ``target`` keeps its cache in a buffer written in place."""
    return target.buffered_cache and cache.head_dim % BUFFER_HEAD_MULTIPLE == 0


def cache_axes(layers: int, buffered: bool) -> dict[str, dict[int, str]]:
    """Dynamic axes of the self-attention cache: one capacity for a buffer, or a past that grows into
    the present each step."""
    past, present = (CAPACITY_AXIS, CAPACITY_AXIS) if buffered else ("past_sequence", "total_sequence")
    return {
        **{name: {0: "batch", 2: past} for name in cache_names("past_key_values", layers)},
        **{name: {0: "batch", 2: present} for name in cache_names("present", layers)},
    }


def example_past(batch: int, cache: CacheShape, past: int, buffered: bool) -> dict[str, torch.Tensor]:
    """Tracing inputs for the cache: ``past`` tokens, or when buffered a buffer with room to spare (a size
    distinct from every other axis, so the tracer keeps the capacity symbolic)."""
    length = past + 5 if buffered else past
    return {
        name: torch.randn(batch, cache.heads, length, cache.head_dim)
        for name in cache_names("past_key_values", cache.layers)
    }


# Validation buffers hold this many positions beyond what the cases fill: the untouched rows must come
# back unchanged from the graph, as from PyTorch.
SPARE_POSITIONS = 3


def empty_past(batch: int, cache: CacheShape, capacity: int, buffered: bool) -> dict[str, torch.Tensor]:
    """The cache before the first step: an empty past, or a zeroed buffer of ``capacity`` positions."""
    length = capacity if buffered else 0
    return {
        name: torch.zeros(batch, cache.heads, length, cache.head_dim)
        for name in cache_names("past_key_values", cache.layers)
    }


def past_length(buffered: bool, attention_mask: torch.Tensor, new_tokens: int, past: torch.Tensor):
    """Tokens before this step: a buffer's length is its capacity, so the mask counts them there."""
    return attention_mask.shape[1] - new_tokens if buffered else past.shape[2]


def step_context(
    buffered: bool, attention_mask: torch.Tensor, new_tokens: int, past_length
) -> tuple | torch.Tensor:
    """What a step's self-attention takes beside its tokens: the buffer inputs, or the causal mask."""
    if buffered:
        return buffer_step(attention_mask, new_tokens)
    return causal_mask(attention_mask, new_tokens, past_length)


class BufferStep(NamedTuple):
    """Inputs ``buffer_attention`` takes beside the tokens, derived in the graph from the attention mask."""

    seqlens_k: torch.Tensor  # int32 [B]: index of every row's last token (total - 1)
    total_length: torch.Tensor  # int32 []: tokens in the buffer after this step
    bias: torch.Tensor  # float32 [B, 1, new, total]: 0 where attended, the float32 minimum on left padding


def buffer_step(attention_mask: torch.Tensor, new_tokens: int) -> BufferStep:
    """The step's buffer inputs. Prompts are padded on the left, so every row ends at the same position."""
    total = attention_mask.shape[1]
    last = (attention_mask[:, 0] * 0 + (total - 1)).to(torch.int32)  # [B]
    blocked = torch.finfo(torch.float32).min
    bias = torch.where(attention_mask.bool(), 0.0, blocked)[:, None, None, :].expand(-1, 1, new_tokens, -1)
    return BufferStep(last, (attention_mask.new_ones(()) * total).to(torch.int32), bias)


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
    buffered: bool,
    fuse_encoder_attention: bool = False,
) -> list[Component]:
    """Encoder (image -> per-layer cross K/V) and cached decoder step, for cross-attention captioners.

    ``positions``: whether the decoder step takes ``position_ids`` (GPT-2) or derives them (BLIP).
    ``buffered``: the decoder's cache form (see the module docstring); the step module must match it.
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
        **example_past(batch, cache, past, buffered),
        # Encoder outputs are transposed views; the tracer needs plain strides.
        **{name: tensor.contiguous() for name, tensor in zip(cross_names, cross, strict=True)},
    }
    batch_axis = {0: "batch"}
    decoder_axes = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "total_sequence"},
        **({"position_ids": {0: "batch", 1: "sequence"}} if positions else {}),
        "logits": batch_axis,
        **cache_axes(cache.layers, buffered),
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
