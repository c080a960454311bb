"""Captioner roofline: the work of one image and one decode step, and how far a variant is from its bound.

    encoder_flops(source_config)           # analytic FLOPs of the ViT-GPT2 encoder graph, batch 1
    bounds(machine, decoder_bytes, flops)  # per-token decode and encoder lower bounds, in seconds

Per-token decode at batch 1 reads every decoder weight once (embedding tables only by the row), so
its bound is those weight bytes over read bandwidth; the encoder is a few large GEMMs, so its bound is FLOPs over GEMM throughput.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx


def _vit_flops(vit: dict) -> float:
    image, patch, width = vit["image_size"], vit["patch_size"], vit["hidden_size"]
    patches = (image // patch) ** 2
    tokens = patches + 1  # + [CLS]
    embed = 2 * patches * vit.get("num_channels", 3) * patch * patch * width
    projections = 2 * tokens * width * (4 * width + 2 * vit["intermediate_size"])  # QKV, out, MLP
    attention = 4 * tokens * tokens * width  # scores and weighted sum
    return embed + vit["num_hidden_layers"] * (projections + attention)


def encoder_flops(config: dict) -> float | None:
    """FLOPs of one image through the vit-gpt2 encoder graph (ViT, then every layer's cross K/V); None
    for other families, whose encoders are not counted yet."""
    vit, gpt = config.get("encoder", {}), config.get("decoder", {})
    if vit.get("model_type") != "vit" or gpt.get("model_type") != "gpt2":
        return None
    tokens = (vit["image_size"] // vit["patch_size"]) ** 2 + 1
    width, gpt_width = vit["hidden_size"], gpt["n_embd"]
    projection = 2 * tokens * width * gpt_width if width != gpt_width else 0
    cross_kv = gpt["n_layer"] * 2 * tokens * gpt_width * 2 * gpt_width
    return float(_vit_flops(vit) + projection + cross_kv)


def _initializer_bytes(tensor) -> int:
    count = 1
    for size in tensor.dims:
        count *= size
    if tensor.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        return (count + 1) // 2
    return count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def step_weight_bytes(graph_path: Path) -> int:
    """Bytes of the weights one decoding step reads: every initializer except those only gathered from.

    An embedding table feeding nothing but ``Gather`` costs one row per token, not its size; quantized
    variants keep GPT-2's fp32 table for the lookup beside a quantized lm_head copy, so counting it
    would inflate their bound by ~150 MB.
    """
    # Shapes and dtypes only: external weight files are not read.
    graph = onnx.load(str(graph_path), load_external_data=False).graph
    consumers: dict[str, set[str]] = {}
    _collect_consumers(graph, consumers)
    return sum(_initializer_bytes(t) for t in graph.initializer if consumers.get(t.name, set()) - {"Gather"})


def _collect_consumers(graph, consumers: dict[str, set[str]]) -> None:
    """Op types reading each name, subgraphs included (a merged decoder keeps its weights outside them).

    An ``If`` on ``use_cache_branch`` is optimum's merged decoder: a step with a KV cache runs only its
    then branch, so the else branch's first-step work (cross-attention K/V projections) is not counted.
    """
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
        for attribute in node.attribute:
            if (
                node.op_type == "If"
                and node.input[0] == "use_cache_branch"
                and attribute.name != "then_branch"
            ):
                continue
            for subgraph in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
                _collect_consumers(subgraph, consumers)


def rate(machine: dict, during_key: str, start_key: str) -> float:
    """A rate the bounds divide by: its median sampled between the timing passes (one reading at start
    moved by a quarter between two runs), else the one measured at start."""
    return (machine.get("during") or {}).get(during_key) or machine[start_key]


def read_rate(machine: dict) -> float:
    """GB/s the decode bounds divide by: the probe's, or the fastest rate a decoder was seen reading its
    weights in the same run when that is higher. A bound slower than a measured step is no bound: on a
    shared host the probe's median read 15.7 GB/s while the fp32 decoder streamed 19.8."""
    return max(rate(machine, "read_gbps", "read_gbps"), machine.get("observed_read_gbps") or 0.0)


def observed_read_gbps(steps: list[tuple[int | None, float | None]]) -> float | None:
    """The fastest weight stream of (decoder weight bytes, per-token seconds) pairs, in GB/s."""
    rates = [size / seconds / 1e9 for size, seconds in steps if size and seconds]
    return max(rates) if rates else None


def multiples(machine: dict, decoder_bytes: int | None, flops: float | None, stages: dict) -> dict:
    """Bounds and how far the measured stage medians are from them (1.0 = at the roofline)."""
    row: dict[str, Any] = {"decoder_weight_bytes": decoder_bytes, "encoder_flops": flops}
    if decoder_bytes and stages.get("decode_per_token"):
        bound = decoder_bytes / (read_rate(machine) * 1e9)
        row["decode_bound_s"] = bound
        row["decode_multiple"] = stages["decode_per_token"] / bound
    if flops and stages.get("encoder"):
        bound = flops / (rate(machine, "torch_fp32_gflops", "gemm_gflops") * 1e9)
        row["encoder_bound_s"] = bound
        row["encoder_multiple"] = stages["encoder"] / bound
    return row
