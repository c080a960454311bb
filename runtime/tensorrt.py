"""TensorRT engines run like onnxruntime sessions, so every pipeline runs an engine artifact unchanged.

An artifact of kind ``tensorrt`` (written by ``kiln engine``) holds one serialized engine per component;
``create_session`` opens each as an ``EngineSession``, which offers the session calls the pipelines
make (``get_inputs``, ``get_outputs``, ``run``, ``run_with_ort_values``)::

    check_engines(directory, manifest)             # one line naming the rebuild command on a mismatch
    session = EngineSession(directory / "unet.engine")
    (noise,) = session.run(None, {"sample": latents, "timestep": t, "encoder_hidden_states": states})

``tensorrt`` is imported when an engine is opened, never at import, so the runtime works without it;
a missing TensorRT, driver or GPU is one line saying what to install or where to run.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from modelkiln.errors import ArtifactError, KilnError
from modelkiln.manifest import Manifest

from .cuda import NO_GPU_FIX, CudaDevice

INSTALL_TENSORRT = "pip install 'modelkiln[tensorrt]' (TensorRT 10) on a machine with an NVIDIA GPU"


def import_tensorrt():
    """The tensorrt module, or one line saying how to get it."""
    try:
        import tensorrt  # here, not at the top: the runtime must work where TensorRT is not installed
    except ImportError as error:
        raise KilnError(
            f"TensorRT is not installed here ({error}). Install it: {INSTALL_TENSORRT}."
        ) from None
    return tensorrt


def engine_environment(trt, cuda: CudaDevice) -> dict[str, str]:
    """What an engine is tied to: it loads only under the TensorRT version and GPU it was built with."""
    return {"tensorrt": trt.__version__, "gpu": cuda.name(), "compute_capability": cuda.compute_capability()}


def rebuild_command(directory: Path, manifest: Manifest) -> str:
    parent = (manifest.parent or {}).get("path", "ONNX_ARTIFACT")
    source = os.path.normpath(Path(directory) / parent)
    return f"kiln engine {source} --out {directory} --overwrite"


def engine_mismatch(directory: Path, manifest: Manifest, here: dict[str, str]) -> str | None:
    """The one-line refusal when the engines were built under another TensorRT or GPU than ``here``
    (``engine_environment``), naming the rebuild command; None when they match."""
    built = {key: (manifest.engine or {}).get(key) for key in here}
    if built == here:
        return None
    return (
        f"{directory} holds TensorRT engines built with TensorRT {built['tensorrt']} on {built['gpu']} "
        f"(compute {built['compute_capability']}); this machine has TensorRT {here['tensorrt']} on "
        f"{here['gpu']} (compute {here['compute_capability']}), and engines only load where they were "
        f"built. Rebuild them here: {rebuild_command(directory, manifest)}"
    )


def check_engines(directory: Path, manifest: Manifest, trt=None, cuda: CudaDevice | None = None) -> None:
    """Refuse engines built under another TensorRT or GPU, before any of them is deserialized."""
    trt = trt or import_tensorrt()
    problem = engine_mismatch(directory, manifest, engine_environment(trt, cuda or CudaDevice()))
    if problem:
        raise ArtifactError(problem)


@dataclass(frozen=True)
class TensorInfo:
    """What ``get_inputs``/``get_outputs`` return per tensor, as onnxruntime's NodeArg does."""

    name: str  # tensor name, the graph's input or output name
    shape: tuple  # engine shape, -1 where dynamic
    type: str  # numpy dtype name


class EngineSession:
    """One deserialized engine, its execution context, a stream and reusable device buffers."""

    def __init__(self, path: str | os.PathLike, trt=None, cuda: CudaDevice | None = None):
        self.trt = trt or import_tensorrt()
        self.cuda = cuda or CudaDevice()
        self.logger = self.trt.Logger(self.trt.Logger.WARNING)
        self.runtime = self.trt.Runtime(self.logger)  # kept: it must outlive the engine it deserializes
        self.engine = self.runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise ArtifactError(
                f"{path} is not an engine this TensorRT {self.trt.__version__} can load. {NO_GPU_FIX}."
            )
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {name: self.engine.get_tensor_mode(name) == self.trt.TensorIOMode.INPUT for name in names}
        self.input_names = [name for name in names if is_input[name]]
        self.output_names = [name for name in names if not is_input[name]]
        self.dtypes = {name: np.dtype(self.trt.nptype(self.engine.get_tensor_dtype(name))) for name in names}
        self.stream = self.cuda.stream()
        self.buffers: dict[str, tuple[int, int]] = {}  # tensor name -> (device pointer, capacity in bytes)

    def _info(self, names: list[str]) -> list[TensorInfo]:
        return [TensorInfo(n, tuple(self.engine.get_tensor_shape(n)), self.dtypes[n].name) for n in names]

    def get_inputs(self) -> list[TensorInfo]:
        return self._info(self.input_names)

    def get_outputs(self) -> list[TensorInfo]:
        return self._info(self.output_names)

    def _buffer(self, name: str, nbytes: int) -> int:
        """A device buffer of at least ``nbytes`` for ``name``, grown only when a larger shape comes."""
        pointer, capacity = self.buffers.get(name, (0, -1))
        if nbytes > capacity:
            if pointer:
                self.cuda.free(pointer)
            pointer, capacity = self.cuda.alloc(nbytes), nbytes
            self.buffers[name] = (pointer, capacity)
        if not self.context.set_tensor_address(name, pointer):
            raise KilnError(f"TensorRT refused the address of {name}.")
        return pointer

    def _feed(self, name: str, value: np.ndarray) -> None:
        array = np.ascontiguousarray(value, dtype=self.dtypes[name])
        if not self.context.set_input_shape(name, array.shape):
            raise KilnError(
                f"input {name} of shape {list(array.shape)} is outside the engine's optimization profile. "
                "Rebuild the engine with a profile that covers it: kiln engine ... --profile COMPONENT:"
                f"{name}=MIN,OPT,MAX."
            )
        pointer = self._buffer(name, array.nbytes)
        if array.nbytes:
            self.cuda.to_device(pointer, array, self.stream)

    def run(self, output_names: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        missing = [name for name in self.input_names if name not in feeds]
        if missing:
            raise KilnError(f"the engine needs inputs {', '.join(missing)}, which were not given.")
        for name in self.input_names:
            self._feed(name, feeds[name])
        results = {}
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            results[name] = np.empty(shape, dtype=self.dtypes[name])
            self._buffer(name, results[name].nbytes)
        if not self.context.execute_async_v3(self.stream):
            raise KilnError("TensorRT failed to run the engine (its log above says why).")
        for name, array in results.items():
            if array.nbytes:
                self.cuda.to_host(array, self.buffers[name][0], self.stream)
        self.cuda.synchronize(self.stream)
        return [results[name] for name in (output_names or self.output_names)]

    def run_with_ort_values(self, output_names: list[str], feeds: dict) -> list[ort.OrtValue]:
        """The captioning decoder's call: onnxruntime values in and out (host copies here)."""
        arrays = {name: value.numpy() for name, value in feeds.items()}
        return [ort.OrtValue.ortvalue_from_numpy(array) for array in self.run(output_names, arrays)]

    def __del__(self):
        # Device memory is not Python's: give it back when the session goes (a failed free at
        # interpreter exit, after the driver is unloaded, is no reason to raise).
        with contextlib.suppress(KilnError):
            for pointer, _ in getattr(self, "buffers", {}).values():
                self.cuda.free(pointer)
