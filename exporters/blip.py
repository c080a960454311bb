"""BLIP captioning (``BlipForConditionalGeneration``: ViT vision model, BERT-style text decoder).

Two graphs, so generation never recomputes what it already knows:

- ``encoder``: pixel_values -> the cross-attention keys and values of every text decoder layer. They depend
  only on the image, so they are computed once per image and reused by every decoding step.
- ``decoder``: one ``BlipTextLMHeadModel`` step with a self-attention KV cache (a buffer written in place,
  or a past that grows: see ``decoding``). The first step feeds the start token ``[DEC]`` (plus any prompt
  tokens), later steps one token each. Positions come from the past length, as in ``BlipTextEmbeddings``,
  so the graph takes no ``position_ids``.

PyTorch's ``generate`` runs the text decoder on ``[DEC] + prompt`` (the tokenized prompt with its ``[CLS]``
replaced by ``[DEC]`` and its ``[SEP]`` dropped) and stops at ``[SEP]``; ``modelkiln.runtime.blip`` does the
same without torch. Used by ``modelkiln.exporters.export.export_model``; see that module for the call.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
from torch import nn

from modelkiln.errors import SourceModelError
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
    past_length,
    save_processor_files,
    split_heads,
    step_context,
)
from modelkiln.exporters.kv_attention import buffer_attention, cross_attention
from modelkiln.exporters.onnx_export import Component
from modelkiln.exporters.source import Source
from modelkiln.exporters.targets import Target


def load_model(source: Source, trust_remote_code: bool = False) -> nn.Module:
    from transformers import BlipForConditionalGeneration

    return load_captioner(source, BlipForConditionalGeneration, trust_remote_code)


def _attend(q, k, v, mask: torch.Tensor | None = None) -> torch.Tensor:
    # Divides by sqrt(head_dim) like BlipTextSelfAttention (not a multiplied scale), so rounding matches.
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # [B, H, T, S]
    if mask is not None:
        scores = scores + mask
    return torch.matmul(scores.softmax(dim=-1), v)  # [B, H, T, hd]


class BlipCrossKVEncoder(nn.Module):
    """Image -> per-layer cross-attention keys and values of the BLIP text decoder."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.vision_model = model.vision_model
        self.layers = model.text_decoder.bert.encoder.layer
        self.num_heads = model.config.text_config.num_attention_heads

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # last_hidden_state already went through post_layernorm: what generate feeds the decoder.
        states = self.vision_model(pixel_values=pixel_values).last_hidden_state  # [B, 1 + patches, Dv]
        outputs = []
        for layer in self.layers:
            cross = layer.crossattention.self
            outputs += [split_heads(cross.key(states), self.num_heads)]
            outputs += [split_heads(cross.value(states), self.num_heads)]
        return tuple(outputs)


class BlipTextCachedDecoderStep(nn.Module):
    """One BLIP text decoder step: new tokens + self-attention past + cross K/V -> last logits + present."""

    def __init__(self, model: nn.Module, buffered: bool):
        super().__init__()
        lm = model.text_decoder
        self.embeddings = lm.bert.embeddings
        self.layers = lm.bert.encoder.layer
        self.head = lm.cls.predictions  # transform (dense, act, LayerNorm) then the tied vocab projection
        self.num_heads = lm.config.num_attention_heads
        self.num_layers = lm.config.num_hidden_layers
        self.scale = (lm.config.hidden_size // self.num_heads) ** -0.5
        self.buffered = buffered  # the cache form (exporters.decoding)

    def _embed(self, input_ids: torch.Tensor, past: int) -> torch.Tensor:
        # BlipTextEmbeddings numbers new tokens from the past length; the prompt is never padded.
        positions = torch.arange(past, past + input_ids.shape[1], device=input_ids.device)  # [T]
        words = self.embeddings.word_embeddings(input_ids)  # [B, T, D]
        return self.embeddings.LayerNorm(words + self.embeddings.position_embeddings(positions)[None])

    def _self_attention(self, attention, hidden, past_key, past_value, context):
        heads = attention.self
        query, key, value = heads.query(hidden), heads.key(hidden), heads.value(hidden)
        if self.buffered:
            out, key, value = buffer_attention(
                query, key, value, past_key, past_value, *context, self.num_heads, self.scale
            )
            return attention.output(out, hidden), key, value
        key = torch.cat([past_key, split_heads(key, self.num_heads)], dim=2)
        value = torch.cat([past_value, split_heads(value, self.num_heads)], dim=2)
        out = _attend(split_heads(query, self.num_heads), key, value, context)
        # BlipTextSelfOutput: dense, then LayerNorm over the residual sum (post-norm, BERT style).
        return attention.output(merge_heads(out), hidden), key, value

    def _cross_attention(self, attention, hidden, cross_key, cross_value):
        query = attention.self.query(hidden)
        if self.buffered:
            out = cross_attention(query, cross_key, cross_value, self.num_heads, self.scale)
            return attention.output(out, hidden)
        out = _attend(split_heads(query, self.num_heads), cross_key, cross_value)
        return attention.output(merge_heads(out), hidden)

    def forward(self, input_ids, attention_mask, *cache: torch.Tensor):
        past, cross = cache[: 2 * self.num_layers], cache[2 * self.num_layers :]
        new = input_ids.shape[1]
        before = past_length(self.buffered, attention_mask, new, past[0])
        hidden = self._embed(input_ids, before)  # [B, T, D]
        mask = step_context(self.buffered, attention_mask, new, before)
        presents = []
        for i, layer in enumerate(self.layers):
            hidden, key, value = self._self_attention(
                layer.attention, hidden, past[2 * i], past[2 * i + 1], mask
            )
            hidden = self._cross_attention(layer.crossattention, hidden, cross[2 * i], cross[2 * i + 1])
            hidden = layer.output(layer.intermediate(hidden), hidden)  # feed-forward, post-norm residual
            presents += [key, value]
        logits = self.head(hidden[:, -1])  # [B, V]: generation needs the last position only
        return (logits, *presents)


def _image_shape(model: nn.Module) -> tuple[int, int, int]:
    config = model.config.vision_config
    size = config.image_size if isinstance(config.image_size, (list, tuple)) else (config.image_size,) * 2
    return (3, *size)  # BlipVisionEmbeddings' patch convolution always takes 3 channels


def _cache_sizes(model: nn.Module) -> tuple[int, int, int]:
    text = model.config.text_config
    return text.num_hidden_layers, text.num_attention_heads, text.hidden_size // text.num_attention_heads


def build_components(model: nn.Module, target: Target) -> list[Component]:
    """The encoder and the cached decoder step for ``target``, with example inputs and dynamic axes."""
    cache = CacheShape(*_cache_sizes(model))
    pixel_values = torch.rand(2, *_image_shape(model))
    buffered = buffered_cache(target, cache)
    step = BlipTextCachedDecoderStep(model, buffered)
    vocab = model.config.text_config.vocab_size
    # BLIP's text embeddings derive positions from the past length: no position_ids input.
    return cross_attention_components(
        BlipCrossKVEncoder(model), step, pixel_values, cache, vocab, positions=False,
        buffered=buffered,
    )  # fmt: skip


def runtime_config(model: nn.Module) -> dict:
    """What the runtime needs beyond the graphs: the cache layout and the prompt's special tokens."""
    text = model.config.text_config
    layers, heads, head_dim = _cache_sizes(model)
    return {
        # generate starts the decoder from the text config's bos ([DEC]), not the tokenizer's [CLS].
        "decoder_start_token_id": text.bos_token_id,
        "bos_token_id": text.bos_token_id,
        "sep_token_id": text.sep_token_id,  # generate's EOS
        "pad_token_id": text.pad_token_id,
        "num_layers": layers,
        "num_heads": heads,
        "head_dim": head_dim,
        "max_positions": text.max_position_embeddings,
    }


def _generation_config(model: nn.Module):
    """The settings ``BlipForConditionalGeneration.generate`` really decodes with.

    It calls ``text_decoder.generate``, so the text decoder's generation config applies (a top-level
    generation_config.json is not read), with EOS forced to ``[SEP]`` and the text config's pad token.
    """
    generation = copy.deepcopy(model.text_decoder.generation_config)  # never edit the live model's
    generation.eos_token_id = model.config.text_config.sep_token_id
    generation.pad_token_id = model.config.text_config.pad_token_id
    generation.bos_token_id = model.config.text_config.bos_token_id
    return generation


def save_runtime_files(source: Source, model: nn.Module, directory: Path) -> None:
    """Tokenizer, image processor and generation config: what makes the artifact self-contained."""
    save_processor_files(source, directory)
    _generation_config(model).save_pretrained(directory)


def validation_cases(
    model: nn.Module, pixel_values: torch.Tensor, target: Target
) -> list[tuple[str, str, dict[str, torch.Tensor]]]:
    """Realistic inputs per component: real images, the start token, a prompt, then a later step."""
    encoder, decoder = (component.module for component in build_components(model, target))
    layers = model.config.text_config.num_hidden_layers
    text = model.config.text_config
    batch = pixel_values.shape[0]
    with torch.no_grad():
        cross = dict(zip(cache_names("cross_attention", layers), encoder(pixel_values), strict=True))
    # The cases fill 5 positions: the prompt step's 4, then one more.
    cache = CacheShape(*_cache_sizes(model))
    empty = empty_past(batch, cache, 5 + SPARE_POSITIONS, buffered_cache(target, cache))
    start = torch.full((batch, 1), text.bos_token_id, dtype=torch.int64)
    first = {"input_ids": start, "attention_mask": torch.ones(batch, 1, dtype=torch.int64), **empty, **cross}
    words = torch.randint(0, text.vocab_size, (batch, 3))
    prompted = {
        **first,
        "input_ids": torch.cat([start, words], dim=1),  # [DEC] + 3 prompt tokens in one step
        "attention_mask": torch.ones(batch, 4, dtype=torch.int64),
    }
    with torch.no_grad():
        _, *present = decoder(*prompted.values())
    later = {
        **first,
        "input_ids": torch.randint(0, text.vocab_size, (batch, 1)),
        "attention_mask": torch.ones(batch, 5, dtype=torch.int64),
        **dict(zip(cache_names("past_key_values", layers), present, strict=True)),
    }
    return [
        ("encoder", "images", {"pixel_values": pixel_values}),
        ("decoder", "first step", first),
        ("decoder", "prompt step", prompted),
        ("decoder", "later step", later),
    ]


def _reference_tokenizer(model: nn.Module):
    from transformers import AutoTokenizer

    path = getattr(model, "name_or_path", "")
    if not path or not Path(path).is_dir():
        raise SourceModelError(
            "a BLIP prompt needs the model's tokenizer, but the model was not loaded from a directory "
            f"({path!r}). Load it with modelkiln.exporters.blip.load_model."
        )
    return AutoTokenizer.from_pretrained(path)


def torch_captions(
    model: nn.Module, pixel_values: torch.Tensor, prompt: str | None, **generation
) -> list[list[int]]:
    """PyTorch ``generate`` tokens after ``[DEC]`` and the prompt: what the artifact must match."""
    inputs = {}
    if prompt is not None:
        # What BlipProcessor(text=...) feeds generate: [CLS] prompt [SEP], the same for every image.
        encoded = _reference_tokenizer(model)([prompt] * pixel_values.shape[0], return_tensors="pt")
        inputs = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    # generate swaps [CLS] for [DEC] and drops [SEP], so the decoder prompt is one token shorter.
    prompt_length = inputs["input_ids"].shape[1] - 1 if inputs else 1
    with torch.no_grad():
        sequences = model.generate(pixel_values=pixel_values, **inputs, **generation)
    return [[int(t) for t in row[prompt_length:]] for row in sequences]


# The validator runs PyTorch on images prepared by the model's own processor, alike for every family.
reference_processor = decoding.reference_processor
