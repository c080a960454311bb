"""This machine's roofline: the fp32 GEMM rate, memory read bandwidth and onnxruntime's GEMM rates.

    machine = measure_machine(threads=2)     # {"gemm_gflops": ..., "read_gbps": ..., "method": ...}
    machine = with_int8_rate(machine, 2)     # + "int8_gops": onnxruntime's u8s8 GEMM rate
    probe = RateProbe(threads=2); probe.sample(); probe.summary()   # rates under the timing's load

A task divides its work (weight bytes, FLOPs) by these rates to get the bound a variant is measured
against. Every figure is the best of a few runs: drift and other tenants only ever slow a run down.
Within one pass, yes; across passes the machine's state moves (a neighbour's job, the memory
controller's load: one EPYC read 20.7 GB/s in one run and 15.1 GB/s in the next), so bounds use the
median of the samples taken between timing passes, and reports show their spread.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

GEMM_SIZE = 2048  # square matmul: large enough to reach the BLAS peak, ~0.1 s on 2 cores
READ_BYTES = 512 * 2**20  # summed array: far beyond the last-level cache, so it measures DRAM
REPEATS = 5  # best of: drift and other tenants only ever slow a run down


def _best(run, repeats: int = REPEATS, warm_up: bool = True) -> float:
    """Seconds of the fastest of ``repeats`` calls, after one untimed call (page faults, thread pools)."""
    if warm_up:
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def measure_machine(threads: int) -> dict[str, Any]:
    """fp32 GEMM GFLOP/s and memory read GB/s on ``threads`` threads (torch, like the eager baseline)."""
    import torch  # here, not at the top: the task registry stays importable without loading torch

    torch.set_num_threads(threads)
    a, b = torch.rand(GEMM_SIZE, GEMM_SIZE), torch.rand(GEMM_SIZE, GEMM_SIZE)
    gemm = _best(lambda: torch.matmul(a, b))
    big = torch.ones(READ_BYTES // 4)
    read = _best(lambda: big.sum())
    return {
        "threads": threads,
        "gemm_gflops": round(2 * GEMM_SIZE**3 / gemm / 1e9, 1),
        "read_gbps": round(READ_BYTES / read / 1e9, 1),
        "method": f"best of {REPEATS}: torch.matmul {GEMM_SIZE}^2 fp32; torch.sum over {READ_BYTES >> 20} MiB",
    }


def _gemm_session(threads: int, int8: bool):
    """A one-node onnxruntime graph: x [N, N] times a constant [N, N] weight, fp32 MatMul or the
    DynamicQuantizeMatMul (u8 activations x s8 weights, activation quantization included) that
    int8-dynamic variants run."""

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


def _best_rate(run, repeats: int, work: float = 2 * GEMM_SIZE**3) -> float:
    """G(FL)OP/s (or GB/s) of the fastest of ``repeats`` calls doing ``work`` each (no warm-up call);
    by default one GEMM_SIZE^2 product."""
    return work / _best(run, repeats, warm_up=False) / 1e9


class RateProbe:
    """GEMM rates of torch fp32, onnxruntime fp32 and onnxruntime int8, and the memory read bandwidth,
    sampled once per timing pass.

    On a shared machine the load changes over minutes; sampling the rates in the same passes as the
    variants gives bounds measured under the load the steps saw (the medians), beside the figures
    measured at start."""

    def __init__(self, threads: int):
        import torch  # here, not at the top: the task registry stays importable without loading torch

        torch.set_num_threads(threads)
        x = np.random.default_rng(1).standard_normal((GEMM_SIZE, GEMM_SIZE), dtype=np.float32)
        a, b = torch.from_numpy(x), torch.from_numpy(x.copy())
        fp32, int8 = _gemm_session(threads, int8=False), _gemm_session(threads, int8=True)
        big = torch.ones(READ_BYTES // 4)
        # Name -> (one call, the work it does: FLOPs or bytes read).
        self.runs = {
            "torch_fp32_gflops": (lambda: torch.matmul(a, b), 2 * GEMM_SIZE**3),
            "ort_fp32_gflops": (lambda: fp32.run(None, {"x": x}), 2 * GEMM_SIZE**3),
            "ort_int8_gops": (lambda: int8.run(None, {"x": x}), 2 * GEMM_SIZE**3),
            "read_gbps": (lambda: big.sum(), READ_BYTES),
        }
        for run, _ in self.runs.values():
            run()  # warm-up: thread pools, weight packing, page faults
        self.samples: dict[str, list[float]] = {name: [] for name in self.runs}

    def sample(self, repeats: int = 2) -> None:
        for name, (run, work) in self.runs.items():
            self.samples[name].append(_best_rate(run, repeats, work))

    def summary(self) -> dict[str, Any]:
        """Each rate's median over the passes, the number of passes, and each rate's min/median/max."""
        measured = {name: values for name, values in self.samples.items() if values}
        spread = {
            name: {"min": round(min(v), 1), "median": round(statistics.median(v), 1), "max": round(max(v), 1)}
            for name, v in measured.items()
        }
        medians = {name: figures["median"] for name, figures in spread.items()}
        return {**medians, "samples": len(self.samples["read_gbps"]), "spread": spread}


def measure_int8_gops(threads: int) -> float:
    """onnxruntime's int8 GEMM rate (GOP/s) on ``threads`` threads, best of REPEATS, at start."""
    session = _gemm_session(threads, int8=True)
    feeds = {"x": np.random.default_rng(1).standard_normal((GEMM_SIZE, GEMM_SIZE), dtype=np.float32)}
    session.run(None, feeds)  # warm-up: thread pool, weight packing
    return round(_best_rate(lambda: session.run(None, feeds), REPEATS), 1)


def with_int8_rate(machine: dict, threads: int) -> dict:
    """``machine`` plus onnxruntime's int8 GEMM rate, which int8 variants' bounds divide by."""
    method = machine["method"] + f"; onnxruntime DynamicQuantizeMatMul {GEMM_SIZE}^2 u8s8"
    return {**machine, "int8_gops": measure_int8_gops(threads), "method": method}
