"""Where one denoising step's time goes: onnxruntime's node profiler per ONNX variant, torch's for eager.

    ort_step_profile(Path("out/onnx-fp32/transformer.onnx"), feeds, threads=2)
    # {"total_ms": ..., "ops": [{"op": "MatMul", "ms": ..., "share": 0.61, "nodes": 43}, ...],
    #  "fused": {"FusedMatMul": 4, "FastGelu": 5, ...}}
    torch_step_profile(pipe.transformer, feeds, threads=2)   # same shape of answer, aten ops

The onnxruntime session is made like the runtime makes its own (same threads, every graph
optimization), plus profiling; one warm-up call, then the profiled call. "fused" lists the op types
the optimized graph runs that the file does not hold: the fusions that fired.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

TOP_OPS = 8  # op types listed per variant; the rest are summed as "other"


def _summary(durations: Counter, counts: Counter) -> dict:
    total = sum(durations.values())
    ops = [
        {"op": op, "ms": us / 1e3, "share": us / total if total else 0.0, "nodes": counts[op]}
        for op, us in durations.most_common(TOP_OPS)
    ]
    rest = total - sum(durations[row["op"]] for row in ops)
    if rest > 0:
        ops.append({"op": "other", "ms": rest / 1e3, "share": rest / total, "nodes": None})
    return {"total_ms": total / 1e3, "ops": ops}


def _last_run_kernels(events: list[dict]) -> tuple[Counter, Counter]:
    """Kernel microseconds and node counts per op type within the last ``model_run``."""
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    start, end = runs[-1]["ts"], runs[-1]["ts"] + runs[-1]["dur"]
    durations, counts = Counter(), Counter()
    for event in events:
        kernel = event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time")
        if kernel and start <= event["ts"] <= end:
            durations[event["args"]["op_name"]] += event["dur"]
            counts[event["args"]["op_name"]] += 1
    return durations, counts


def _file_op_types(path: Path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node}


def ort_step_profile(path: Path, feeds: dict[str, np.ndarray], threads: int) -> dict:
    """Profile one call of the graph at ``path`` on the given feeds."""
    with tempfile.TemporaryDirectory() as folder:
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(folder) / "step")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        names = {value.name for value in session.get_inputs()}
        inputs = {key: value for key, value in feeds.items() if key in names}
        session.run(None, inputs)  # warm-up: weight packing, thread pool, allocator
        session.run(None, inputs)
        events = json.loads(Path(session.end_profiling()).read_text())
        del session
    durations, counts = _last_run_kernels(events)
    original = _file_op_types(path)
    return {**_summary(durations, counts), "fused": {op: n for op, n in counts.items() if op not in original}}


@contextlib.contextmanager
def _quiet_stderr():
    """The profiler's C++ side prints start/stop lines straight to file descriptor 2; keep them out of
    the CLI's output. Python exceptions still propagate (they are objects, not writes to fd 2)."""
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def torch_step_profile(module, feeds: dict[str, np.ndarray], threads: int) -> dict:
    """Profile one call of the eager denoiser on the same feeds (self CPU time per aten op)."""
    # Here, not at the top: the task registry stays importable without loading torch.
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(threads)
    inputs = {key: torch.from_numpy(value) for key, value in feeds.items()}
    with torch.no_grad():
        module(**inputs, return_dict=False)  # warm-up
        with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU]) as profiler:
            module(**inputs, return_dict=False)
    durations, counts = Counter(), Counter()
    for row in profiler.key_averages():
        if row.self_cpu_time_total > 0:
            durations[row.key] += row.self_cpu_time_total
            counts[row.key] += row.count
    return {**_summary(durations, counts), "fused": {}}
