"""Execution backends: a plain dict from backend name to onnxruntime execution providers.

Base layer and import-free, so the CLI can offer the choices without loading onnxruntime; the runtime
(``runtime.session``) turns a name into providers and checks that this onnxruntime has them.
"""

from __future__ import annotations

# Backend name -> onnxruntime execution providers, in preference order. CPU stays last so that
# operators a GPU provider lacks still run.
BACKENDS: dict[str, tuple[str, ...]] = {
    "cpu": ("CPUExecutionProvider",),
    "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
    "tensorrt": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
}

# Backend name -> what to install when this onnxruntime lacks the backend's first provider.
INSTALL_HINT: dict[str, str] = {
    "cuda": "install the GPU build: pip install 'modelkiln[gpu]' (onnxruntime-gpu) on a machine with CUDA",
    "tensorrt": "install onnxruntime-gpu built with TensorRT, and TensorRT itself ('modelkiln[tensorrt]')",
}
