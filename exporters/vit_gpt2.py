"""ViT-GPT2 captioning (``VisionEncoderDecoderModel``: ViT encoder, GPT-2 decoder with cross-attention).

Two graphs, so generation never recomputes what it already knows:

- ``encoder``: pixel_values -> the cross-attention keys and values of every decoder layer. They depend
  only on the image, so they are computed once per image and reused by every decoding step.
- ``decoder``: one decoding step with a self-attention KV cache (a buffer written in place, or a past
  that grows: see ``decoding``). The first step feeds the start token, later steps one token each.

Used by ``modelkiln.exporters.export.export_model``; see that module for the call.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from modelkiln.exporters import decoding
from modelkiln.exporters.decoding import (
    SPARE_POSITIONS,
    CacheShape,
    buffered_cache,
    cache_names,
    cross_attention_components,
    empty_past,
    load_captioner,
    merge_heads,
    save_text_files,
    split_heads,
    step_context,
)
from modelkiln.exporters.kv_attention import buffer_attention, cross_attention
from modelkiln.exporters.onnx_export import Component
from modelkiln.exporters.source import Source
from modelkiln.exporters.targets import Target


def load_model(source: Source, trust_remote_code: bool = False) -> nn.Module:
    from transformers import VisionEncoderDecoderModel

    return load_captioner(source, VisionEncoderDecoderModel, trust_remote_code)


def _attend(q, k, v, scale: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, H, T, S]
    if mask is not None:
        scores = scores + mask
    return torch.matmul(scores.softmax(dim=-1), v)  # [B, H, T, hd]


def _attention_scale(config, layer_idx: int) -> float:
    # Mirrors GPT2Attention: both flags are real GPT-2 config options, off in some fine-tunes.
    scale = (config.n_embd // config.n_head) ** -0.5 if config.scale_attn_weights else 1.0
    if config.scale_attn_by_inverse_layer_idx:
        scale /= float(layer_idx + 1)
    return scale


class ViTCrossKVEncoder(nn.Module):
    """Image -> per-layer cross-attention keys and values of the GPT-2 decoder."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.encoder = model.encoder
        # VisionEncoderDecoderModel projects encoder states only when the widths differ.
        self.projection = getattr(model, "enc_to_dec_proj", None) or nn.Identity()
        self.blocks = model.decoder.transformer.h
        self.num_heads = model.decoder.config.n_head

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        states = self.projection(self.encoder(pixel_values=pixel_values).last_hidden_state)
        outputs = []
        for block in self.blocks:
            key, value = block.crossattention.c_attn(states).split(states.shape[-1], dim=2)
            outputs += [split_heads(key, self.num_heads), split_heads(value, self.num_heads)]
        return tuple(outputs)


class GPT2CachedDecoderStep(nn.Module):
    """One GPT-2 decoding step: new tokens + self-attention past + cross K/V -> last logits + present."""

    def __init__(self, model: nn.Module, buffered: bool):
        super().__init__()
        lm = model.decoder
        self.transformer = lm.transformer
        self.lm_head = lm.lm_head
        self.num_heads = lm.config.n_head
        self.num_layers = lm.config.n_layer
        self.scales = [_attention_scale(lm.config, i) for i in range(self.num_layers)]
        self.buffered = buffered  # the cache form (exporters.decoding)

    def _self_attention(self, block, hidden, past_key, past_value, context, scale):
        query, key, value = block.attn.c_attn(block.ln_1(hidden)).split(hidden.shape[-1], dim=2)
        if self.buffered:
            out, key, value = buffer_attention(
                query, key, value, past_key, past_value, *context, self.num_heads, scale
            )
            return block.attn.c_proj(out), key, value
        key = torch.cat([past_key, split_heads(key, self.num_heads)], dim=2)
        value = torch.cat([past_value, split_heads(value, self.num_heads)], dim=2)
        out = _attend(split_heads(query, self.num_heads), key, value, scale, context)
        return block.attn.c_proj(merge_heads(out)), key, value

    def _cross_attention(self, block, hidden, cross_key, cross_value, scale):
        query = block.crossattention.q_attn(block.ln_cross_attn(hidden))
        if self.buffered:
            return block.crossattention.c_proj(
                cross_attention(query, cross_key, cross_value, self.num_heads, scale)
            )
        out = _attend(split_heads(query, self.num_heads), cross_key, cross_value, scale)
        return block.crossattention.c_proj(merge_heads(out))

    def forward(self, input_ids, attention_mask, position_ids, *cache: torch.Tensor):
        past, cross = cache[: 2 * self.num_layers], cache[2 * self.num_layers :]
        hidden = self.transformer.wte(input_ids) + self.transformer.wpe(position_ids)  # [B, T, D]
        mask = step_context(self.buffered, attention_mask, input_ids.shape[1], past[0].shape[2])
        presents = []
        for i, block in enumerate(self.transformer.h):
            attn, key, value = self._self_attention(
                block, hidden, past[2 * i], past[2 * i + 1], mask, self.scales[i]
            )
            hidden = hidden + attn
            hidden = hidden + self._cross_attention(
                block, hidden, cross[2 * i], cross[2 * i + 1], self.scales[i]
            )
            hidden = hidden + block.mlp(block.ln_2(hidden))
            presents += [key, value]
        logits = self.lm_head(self.transformer.ln_f(hidden[:, -1]))  # [B, V]: generation needs the last only
        return (logits, *presents)


def _image_shape(model: nn.Module) -> tuple[int, int, int]:
    config = model.config.encoder
    size = config.image_size if isinstance(config.image_size, (list, tuple)) else (config.image_size,) * 2
    return (config.num_channels, *size)


def _cache(model: nn.Module) -> CacheShape:
    config = model.decoder.config
    return CacheShape(config.n_layer, config.n_head, config.n_embd // config.n_head)


def build_components(model: nn.Module, target: Target) -> list[Component]:
    """The encoder and the cached decoder step for ``target``, with example inputs and dynamic axes."""
    pixel_values = torch.rand(2, *_image_shape(model))
    buffered = buffered_cache(target, _cache(model))
    step = GPT2CachedDecoderStep(model, buffered)
    # Fused attention: ViT-B/16 at 224 px, 1.07x fp32 and 1.19x int8 per encoder call (see
    # benchmarks/results/vit-gpt2-full/notes.md).
    return cross_attention_components(
        ViTCrossKVEncoder(model), step, pixel_values, _cache(model), model.decoder.config.vocab_size,
        positions=True, buffered=buffered, fuse_encoder_attention=target.fuse_attention,
    )  # fmt: skip


def runtime_config(model: nn.Module) -> dict:
    """What the runtime needs beyond the graphs: the decoder's cache layout and start token."""
    decoder = model.decoder.config
    return {
        "decoder_start_token_id": model.config.decoder_start_token_id,
        "num_layers": decoder.n_layer,
        "num_heads": decoder.n_head,
        "head_dim": decoder.n_embd // decoder.n_head,
        "max_positions": decoder.n_positions,
    }


def save_runtime_files(source: Source, model: nn.Module, directory: Path) -> None:
    """Tokenizer, image processor and generation config: what makes the artifact self-contained."""
    save_text_files(source, directory, fallback_config=model.config)


def validation_cases(
    model: nn.Module, pixel_values: torch.Tensor, target: Target
) -> list[tuple[str, str, dict[str, torch.Tensor]]]:
    """Realistic inputs per component: real images, then a first and a later decoding step."""
    encoder, decoder = (component.module for component in build_components(model, target))
    layers = model.decoder.config.n_layer
    batch = pixel_values.shape[0]
    with torch.no_grad():
        cross = dict(zip(cache_names("cross_attention", layers), encoder(pixel_values), strict=True))
    start = torch.full((batch, 1), model.config.decoder_start_token_id, dtype=torch.int64)
    first = {
        "input_ids": start,
        "attention_mask": torch.ones(batch, 1, dtype=torch.int64),
        "position_ids": torch.zeros(batch, 1, dtype=torch.int64),
        **empty_past(batch, _cache(model), 2 + SPARE_POSITIONS, buffered_cache(target, _cache(model))),
        **cross,
    }
    with torch.no_grad():
        _, *present = decoder(*first.values())
    later = {
        **first,
        "input_ids": torch.randint(0, model.decoder.config.vocab_size, (batch, 1)),
        "attention_mask": torch.ones(batch, 2, dtype=torch.int64),
        "position_ids": torch.ones(batch, 1, dtype=torch.int64),
        **dict(zip(cache_names("past_key_values", layers), present, strict=True)),
    }
    return [
        ("encoder", "images", {"pixel_values": pixel_values}),
        ("decoder", "first step", first),
        ("decoder", "second step", later),
    ]


def torch_captions(
    model: nn.Module, pixel_values: torch.Tensor, prompt: str | None, **generation
) -> list[list[int]]:
    """PyTorch ``generate`` tokens after the start token: what the artifact must match."""
    if prompt is not None:
        raise ValueError("vit-gpt2 captions without a prompt")
    with torch.no_grad():
        sequences = model.generate(pixel_values=pixel_values, **generation)
    return [[int(t) for t in row[1:]] for row in sequences]


# The validator runs PyTorch on images prepared by the model's own processor, alike for every family.
reference_processor = decoding.reference_processor
