"""ONNX Runtime sessions for artifact graphs, and the backend registry that chooses their providers.

options = RuntimeOptions(backend="cpu", threads=2)
session = create_session(artifact_dir / "decoder.onnx", options)

With backend "tensorrt" an ONNX graph runs on onnxruntime's TensorRT provider, configured per graph by
``tensorrt_provider_options`` (optimization profiles from the manifest, fp16/int8 as the graph's
precision asks, engine and timing caches in a folder the user may choose); a TensorRT engine file
(``.engine``, an artifact of kind "tensorrt") runs on TensorRT's own runtime (runtime.tensorrt).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import onnxruntime as ort

from modelkiln.backends import BACKENDS, INSTALL_HINT
from modelkiln.confine import confined_name, external_data_locations
from modelkiln.errors import KilnError
from modelkiln.manifest import Manifest, artifact_hash

from .profiles import LEVELS, derive_profiles, shapes_option
from .tensorrt import EngineSession

ENGINE_SUFFIX = ".engine"  # TensorRT engine files of "tensorrt" artifacts
# Outputs a decoder feeds back as its next step's inputs: the KV cache (runtime.captioning's PRESENT_PREFIX,
# which imports this module). On CUDA they stay in GPU memory between steps.
DEVICE_RESIDENT_PREFIX = "present."


@dataclass(frozen=True)
class RuntimeOptions:
    """How the runtime runs an artifact's graphs."""

    backend: str = "cpu"  # key of BACKENDS
    threads: int | None = None  # intra-op threads per session; None lets onnxruntime use every core
    verify: bool = True  # hash every file against the manifest before loading (catches altered files)
    # backend "tensorrt": folder where onnxruntime's TensorRT provider keeps the engines and timing cache
    # it builds, reused by later loads; None: one per artifact under ~/.cache/modelkiln/tensorrt
    cache_dir: str | None = None
    # backend "tensorrt": graph file -> its TensorRT provider options (tensorrt_provider_options)
    tensorrt: dict[str, dict] = field(default_factory=dict)


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


def default_cache_dir(manifest: Manifest) -> Path:
    """Per-artifact cache folder: the artifact itself stays as its manifest lists it."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "modelkiln" / "tensorrt" / artifact_hash(manifest)[:16]


def tensorrt_provider_options(manifest: Manifest, cache_dir: str | os.PathLike | None) -> dict[str, dict]:
    """Graph file -> onnxruntime TensorRT provider options. Without profiles the provider rebuilds its
    engine for every new input shape; with them it builds once for the whole range and caches it."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir(manifest)
    profiles = derive_profiles(manifest)
    options = {}
    for name, spec in manifest.components.items():
        entry = {
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(cache / name),
            "trt_timing_cache_enable": True,
            "trt_timing_cache_path": str(cache),
            "trt_fp16_enable": spec.precision == "fp16",
            # int8 variants for TensorRT are QDQ graphs: TensorRT runs them as explicit int8.
            "trt_int8_enable": spec.precision == "int8",
        }
        if profiles[name]:
            entry |= {f"trt_profile_{level}_shapes": shapes_option(profiles[name], level) for level in LEVELS}
        options[spec.file] = entry
    return options


def _providers(path: str | os.PathLike, options: RuntimeOptions) -> list:
    providers: list = providers_for(options.backend)
    if options.backend == "tensorrt":
        settings = options.tensorrt.get(Path(path).name, {})
        for key in ("trt_engine_cache_path", "trt_timing_cache_path"):
            if key in settings:  # the provider writes its caches there; the folders must exist
                Path(settings[key]).mkdir(parents=True, exist_ok=True)
        providers[0] = (providers[0], settings)
    return providers


def _engine_session(path: str | os.PathLike, options: RuntimeOptions):
    if options.backend != "tensorrt":
        raise KilnError(
            f"{path} is a TensorRT engine: it runs with backend 'tensorrt' (--backend tensorrt), not "
            f"{options.backend!r}. For {options.backend}, load the ONNX artifact it was built from."
        )
    return EngineSession(path)


class IoBoundSession:
    """An onnxruntime session run through IO binding. Two uses: the captioning decoder's KV-cache outputs
    stay on the device (on CUDA the cache never makes the round trip through host memory), and outputs can
    be written into buffers the caller owns (``bound``): a decoder's in-place KV-cache buffer is bound
    as both its past input and its present output. Logits and every other output come back to the host."""

    def __init__(self, session: ort.InferenceSession, device: str):
        self.session = session
        self.device = device  # onnxruntime device name the cache outputs are bound to ("cpu", "cuda")

    def get_inputs(self):
        return self.session.get_inputs()

    def get_outputs(self):
        return self.session.get_outputs()

    def get_session_options(self):
        return self.session.get_session_options()

    def run(self, output_names, feeds, run_options=None):
        return self.session.run(output_names, feeds, run_options)

    def run_with_ort_values(
        self, output_names: list[str], feeds: dict, bound: dict[str, ort.OrtValue] | None = None
    ) -> list[ort.OrtValue]:
        """Run on ``feeds``; outputs named in ``bound`` are written into those values, the rest allocated."""
        binding = self.session.io_binding()
        for name, value in feeds.items():
            binding.bind_ortvalue_input(name, value)
        for name in output_names:
            if bound and name in bound:
                binding.bind_ortvalue_output(name, bound[name])
            else:
                binding.bind_output(name, self.device if name.startswith(DEVICE_RESIDENT_PREFIX) else "cpu")
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()


def check_external_data(path: str | os.PathLike) -> None:
    """Refuse a graph whose external data lies outside its folder (absolute, ``..``), before
    onnxruntime opens any of it: ``load`` also checks each is hashed by the manifest, this guards
    every other caller (quantizers, benchmarks)."""
    for location in external_data_locations(path):
        confined_name(location, "its external data", where=os.fspath(path))


def create_session(
    path: str | os.PathLike, options: RuntimeOptions, spinning: bool = True
) -> IoBoundSession | EngineSession:
    """A session for one graph. ``spinning=False`` stops its idle threads from busy-waiting for work:
    for a graph run once before another session's (a captioner's encoder), whose threads would
    otherwise spin on the cores the next graph needs. A TensorRT engine file gets an ``EngineSession``,
    which offers the same calls."""
    if Path(path).suffix == ENGINE_SUFFIX:
        return _engine_session(path, options)
    check_external_data(path)
    settings = ort.SessionOptions()
    if options.threads is not None:
        settings.intra_op_num_threads = options.threads
        settings.inter_op_num_threads = 1
    if not spinning:
        settings.add_session_config_entry("session.intra_op.allow_spinning", "0")
    settings.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Loading by path lets onnxruntime resolve external data relative to the graph, whatever the cwd.
    session = ort.InferenceSession(os.fspath(path), settings, providers=_providers(path, options))
    return IoBoundSession(session, "cuda" if options.backend == "cuda" else "cpu")
