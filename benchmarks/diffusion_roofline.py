"""Roofline of one denoising step: its FLOPs, counted from the transformer config, against the machine.

    flops = step_flops("sd3", transformer_config, latent_height=64, latent_width=64, text_tokens=333, batch=2)
    # {"linear": ..., "attention": ..., "total": ...}
    rate = measure_int8_gops(threads=2)        # onnxruntime's u8s8 GEMM throughput on this machine
    probe = RateProbe(threads=2); probe.sample(); probe.summary()   # rates under the timing's load
    step_bounds(machine, flops, precision="int8", step_s=4.4, eager=False)

A denoising step at batch 2 and ~1000+ tokens is a chain of large GEMMs (compute-bound, unlike a
decode step), so its bound is FLOPs over GEMM throughput: fp32 GEMM for every FLOP, or, for a variant
whose weight matmuls compute in int8, the linear FLOPs at the int8 rate plus the attention FLOPs
(activation x activation, always fp32) at the fp32 rate. FLOPs are 2 per multiply-add; elementwise
work (norms, GELU, modulation) is not counted.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

GEMM_SIZE = 2048  # square matmul of the rate probes, like roofline.GEMM_SIZE
REPEATS = 5  # best of: other tenants only ever slow a run down


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


# Family -> FLOPs of one denoiser call; families without an entry get no roofline row.
STEP_FLOPS: dict[str, Callable[..., dict]] = {"sd3": sd3_step_flops}


def step_flops(family: str, config: dict, **shape: int) -> dict | None:
    counter = STEP_FLOPS.get(family)
    return None if counter is None else counter(config, **shape)


def _gemm_session(threads: int, int8: bool):
    """A one-node onnxruntime graph: x [N, N] times a constant [N, N] weight, fp32 MatMul or the
    DynamicQuantizeMatMul (u8 activations x s8 weights, activation quantization included) that
    int8-dynamic variants run."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    size, rng = GEMM_SIZE, np.random.default_rng(0)
    if int8:
        weights = [numpy_helper.from_array(rng.integers(-127, 128, (size, size), dtype=np.int8), "w"),
                   numpy_helper.from_array(np.full(size, 1e-3, np.float32), "scale")]  # fmt: skip
        node = helper.make_node("DynamicQuantizeMatMul", ["x", "w", "scale"], ["y"], domain="com.microsoft")
    else:
        weights = [numpy_helper.from_array(rng.standard_normal((size, size), dtype=np.float32), "w")]
        node = helper.make_node("MatMul", ["x", "w"], ["y"])
    value = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [size, size])  # noqa: E731
    graph = helper.make_graph([node], "gemm", [value("x")], [value("y")], weights)
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    model = helper.make_model(graph, opset_imports=opsets).SerializeToString()
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _best_rate(run, repeats: int) -> float:
    """G(FL)OP/s of the fastest of ``repeats`` calls of one GEMM_SIZE^2 product."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 2 * GEMM_SIZE**3 / min(times) / 1e9


class RateProbe:
    """GEMM rates of torch fp32, onnxruntime fp32 and onnxruntime int8, sampled once per timing pass.

    On a shared machine the load changes over minutes; sampling the rates in the same passes as the
    variants gives bounds measured under the load the steps saw (the medians), beside the figures
    measured at start."""

    def __init__(self, threads: int):
        import numpy as np
        import torch

        torch.set_num_threads(threads)
        x = np.random.default_rng(1).standard_normal((GEMM_SIZE, GEMM_SIZE), dtype=np.float32)
        a, b = torch.from_numpy(x), torch.from_numpy(x.copy())
        fp32, int8 = _gemm_session(threads, int8=False), _gemm_session(threads, int8=True)
        self.runs = {
            "torch_fp32_gflops": lambda: torch.matmul(a, b),
            "ort_fp32_gflops": lambda: fp32.run(None, {"x": x}),
            "ort_int8_gops": lambda: int8.run(None, {"x": x}),
        }
        for run in self.runs.values():
            run()  # warm-up: thread pools, weight packing
        self.samples: dict[str, list[float]] = {name: [] for name in self.runs}

    def sample(self, repeats: int = 2) -> None:
        for name, run in self.runs.items():
            self.samples[name].append(_best_rate(run, repeats))

    def summary(self) -> dict[str, Any]:
        medians = {name: round(statistics.median(v), 1) for name, v in self.samples.items() if v}
        return {**medians, "samples": len(self.samples["torch_fp32_gflops"])}


def measure_int8_gops(threads: int) -> float:
    """onnxruntime's int8 GEMM rate (GOP/s) on ``threads`` threads, best of REPEATS, at start."""
    import numpy as np

    session = _gemm_session(threads, int8=True)
    feeds = {"x": np.random.default_rng(1).standard_normal((GEMM_SIZE, GEMM_SIZE), dtype=np.float32)}
    session.run(None, feeds)  # warm-up: thread pool, weight packing
    return round(_best_rate(lambda: session.run(None, feeds), REPEATS), 1)


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
