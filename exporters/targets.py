"""Export targets: which runtime an artifact's graphs are made for, and what that allows in them.

A leaf: it imports nothing heavier than the standard library, so the CLI can offer the targets before
torch or onnx load. ``exporters.target_graphs`` applies and checks a target on a graph::

    target = get_target("tensorrt")
    target.fuse_attention            # False: no onnxruntime contrib ops in its graphs
    target.allows_scheme("int8-dynamic")   # False: TensorRT's parser has no DynamicQuantizeLinear

``onnxruntime`` graphs use onnxruntime's contrib ops: attention fused into ``MultiHeadAttention`` where
declared, captioning decoders on a KV-cache buffer updated in place (``GroupQueryAttention``); ``portable`` and ``tensorrt`` hold standard-domain ONNX ops only, every weight and constant an
initializer; ``tensorrt`` also passes TensorRT's ONNX-parser support matrix (exporters.tensorrt_ops).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from modelkiln.errors import KilnError

DEFAULT_TARGET = "onnxruntime"


@dataclass(frozen=True)
class Target:
    """One runtime the exported graphs are made for."""

    name: str  # registry key, recorded in the manifest's ``target``
    description: str  # one line for help texts
    fuse_attention: bool  # rewrite attention into onnxruntime's MultiHeadAttention where declared
    standard_ops_only: bool  # every node in the default ONNX domain; Constant nodes become initializers
    tensorrt_ops: bool  # every node checked against TensorRT's parser matrix (exporters.tensorrt_ops)
    min_opset: int  # lowest opset the target takes (17: LayerNormalization as one node)
    # Captioning decoders keep their self-attention cache in a preallocated buffer written in place by
    # onnxruntime's GroupQueryAttention (exporters.decoding); False: a past that grows by concatenation.
    buffered_cache: bool
    # Quantization scheme -> options its variants need on this target (forced; a contrary value is
    # refused). None: every scheme; otherwise the schemes not listed cannot run on this target.
    schemes: dict[str, dict] | None = None
    refused_why: dict[str, str] = field(default_factory=dict)  # scheme -> why this target cannot run it

    def allows_scheme(self, scheme: str) -> bool:
        return self.schemes is None or scheme in self.schemes


TARGETS: dict[str, Target] = {
    "onnxruntime": Target(
        name="onnxruntime",
        description="onnxruntime's graphs: fused attention contrib ops, decoders on an in-place KV-cache buffer",
        fuse_attention=True,
        standard_ops_only=False,
        tensorrt_ops=False,
        min_opset=14,
        buffered_cache=True,
    ),
    "portable": Target(
        name="portable",
        description="standard-domain ONNX ops only, every weight an initializer: any ONNX runtime",
        fuse_attention=False,
        standard_ops_only=True,
        tensorrt_ops=False,
        min_opset=17,
        buffered_cache=False,
        # MatMulNBits is an onnxruntime contrib op; the int8 schemes and fp16 stay in the standard domain.
        schemes={"int8-dynamic": {}, "int8-static": {}, "fp16": {}},
        refused_why={"int4-weight": "its MatMulNBits is an onnxruntime contrib op"},
    ),
    "tensorrt": Target(
        name="tensorrt",
        description="portable graphs that TensorRT 10's ONNX parser takes, node for node",
        fuse_attention=False,
        standard_ops_only=True,
        tensorrt_ops=True,
        min_opset=17,
        buffered_cache=False,
        # TensorRT runs explicit int8 as QDQ with zero points of 0 on weights and activations, and fp16
        # with the fp32 keep-list (LayerNorm, Softmax statistics).
        schemes={"int8-static": {"symmetric_activations": True}, "fp16": {"keep_fp32_ops": True}},
        refused_why={
            "int8-dynamic": "TensorRT's parser has no DynamicQuantizeLinear or MatMulInteger",
            "int4-weight": "MatMulNBits is an onnxruntime contrib op TensorRT's parser cannot import",
        },
    ),
}


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise KilnError(f"unknown target {name!r}. Valid targets: {', '.join(TARGETS)}.")
    return TARGETS[name]


def scheme_refusal(target: Target, scheme: str) -> str | None:
    """Why ``scheme`` cannot make a variant of a ``target`` artifact (None when it can), with the fix."""
    if target.allows_scheme(scheme):
        return None
    why = target.refused_why.get(scheme, "it is a PyTorch (bitsandbytes) variant, not ONNX graphs")
    return (
        f"scheme {scheme} cannot run on a {target.name} artifact: {why}. Schemes that work for "
        f"{target.name}: {', '.join(target.schemes)}; or quantize an onnxruntime-target export."
    )
