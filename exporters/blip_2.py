"""BLIP-2 with an OPT language model (``Blip2ForConditionalGeneration``, e.g. ``Salesforce/blip2-opt-2.7b``).

Two graphs:

- ``encoder``: pixel_values -> ``prefix_embeds`` [B, num_query_tokens, D]: the vision model, the Q-Former
  over its output and the language projection, i.e. the embeddings transformers puts where the prompt
  holds its ``num_query_tokens`` image tokens. Computed once per image.
- ``decoder``: one OPT step with a KV cache (a buffer written in place, or a past that grows: see
  ``decoding``). It embeds ``input_ids`` with the OPT embedding (tied to the
  lm_head, so the 500 MB matrix is stored once) and puts ``prefix_embeds`` in front of them. The first
  step feeds the query embeddings and the ids after the image tokens (BOS and the prompt); later steps
  feed one token and an empty prefix [B, 0, D].

transformers 5 ``generate`` prompts OPT with ``[image token] * num_query_tokens + BOS + prompt`` (the image
tokens first, before BOS) and returns that prompt followed by the new tokens; the runtime feeds the same
sequence and counts the same length.

Used by ``modelkiln.exporters.export.export_model``; see that module for the call.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import nn

from modelkiln.errors import UnsupportedModelError
from modelkiln.exporters import decoding
from modelkiln.exporters.decoding import (
    SPARE_POSITIONS,
    CacheShape,
    buffered_cache,
    cache_axes,
    cache_names,
    empty_past,
    example_past,
    load_captioner,
    merge_heads,
    past_length,
    save_text_files,
    split_heads,
    step_context,
)
from modelkiln.exporters.kv_attention import buffer_attention
from modelkiln.exporters.onnx_export import Component
from modelkiln.exporters.source import Source
from modelkiln.exporters.targets import Target


def load_model(source: Source, trust_remote_code: bool = False) -> nn.Module:
    from transformers import Blip2ForConditionalGeneration

    model = load_captioner(source, Blip2ForConditionalGeneration, trust_remote_code)
    _check_supported(model.config)
    return model


def _check_supported(config) -> None:
    text = config.text_config
    if text.model_type != "opt":
        raise UnsupportedModelError(
            f"the blip-2 family exports BLIP-2 with an OPT language model, this one has {text.model_type!r}. "
            "Pick a blip2-opt checkpoint (e.g. Salesforce/blip2-opt-2.7b)."
        )
    if text.word_embed_proj_dim != text.hidden_size:
        # Blip2ForConditionalGeneration scatters hidden_size-wide query embeddings into word-embedding-wide
        # inputs; with different widths transformers itself computes garbage, so there is nothing to match.
        raise UnsupportedModelError(
            f"OPT word_embed_proj_dim ({text.word_embed_proj_dim}) differs from hidden_size "
            f"({text.hidden_size}), which BLIP-2 does not support. Use a checkpoint where they are equal."
        )


class Blip2QueryEncoder(nn.Module):
    """Image -> query embeddings in OPT's input space: vision model, Q-Former, language projection."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.vision_model = model.vision_model
        self.query_tokens = model.query_tokens
        self.qformer = model.qformer
        self.language_projection = model.language_projection

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor]:
        image_embeds = self.vision_model(pixel_values).last_hidden_state  # [B, patches+1, Dv]
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.int64)
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)  # [B, N, Dq]
        query_output = self.qformer(
            query_embeds=queries, encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask
        ).last_hidden_state
        # A one-tuple, like every component's outputs, so callers can zip them with the output names.
        return (self.language_projection(query_output),)  # [B, N, D]


class OPTPrefixDecoderStep(nn.Module):
    """One OPT step: prefix embeddings + new tokens + past -> last logits + present.

    Mirrors ``OPTDecoder`` and ``OPTDecoderLayer`` of transformers 5 over the same submodules (no copied
    weights), with the cache as explicit tensors so the graph has a fixed signature.
    """

    def __init__(self, model: nn.Module, buffered: bool):
        super().__init__()
        self.buffered = buffered  # the cache form (exporters.decoding)
        lm = model.language_model
        decoder = lm.model.decoder
        config = lm.config
        self.embed_tokens = decoder.embed_tokens
        self.embed_positions = decoder.embed_positions
        self.project_in = decoder.project_in or nn.Identity()
        self.project_out = decoder.project_out or nn.Identity()
        self.final_layer_norm = decoder.final_layer_norm or nn.Identity()
        self.layers = decoder.layers
        self.lm_head = lm.lm_head
        self.num_heads = config.num_attention_heads
        self.num_layers = config.num_hidden_layers
        self.layer_norm_before = config.do_layer_norm_before

    def _positions(self, attention_mask: torch.Tensor, past: int) -> torch.Tensor:
        # OPT counts attended tokens only (left padding gets -1); the embedding adds its offset of 2.
        positions = (torch.cumsum(attention_mask, dim=1) * attention_mask - 1).long()
        return self.embed_positions(attention_mask, past, position_ids=positions[:, past:])  # [B, T, D]

    def _self_attention(self, layer, hidden, past_key, past_value, context):
        attn = layer.self_attn
        # OPT scales the query before the product (not the scores): keep its order for identical floats.
        query = attn.q_proj(hidden) * attn.scaling
        if self.buffered:
            key, value = attn.k_proj(hidden), attn.v_proj(hidden)
            out, key, value = buffer_attention(
                query, key, value, past_key, past_value, *context, self.num_heads, 1.0
            )
            return attn.out_proj(out), key, value
        query = split_heads(query, self.num_heads)
        key = torch.cat([past_key, split_heads(attn.k_proj(hidden), self.num_heads)], dim=2)
        value = torch.cat([past_value, split_heads(attn.v_proj(hidden), self.num_heads)], dim=2)
        scores = torch.matmul(query, key.transpose(-1, -2)) + context  # [B, H, T, P+T]
        out = torch.matmul(scores.softmax(dim=-1), value)  # [B, H, T, hd]
        return attn.out_proj(merge_heads(out)), key, value

    def _layer(self, layer, hidden, past_key, past_value, mask):
        norm_first = self.layer_norm_before  # OPT-350m normalises after each residual instead
        residual = hidden
        attn_in = layer.self_attn_layer_norm(hidden) if norm_first else hidden
        attn, key, value = self._self_attention(layer, attn_in, past_key, past_value, mask)
        hidden = residual + attn
        if not norm_first:
            hidden = layer.self_attn_layer_norm(hidden)
        residual = hidden
        ffn_in = layer.final_layer_norm(hidden) if norm_first else hidden
        hidden = residual + layer.fc2(layer.activation_fn(layer.fc1(ffn_in)))
        if not norm_first:
            hidden = layer.final_layer_norm(hidden)
        return hidden, key, value

    def forward(self, input_ids, prefix_embeds, attention_mask, *past: torch.Tensor):
        embeds = torch.cat([prefix_embeds, self.embed_tokens(input_ids)], dim=1)  # [B, P+T, Dw]
        new = embeds.shape[1]
        before = past_length(self.buffered, attention_mask, new, past[0])
        hidden = self.project_in(embeds) + self._positions(attention_mask, before)  # [B, P+T, D]
        mask = step_context(self.buffered, attention_mask, new, before)
        presents = []
        for i, layer in enumerate(self.layers):
            hidden, key, value = self._layer(layer, hidden, past[2 * i], past[2 * i + 1], mask)
            presents += [key, value]
        last = self.project_out(self.final_layer_norm(hidden[:, -1]))  # generation needs the last only
        return (self.lm_head(last), *presents)  # logits [B, V]


def _image_shape(model: nn.Module) -> tuple[int, int, int]:
    config = model.config.vision_config
    size = config.image_size if isinstance(config.image_size, (list, tuple)) else (config.image_size,) * 2
    # Blip2VisionEmbeddings hard-codes RGB input (its config has no num_channels).
    return (getattr(config, "num_channels", 3), *size)


def _cache_shape(model: nn.Module) -> CacheShape:
    text = model.config.text_config
    return CacheShape(
        text.num_hidden_layers, text.num_attention_heads, text.hidden_size // text.num_attention_heads
    )


def build_components(model: nn.Module, target: Target) -> list[Component]:
    """The query encoder and the cached decoder step for ``target``, with example inputs and dynamic axes."""
    cache = _cache_shape(model)
    buffered = buffered_cache(target, cache)
    text = model.config.text_config
    batch, prefix, new, past = 2, 5, 3, 4  # distinct sizes >1, so the tracer keeps every axis symbolic
    decoder_inputs = {
        "input_ids": torch.randint(0, text.vocab_size, (batch, new)),
        "prefix_embeds": torch.randn(batch, prefix, text.word_embed_proj_dim),
        "attention_mask": torch.ones(batch, past + prefix + new, dtype=torch.int64),
        **example_past(batch, cache, past, buffered),
    }
    batch_axis = {0: "batch"}
    decoder_axes = {
        "input_ids": {0: "batch", 1: "sequence"},
        "prefix_embeds": {0: "batch", 1: "prefix_sequence"},
        "attention_mask": {0: "batch", 1: "total_sequence"},
        "logits": batch_axis,
        **cache_axes(cache.layers, buffered),
    }
    return [
        Component(
            name="encoder",
            module=Blip2QueryEncoder(model),
            example_inputs={"pixel_values": torch.rand(batch, *_image_shape(model))},
            output_names=("prefix_embeds",),
            dynamic_axes={"pixel_values": batch_axis, "prefix_embeds": batch_axis},
        ),
        Component(
            name="decoder",
            module=OPTPrefixDecoderStep(model, buffered),
            example_inputs=decoder_inputs,
            output_names=("logits", *cache_names("present", cache.layers)),
            dynamic_axes=decoder_axes,
        ),
    ]


def runtime_config(model: nn.Module) -> dict:
    """What the runtime needs beyond the graphs: the cache layout and how generate builds the prompt."""
    cache = _cache_shape(model)
    text = model.config.text_config
    return {
        "num_query_tokens": model.config.num_query_tokens,
        "image_token_index": model.config.image_token_index,
        "bos_token_id": text.bos_token_id,
        "num_layers": cache.layers,
        "num_heads": cache.heads,
        "head_dim": cache.head_dim,
        "max_positions": text.max_position_embeddings,
    }


def save_runtime_files(source: Source, model: nn.Module, directory: Path) -> None:
    """Tokenizer (with the image token), image processor and generation config."""
    save_text_files(source, directory, fallback_config=model.config.text_config)


def _first_step(model: nn.Module, prefix: torch.Tensor, buffered: bool) -> dict[str, torch.Tensor]:
    batch, queries = prefix.shape[:2]
    # The cases fill the queries, BOS and one more token.
    capacity = queries + 2 + SPARE_POSITIONS
    return {
        "input_ids": torch.full((batch, 1), model.config.text_config.bos_token_id, dtype=torch.int64),
        "prefix_embeds": prefix,
        "attention_mask": torch.ones(batch, queries + 1, dtype=torch.int64),
        **empty_past(batch, _cache_shape(model), capacity, buffered),
    }


def validation_cases(
    model: nn.Module, pixel_values: torch.Tensor, target: Target
) -> list[tuple[str, str, dict[str, torch.Tensor]]]:
    """Realistic inputs per component: real images, then a first (queries + BOS) and a later step."""
    encoder, decoder = (component.module for component in build_components(model, target))
    layers = model.config.text_config.num_hidden_layers
    with torch.no_grad():
        (prefix,) = encoder(pixel_values)
        first = _first_step(model, prefix, buffered_cache(target, _cache_shape(model)))
        _, *present = decoder(*first.values())
    batch, queries, width = prefix.shape
    later = {
        "input_ids": torch.randint(0, model.config.text_config.vocab_size, (batch, 1)),
        "prefix_embeds": torch.zeros(batch, 0, width),
        "attention_mask": torch.ones(batch, queries + 2, dtype=torch.int64),
        **dict(zip(cache_names("past_key_values", layers), present, strict=True)),
    }
    return [
        ("encoder", "images", {"pixel_values": pixel_values}),
        ("decoder", "first step", first),
        ("decoder", "second step", later),
    ]


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _prompt_ids(model: nn.Module, prompt: str | None, batch: int) -> torch.Tensor:
    """The ids ``Blip2Processor`` + ``generate`` feed OPT: image tokens first, then BOS and the prompt."""
    config = model.config
    if prompt is None:
        text = [config.text_config.bos_token_id]  # what generate adds when given no input_ids
    else:
        text = _tokenizer(model.name_or_path)(prompt).input_ids  # BOS included, as the processor does
    ids = [config.image_token_index] * config.num_query_tokens + list(text)
    return torch.tensor([ids], dtype=torch.int64).repeat(batch, 1)


def torch_captions(
    model: nn.Module, pixel_values: torch.Tensor, prompt: str | None, **generation
) -> list[list[int]]:
    """PyTorch ``generate`` tokens after the prompt (image tokens, BOS, prompt): what the artifact must match."""
    input_ids = _prompt_ids(model, prompt, pixel_values.shape[0])
    with torch.no_grad():
        sequences = model.generate(
            pixel_values=pixel_values,
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            **generation,
        )
    # transformers returns the prompt followed by the new tokens.
    return [[int(t) for t in row[input_ids.shape[1] :]] for row in sequences]


# The validator runs PyTorch on images prepared by the model's own processor, alike for every family.
reference_processor = decoding.reference_processor
