"""Roofline of one denoising step: its FLOPs, counted from the transformer config, against the machine.

    flops = step_flops("sd3", transformer_config, latent_height=64, latent_width=64, text_tokens=333, batch=2)
    # {"linear": ..., "attention": ..., "total": ...}
    step_bounds(machine, flops, precision="int8", step_s=4.4, eager=False)

A denoising step at batch 2 and ~1000+ tokens is a chain of large GEMMs (compute-bound, unlike a
decode step), so its bound is FLOPs over GEMM throughput: fp32 GEMM for every FLOP, or, for a variant
whose weight matmuls compute in int8, the linear FLOPs at the int8 rate plus the attention FLOPs
(activation x activation, always fp32) at the fp32 rate. FLOPs are 2 per multiply-add; elementwise
work (norms, GELU, modulation) is not counted.
"""

from __future__ import annotations

from typing import Any

from modelkiln.registry import get_family, load_attr


def _sd3_block(config: dict, index: int, image: int, text: int) -> tuple[float, float]:
    """(linear, attention) FLOPs of one JointTransformerBlock for one batch element."""
    width = config["num_attention_heads"] * config["attention_head_dim"]
    dual = index in tuple(config.get("dual_attention_layers") or ())
    pre_only = index == config["num_layers"] - 1  # the last block only feeds the image stream
    square = width * width
    # Per stream: Q, K, V and output projections (4 D^2) and a 4x-wide GELU MLP (8 D^2), 2 FLOPs a MAC.
    linear = 24 * image * square
    linear += 6 * text * square if pre_only else 24 * text * square
    linear += 8 * image * square if dual else 0  # MMDiT-X: a second image-only attention
    # Modulation (adaLN) projections of the timestep embedding: one "token" per stream.
    linear += 2 * square * ((9 if dual else 6) + (2 if pre_only else 6))
    attention = 4 * (image + text) ** 2 * width + (4 * image**2 * width if dual else 0)
    return linear, attention


def sd3_step_flops(config: dict, latent_height: int, latent_width: int, text_tokens: int, batch: int) -> dict:
    """FLOPs of one SD3Transformer2DModel call (one denoising step)."""
    patch, width = config["patch_size"], config["num_attention_heads"] * config["attention_head_dim"]
    image = (latent_height // patch) * (latent_width // patch)
    linear = attention = 0.0
    for index in range(config["num_layers"]):
        block_linear, block_attention = _sd3_block(config, index, image, text_tokens)
        linear, attention = linear + block_linear, attention + block_attention
    linear += 2 * image * config["in_channels"] * patch * patch * width  # patch embedding
    linear += 2 * text_tokens * config["joint_attention_dim"] * config["caption_projection_dim"]
    linear += 2 * width * (256 + width + config["pooled_projection_dim"] + width)  # timestep + pooled text
    linear += 2 * width * 2 * width + 2 * image * width * patch * patch * config["out_channels"]  # output
    return {
        "image_tokens": image,
        "text_tokens": text_tokens,
        "batch": batch,
        "linear": batch * linear,
        "attention": batch * attention,
        "total": batch * (linear + attention),
    }


def step_flops(family: str, config: dict, **shape: int) -> dict | None:
    """FLOPs of one denoiser call by the family's declared FLOP model (``BenchSupport.step_flops``);
    None for a family that declares none (its report gets no roofline row)."""
    bench = get_family(family).bench
    if bench is None or not bench.step_flops:
        return None
    return load_attr(bench.step_flops)(config, **shape)


def rates(machine: dict) -> dict[str, float]:
    """GEMM rates the bounds use: the medians sampled during timing, else those measured at start."""
    during = machine.get("during") or {}
    start = machine["gemm_gflops"]
    return {
        "torch_fp32": during.get("torch_fp32_gflops") or start,
        "ort_fp32": during.get("ort_fp32_gflops") or start,
        "ort_int8": during.get("ort_int8_gops") or machine.get("int8_gops") or 0.0,
    }


def step_bounds(machine: dict, flops: dict | None, precision: str, step_s: float | None, eager: bool) -> dict:
    """The step's FLOP bounds and how far the measured median step is from them (1.0 = at the roofline).

    Two bounds: every FLOP at torch's fp32 GEMM rate (one yardstick for every variant), and the
    variant's own: its runtime's fp32 rate (torch for eager, onnxruntime for ONNX), or for a denoiser
    whose weight matmuls compute in int8 (int8, and int4 at accuracy level 4) the linear FLOPs at
    onnxruntime's int8 rate plus the attention FLOPs at its fp32 rate.
    """
    if not flops:
        return {}
    rate = rates(machine)
    fp32_bound = flops["total"] / (rate["torch_fp32"] * 1e9)
    own = flops["total"] / ((rate["torch_fp32"] if eager else rate["ort_fp32"]) * 1e9)
    if not eager and precision in ("int8", "int4") and rate["ort_int8"]:
        own = flops["linear"] / (rate["ort_int8"] * 1e9) + flops["attention"] / (rate["ort_fp32"] * 1e9)
    row: dict[str, Any] = {"step_flops": flops["total"], "fp32_bound_s": fp32_bound, "own_bound_s": own}
    if step_s:
        row["fp32_multiple"] = step_s / fp32_bound
        row["own_multiple"] = step_s / own
    return row
