"""Decoder attention as two PyTorch custom ops that export to onnxruntime's fused attention kernels.

A captioning decoder exported for the onnxruntime target keeps its self-attention cache in a buffer of
fixed capacity that the graph writes in place, instead of concatenating a growing past every step:

- ``buffer_attention``: self-attention over the cache buffer [B, H, capacity, hd]. It writes the new
  tokens' keys and values at positions ``total - new .. total - 1`` and attends causally to the first
  ``total`` positions, plus an additive bias for left padding. Exported as ``com.microsoft``
  ``GroupQueryAttention`` (kv heads = heads): when the runtime binds the same buffer as ``past_key`` input
  and ``present_key`` output, onnxruntime updates it in place (``past_present_share_buffer``).
- ``cross_attention``: attention to per-image keys and values already split into heads [B, H, L, hd], as
  the encoder graph returns them. Exported as ``com.microsoft`` ``MultiHeadAttention``.

In PyTorch (validation, and the exporter's tracing) each op runs the plain reference below, so the
exported graph is checked against the same arithmetic. ``TRANSLATIONS`` is what ``torch.onnx.export``
takes as ``custom_translation_table``.
"""

from __future__ import annotations

import torch
from onnx.defs import OpSchema
from onnxscript.values import Op, Opset
from torch import Tensor

MICROSOFT = Opset("com.microsoft", 1)


def split_heads(x: Tensor, num_heads: int) -> Tensor:
    batch, seq, width = x.shape
    # [B, S, D] -> [B, H, S, D/H]
    return x.view(batch, seq, num_heads, width // num_heads).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    batch, heads, seq, head_dim = x.shape
    # [B, H, S, hd] -> [B, S, H*hd]
    return x.transpose(1, 2).reshape(batch, seq, heads * head_dim)


@torch.library.custom_op("modelkiln::buffer_attention", mutates_args=())
def buffer_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    past_key: Tensor,
    past_value: Tensor,
    seqlens_k: Tensor,
    total_length: Tensor,
    bias: Tensor,
    num_heads: int,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """query/key/value [B, S, H*hd]; past_* [B, H, capacity, hd]; seqlens_k int32 [B] (total - 1 on
    every row: padding is on the left, masked by ``bias`` [B, 1, S, total]); total_length int32 [].
    Returns the attention output [B, S, H*hd] and the updated buffers."""
    new, total = query.shape[1], int(total_length)
    start = total - new
    present_key, present_value = past_key.clone(), past_value.clone()
    present_key[:, :, start:total] = split_heads(key, num_heads)
    present_value[:, :, start:total] = split_heads(value, num_heads)
    scores = torch.matmul(split_heads(query, num_heads), present_key[:, :, :total].transpose(-1, -2)) * scale
    causal = torch.arange(total)[None, :] <= torch.arange(start, total)[:, None]  # [S, total]
    scores = (scores + bias).masked_fill(~causal, float("-inf"))
    out = torch.matmul(scores.softmax(dim=-1), present_value[:, :, :total])
    return merge_heads(out), present_key, present_value


@buffer_attention.register_fake
def _buffer_attention_shapes(
    query, key, value, past_key, past_value, seqlens_k, total_length, bias, heads, scale
):
    return torch.empty_like(query), torch.empty_like(past_key), torch.empty_like(past_value)


@torch.library.custom_op("modelkiln::cross_attention", mutates_args=())
def cross_attention(query: Tensor, key: Tensor, value: Tensor, num_heads: int, scale: float) -> Tensor:
    """query [B, S, H*hd] against per-image key/value [B, H, L, hd] -> [B, S, H*hd]; no mask."""
    scores = torch.matmul(split_heads(query, num_heads), key.transpose(-1, -2)) * scale
    return merge_heads(torch.matmul(scores.softmax(dim=-1), value))


@cross_attention.register_fake
def _cross_attention_shapes(query, key, value, num_heads, scale):
    return torch.empty_like(query)


def _schema(name: str, inputs: list[tuple[str, str]], outputs: list[str], attributes: dict) -> OpSchema:
    """The part of an onnxruntime contrib op's schema the exporter needs to emit the node (onnx ships no
    schemas for the com.microsoft domain); onnxruntime checks the node against its own when it loads.
    The first three inputs (query, key, value) are required, the rest optional."""
    option = OpSchema.FormalParameterOption
    return OpSchema(
        name,
        MICROSOFT.domain,
        MICROSOFT.version,
        inputs=[
            OpSchema.FormalParameter(n, t, "", param_option=option.Single if i < 3 else option.Optional)
            for i, (n, t) in enumerate(inputs)
        ],
        outputs=[OpSchema.FormalParameter(n, "T", "") for n in outputs],
        type_constraints=[
            ("T", ["tensor(float)", "tensor(float16)"], ""),
            ("M", ["tensor(int32)"], ""),
            ("P", ["tensor(int64)"], ""),
        ],
        attributes=[OpSchema.Attribute(n, t, "") for n, t in attributes.items()],
    )


_INT, _FLOAT = OpSchema.AttrType.INT, OpSchema.AttrType.FLOAT
_GQA = Op(
    MICROSOFT,
    "GroupQueryAttention",
    _schema(
        "GroupQueryAttention",
        [
            ("query", "T"),
            ("key", "T"),
            ("value", "T"),
            ("past_key", "T"),
            ("past_value", "T"),
            ("seqlens_k", "M"),
            ("total_sequence_length", "M"),
            ("cos_cache", "T"),
            ("sin_cache", "T"),
            ("position_ids", "P"),
            ("attention_bias", "T"),
        ],
        ["output", "present_key", "present_value"],
        {"num_heads": _INT, "kv_num_heads": _INT, "scale": _FLOAT},
    ),
)
_MHA = Op(
    MICROSOFT,
    "MultiHeadAttention",
    _schema(
        "MultiHeadAttention",
        [("query", "T"), ("key", "T"), ("value", "T")],
        ["output"],
        {"num_heads": _INT, "scale": _FLOAT},
    ),
)


def _buffer_attention_onnx(
    query, key, value, past_key, past_value, seqlens_k, total_length, bias, num_heads: int, scale: float
):
    # No rotary inputs (cos/sin caches, position ids): these decoders add learned positions to the embeddings.
    return _GQA(
        query, key, value, past_key, past_value, seqlens_k, total_length, None, None, None, bias,
        num_heads=num_heads, kv_num_heads=num_heads, scale=scale,
    )  # fmt: skip


def _cross_attention_onnx(query, key, value, num_heads: int, scale: float):
    return _MHA(query, key, value, num_heads=num_heads, scale=scale)


TRANSLATIONS = {
    torch.ops.modelkiln.buffer_attention.default: _buffer_attention_onnx,
    torch.ops.modelkiln.cross_attention.default: _cross_attention_onnx,
}
