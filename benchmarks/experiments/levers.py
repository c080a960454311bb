"""Try speed levers on one SD3 denoising step, each timed round-robin against PyTorch eager.

    python -m modelkiln.benchmarks.experiments.levers --artifacts /tmp/kiln-bench-sd3 \\
        --out benchmarks/results/sd3-step-full --rounds 5
    # levers.json, levers.md beside the benchmark's report

A lever is a way to run an exported transformer graph (``onnx-fp32`` or ``int8-dynamic`` under
``--artifacts``, as `kiln bench --family sd3` made them): onnxruntime session options, or a graph
rewrite made in a scratch folder (the artifact is never changed). Per base graph, every lever and the
eager transformer run the same feeds in turn, round after round; speed-ups are medians of the
per-round ratios, so drift hits both sides of each ratio alike. Feeds are seeded random tensors with
the benchmark's shapes (guided batch 2): step time does not depend on the values.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from modelkiln.manifest import read_manifest

from .rewrites import (
    int8_without_excludes,
    mha_and_fusions,
    multi_head_attention,
    ort_mmdit_fusions,
)


@dataclass(frozen=True)
class Lever:
    """One way to run a transformer graph."""

    rewrite: Callable[[Path, Path, dict], Path] | None  # (graph, scratch, transformer config) -> new graph
    spinning: bool = True  # onnxruntime's intra-op threads spin while waiting for work (its default)
    note: str = ""  # what the lever changes, for the report
    bases: tuple[str, ...] = ("onnx-fp32", "int8-dynamic")  # base graphs it applies to


LEVERS: dict[str, Lever] = {
    "runtime default": Lever(None, note="the session modelkiln.runtime makes: every optimization, spinning"),
    "no spinning": Lever(None, spinning=False, note="session.intra_op.allow_spinning = 0"),
    "ORT mmdit fusions": Lever(ort_mmdit_fusions, note="onnxruntime.transformers optimizer, model_type mmdit"),
    "MultiHeadAttention": Lever(multi_head_attention, note="each SDPA subgraph -> com.microsoft MultiHeadAttention"),
    "MHA + no spinning": Lever(multi_head_attention, spinning=False, note="both of the above"),
    "MHA + fusions + no spinning": Lever(mha_and_fusions, spinning=False, note="all three"),
    "no recipe excludes": Lever(int8_without_excludes, note="int8 also for the embedders and the output projection",
                                bases=("int8-dynamic",)),
}  # fmt: skip
BASES = ("onnx-fp32", "int8-dynamic")  # artifact folders under --artifacts whose transformer is tried


def feeds_for(config: dict, size: int, text_tokens: int, vae_factor: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    latent = size // vae_factor
    return {
        "hidden_states": rng.standard_normal((2, config["in_channels"], latent, latent), dtype=np.float32),
        "encoder_hidden_states": rng.standard_normal(
            (2, text_tokens, config["joint_attention_dim"]), dtype=np.float32
        ),
        "pooled_projections": rng.standard_normal((2, config["pooled_projection_dim"]), dtype=np.float32),
        "timestep": np.full(2, 500.0, dtype=np.float32),
    }


def ort_session(path: Path, threads: int, spinning: bool):
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _eager(source: Path, threads: int):
    # Here, not at the top: only this lever needs torch, and a rewrite's child process need not load it.
    import torch
    from diffusers import SD3Transformer2DModel

    torch.set_num_threads(threads)
    model = SD3Transformer2DModel.from_pretrained(source / "transformer", dtype=torch.float32).eval()

    def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
        with torch.no_grad():
            inputs = {key: torch.from_numpy(value) for key, value in feeds.items()}
            return model(**inputs, return_dict=False)[0].numpy()

    return run


def _timed(run, feeds) -> float:
    start = time.perf_counter()
    run(feeds)
    return time.perf_counter() - start


def _in_child(rewrite: Callable, *args):
    """``rewrite(*args)`` in a fresh process: a rewrite holds whole multi-GB graphs as protobuf, whose
    freed memory this process would otherwise keep (it ran out of memory after ten rewrites)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(rewrite, *args).result()


def build_lever(name: str, graph: Path, scratch: Path, config: dict, threads: int):
    """run(feeds) for one lever on this graph."""
    lever = LEVERS[name]
    path = (
        graph
        if lever.rewrite is None
        else _in_child(lever.rewrite, graph, scratch / lever.rewrite.__name__, config)
    )
    session = ort_session(path, threads, lever.spinning)
    return lambda feeds: session.run(None, feeds)[0]


def measure_lever(name: str, base: Path, scratch: Path, context: dict, log) -> list[dict]:
    """Rows of one group: eager, the runtime default session and this lever, round-robin. A group at a
    time keeps two sessions of the graph in memory, not one per lever; a lever that cannot be built is
    logged and skipped (a finding, not a crash)."""
    config, threads = context["config"], context["threads"]
    try:
        runs = {"runtime default": build_lever("runtime default", base, scratch, config, threads)}
        runs[name] = build_lever(name, base, scratch, config, threads)
    except Exception as exc:
        log(f"  {name}: could not be built ({type(exc).__name__}: {str(exc)[:200]})")
        return []
    log(f"  {name}: timing against eager and the runtime default")
    return measure_base(runs, context["eager"], context["feeds"], context["rounds"], log)


def measure_base(runs: dict[str, Callable], eager, feeds, rounds: int, log) -> list[dict]:
    """Every lever and eager in turn, ``rounds`` times; one row per lever."""
    reference = eager(feeds)  # also the eager warm-up
    diffs = {name: float(np.max(np.abs(run(feeds) - reference))) for name, run in runs.items()}  # warm-ups
    times: dict[str, list[float]] = {"eager": [], **{name: [] for name in runs}}
    for index in range(rounds):
        times["eager"].append(_timed(eager, feeds))
        for name, run in runs.items():
            times[name].append(_timed(run, feeds))
        log(f"  round {index + 1}/{rounds}: " + ", ".join(f"{n} {v[-1]:.2f}s" for n, v in times.items()))
    default = times.get("runtime default")
    return [
        {
            "lever": name,
            "median_s": statistics.median(times[name]),
            "eager_median_s": statistics.median(times["eager"]),
            "speedup_vs_eager": statistics.median(
                e / t for e, t in zip(times["eager"], times[name], strict=True)
            ),
            "vs_runtime_default": statistics.median(d / t for d, t in zip(default, times[name], strict=True))
            if default
            else None,
            "max_abs_diff_vs_eager": diffs[name],
            "note": LEVERS[name].note,
            "times_s": times[name],
        }
        for name in runs
    ]


def _markdown(report: dict) -> str:
    lines = [
        "# Speed levers for one SD3 denoising step",
        "",
        f"`{report['command']}`",
        "",
        report["setup"],
        "",
    ]
    header = "| base | lever | median s | eager median s | speed-up vs eager | vs runtime default | max abs diff | what |"
    lines += [header, "|---|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        vs = "-" if row["vs_runtime_default"] is None else f"{row['vs_runtime_default']:.2f}x"
        lines.append(
            f"| {row['base']} | {row['lever']} | {row['median_s']:.2f} | {row['eager_median_s']:.2f} | "
            f"{row['speedup_vs_eager']:.2f}x | {vs} | {row['max_abs_diff_vs_eager']:.1e} | {row['note']} |"
        )
    return "\n".join([*lines, ""])


def base_rows(graph: Path, context: dict, args: argparse.Namespace, log) -> Iterator[dict]:
    """Every lever on one graph, a group each, yielded group by group; the runtime default's row comes
    from its first group."""
    names = [n for n, lever in LEVERS.items() if n != "runtime default" and graph.parent.name in lever.bases]
    for index, name in enumerate(names):
        with tempfile.TemporaryDirectory(dir=args.scratch) as scratch:
            group = measure_lever(name, graph, Path(scratch), context, log)
        yield from (row for row in group if row["lever"] == name or index == 0)


def run_levers(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict:
    """Every lever on every base graph under --artifacts; writes levers.json and levers.md into --out."""
    artifacts = Path(args.artifacts)
    source = Path(read_manifest(artifacts / "onnx-fp32").source.model)
    config = json.loads((source / "transformer" / "config.json").read_text())
    runtime = read_manifest(artifacts / "onnx-fp32").runtime
    text = 77 + runtime["max_sequence_length"]
    feeds = feeds_for(config, args.size, text, runtime["vae_scale_factor"])
    context = {"config": config, "threads": args.threads, "feeds": feeds, "rounds": args.rounds}
    context["eager"], rows = _eager(source, args.threads), []
    command = " ".join(["python -m modelkiln.benchmarks.experiments.levers", *sys.argv[1:]])
    setup = (
        f"Source `{source}`; transformer feeds of a guided {args.size}x{args.size} step (batch 2, {text} "
        f"text tokens); {args.rounds} rounds per lever, each running eager, the runtime default and the "
        f"lever once; {args.threads} threads; speed-ups are medians of per-round ratios."
    )
    report = {"command": command, "setup": setup, "rows": rows}
    for base in (b for b in BASES if (artifacts / b / "transformer.onnx").is_file()):
        log(f"{base}:")
        for row in base_rows(artifacts / base / "transformer.onnx", context, args, log):
            rows.append({"base": base, **row})
            _write(report, Path(args.out))  # after every group: a crash keeps what was measured
    return report


def _write(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "levers.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "levers.md").write_text(_markdown(report))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--artifacts", required=True, help="the --artifacts folder of a `kiln bench --family sd3` run"
    )
    parser.add_argument("--out", required=True, help="folder for levers.json and levers.md")
    parser.add_argument("--size", type=int, default=512, help="image side the step's latents stand for")
    parser.add_argument(
        "--rounds", type=int, default=5, help="timed rounds (each runs eager and every lever)"
    )
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads")
    parser.add_argument("--scratch", default=os.environ.get("TMPDIR"), help="folder for rewritten graphs")
    run_levers(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
