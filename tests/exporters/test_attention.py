"""Attention fusion at export: exported SDPA -> onnxruntime MultiHeadAttention, same outputs."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import TEXT_LENGTHS
from torch import nn

from modelkiln.exporters import sd3
from modelkiln.exporters.attention import fuse_attention
from modelkiln.exporters.onnx_export import Component, export_component
from modelkiln.exporters.source import resolve_source
from modelkiln.exporters.targets import get_target
from modelkiln.manifest import read_manifest


class SelfAttention(nn.Module):
    """Multi-head self-attention through SDPA; ``mask``: None, "ones" (a constant all-true mask, as ViT
    passes) or "causal" (a real mask, left unfused)."""

    def __init__(self, width: int = 32, heads: int = 4, mask: str | None = None):
        super().__init__()
        self.heads, self.mask = heads, mask
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)

    def forward(self, x):
        b, s, w = x.shape
        q, k, v = (
            self.qkv(x).view(b, s, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        )  # [B, H, S, d] each
        mask = {
            "ones": torch.ones(1, 1, s, 1, dtype=torch.bool),
            "causal": torch.ones(s, s, dtype=torch.bool).tril(),
        }
        mask = mask.get(self.mask)
        y = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(b, s, w))  # [B, S, H*d]


def _export(tmp_path, module, fuse: bool):
    torch.manual_seed(0)
    component = Component(
        "attention", module.eval(), {"x": torch.randn(2, 5, 32)}, ("y",), {"x": {0: "batch", 1: "seq"}},
        fuse_attention=True,
    )  # fmt: skip
    folder = tmp_path / ("fused" if fuse else "plain")
    folder.mkdir()
    spec = export_component(component, folder, opset=18, fuse=fuse)
    return spec, folder / spec.file


def _ops(path) -> collections.Counter:
    return collections.Counter(node.op_type for node in onnx.load(str(path)).graph.node)


def _run(path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("mask", [None, "ones"])
def test_fused_graph_matches_torch_and_the_unfused_graph(tmp_path, mask):
    torch.manual_seed(0)
    module = SelfAttention(mask=mask)
    fused_spec, fused = _export(tmp_path, module, fuse=True)
    _, plain = _export(tmp_path, module, fuse=False)
    assert fused_spec.fused == {"MultiHeadAttention": 1}
    assert _ops(fused)["MultiHeadAttention"] == 1 and _ops(fused)["Softmax"] == 0
    assert _ops(plain)["Softmax"] == 1 and "MultiHeadAttention" not in _ops(plain)
    x = np.random.default_rng(1).standard_normal(
        (3, 11, 32), dtype=np.float32
    )  # batch and length != export's
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(_run(fused, x), expected, atol=1e-5)
    np.testing.assert_allclose(_run(fused, x), _run(plain, x), atol=1e-5)


def test_masked_attention_is_left_alone(tmp_path):
    spec, path = _export(tmp_path, SelfAttention(mask="causal"), fuse=True)
    assert spec.fused == {"MultiHeadAttention": 0}
    assert _ops(path)["Softmax"] == 1
    assert fuse_attention(onnx.load(str(path))) == 0


@pytest.mark.parametrize(
    "name,denoiser,layers",
    [("sd3.5-medium", "transformer", 3), ("flux-dev", "transformer", 2), ("sd1", "unet", 8)],
)
def test_diffusion_denoisers_are_fused(tiny_diffusion, name, denoiser, layers):
    """SD3.5-Medium-style: 2 joint blocks, the first with a second (dual) attention; Flux: one double-
    and one single-stream block; SD 1.x: 4 transformer blocks (down, mid, two up), each with self- and
    cross-attention. Validation against PyTorch covers the fused graphs' numbers."""
    options = {"max_sequence_length": TEXT_LENGTHS[name]} if name in TEXT_LENGTHS else {}
    _, fused = tiny_diffusion(name, **options)
    assert read_manifest(fused).components[denoiser].fused == {"MultiHeadAttention": layers}
    assert _ops(fused / f"{denoiser}.onnx")["MultiHeadAttention"] == layers
    # The text encoders' causal masks keep their attention unfused; they do not declare fusion anyway.
    assert read_manifest(fused).components["text_encoder"].fused == {}


def test_no_fuse_attention_keeps_standard_ops(tiny_diffusion, tmp_path):
    """--no-fuse-attention is export_component(fuse=False) on the components the onnxruntime target
    declares fused: only the SD3 transformer is exported here (a whole pipeline took minutes)."""
    source, _ = tiny_diffusion("sd3.5-medium", max_sequence_length=TEXT_LENGTHS["sd3.5-medium"])
    models = sd3.load_model(resolve_source(str(source)))
    (transformer,) = [
        c for c in sd3.build_components(models, get_target("onnxruntime")) if c.name == "transformer"
    ]
    assert transformer.fuse_attention  # declared, so only the flag keeps it unfused
    spec = export_component(transformer, tmp_path, opset=18, fuse=False)
    assert spec.fused == {}
    graph = onnx.load(str(tmp_path / spec.file))
    assert all(opset.domain in ("", "ai.onnx") for opset in graph.opset_import)
    assert "MultiHeadAttention" not in _ops(tmp_path / spec.file)


def test_captioner_encoders_are_fused(vit_gpt2_artifact):
    """ViT passes SDPA a constant all-true mask; the fusion drops it. Validation covers the numbers."""
    from modelkiln.exporters.source import resolve_source

    source, artifact = vit_gpt2_artifact
    layers = resolve_source(str(source)).config["encoder"]["num_hidden_layers"]
    assert read_manifest(artifact).components["encoder"].fused == {"MultiHeadAttention": layers}
    assert _ops(artifact / "encoder.onnx")["Softmax"] == 0
