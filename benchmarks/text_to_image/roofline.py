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
    return _totals(image, text_tokens, batch, linear, attention)


def _totals(image: int, text: int, batch: int, linear: float, attention: float) -> dict:
    return {
        "image_tokens": image,
        "text_tokens": text,
        "batch": batch,
        "linear": batch * linear,
        "attention": batch * attention,
        "total": batch * (linear + attention),
    }


def flux_step_flops(
    config: dict, latent_height: int, latent_width: int, text_tokens: int, batch: int
) -> dict:
    """FLOPs of one FluxTransformer2DModel call (one denoising step) on 2x2-packed latents.

    A double block runs Q/K/V, output and a 4x-wide MLP per stream (12 D^2 MACs a token); a single
    block fuses Q/K/V with the MLP's input and the output with the MLP's output (also 12 D^2 a token);
    both attend over image + text tokens. Modulation projections read one vector per block."""
    width = config["num_attention_heads"] * config["attention_head_dim"]
    image, square = (latent_height // 2) * (latent_width // 2), width * width
    blocks = config["num_layers"] + config["num_single_layers"]
    linear = blocks * 24 * (image + text_tokens) * square
    linear += config["num_layers"] * 2 * 12 * square + config["num_single_layers"] * 2 * 3 * square  # adaLN
    attention = blocks * 4 * (image + text_tokens) ** 2 * width
    embedders = 2 if config.get("guidance_embeds") else 1  # timestep (and guidance) MLPs: 256 -> D -> D
    linear += embedders * 2 * (256 * width + square) + 2 * (config["pooled_projection_dim"] * width + square)
    linear += (
        2 * image * config["in_channels"] * width + 2 * text_tokens * config["joint_attention_dim"] * width
    )
    linear += 2 * 2 * square + 2 * image * width * (config.get("out_channels") or config["in_channels"])
    return _totals(image, text_tokens, batch, linear, attention)


def unet_step_flops(
    config: dict, latent_height: int, latent_width: int, text_tokens: int, batch: int
) -> dict:
    """FLOPs of one UNet2DConditionModel call, counted by torch on a weightless (meta) copy.

    The UNet's convolutions make an analytic count long; torch's FLOP counter reads every conv, linear
    and attention matmul from the shapes alone. Attention runs the plain processor (bmm, softmax, bmm)
    there, since torch counts no FLOPs for its CPU flash attention."""
    import torch  # here, not at the top: the task registry imports this module without torch
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config).eval()
        unet.set_attn_processor(AttnProcessor())
        # One batch element: the work is linear in the batch.
        sample = torch.empty(1, config["in_channels"], latent_height, latent_width)
        text = torch.empty(1, text_tokens, config["cross_attention_dim"])
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            unet(sample, torch.tensor([500.0]), encoder_hidden_states=text)
    ops = {str(op): count for op, count in counter.get_flop_counts()["Global"].items()}
    attention = sum(count for op, count in ops.items() if "bmm" in op)  # baddbmm scores, bmm weighted sum
    image = latent_height * latent_width
    return _totals(image, text_tokens, batch, counter.get_total_flops() - attention, attention)


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
