"""ONNX Runtime sessions for artifact graphs, and the backend registry that chooses their providers.

options = RuntimeOptions(backend="cpu", threads=2)
session = create_session(artifact_dir / "decoder.onnx", options)
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import onnxruntime as ort

from modelkiln.backends import BACKENDS, INSTALL_HINT
from modelkiln.confine import confined_name, external_data_locations
from modelkiln.errors import KilnError


@dataclass(frozen=True)
class RuntimeOptions:
    """How the runtime runs an artifact's graphs."""

    backend: str = "cpu"  # key of BACKENDS
    threads: int | None = None  # intra-op threads per session; None lets onnxruntime use every core
    verify: bool = True  # hash every file against the manifest before loading (catches altered files)


def providers_for(backend: str) -> list[str]:
    """The providers of a backend, or an error naming the valid backends / the missing install."""
    if backend not in BACKENDS:
        raise KilnError(f"unknown backend {backend!r}. Valid backends: {', '.join(BACKENDS)}.")
    wanted = BACKENDS[backend]
    available = set(ort.get_available_providers())
    if wanted[0] not in available:
        raise KilnError(
            f"backend {backend!r} needs onnxruntime's {wanted[0]}, which this onnxruntime lacks "
            f"(available: {', '.join(sorted(available))}). To fix it, {INSTALL_HINT[backend]}; "
            "or use --backend cpu."
        )
    return list(wanted)


def check_external_data(path: str | os.PathLike) -> None:
    """Refuse a graph whose external data lies outside its folder (absolute, ``..``), before
    onnxruntime opens any of it: ``load`` also checks each is hashed by the manifest, this guards
    every other caller (quantizers, benchmarks)."""
    for location in external_data_locations(path):
        confined_name(location, "its external data", where=os.fspath(path))


def create_session(
    path: str | os.PathLike, options: RuntimeOptions, spinning: bool = True
) -> ort.InferenceSession:
    """A session for one graph. ``spinning=False`` stops its idle threads from busy-waiting for work:
    for a graph run once before another session's (a captioner's encoder), whose threads would
    otherwise spin on the cores the next graph needs."""
    check_external_data(path)
    settings = ort.SessionOptions()
    if options.threads is not None:
        settings.intra_op_num_threads = options.threads
        settings.inter_op_num_threads = 1
    if not spinning:
        settings.add_session_config_entry("session.intra_op.allow_spinning", "0")
    settings.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Loading by path lets onnxruntime resolve external data relative to the graph, whatever the cwd.
    return ort.InferenceSession(os.fspath(path), settings, providers=providers_for(options.backend))
