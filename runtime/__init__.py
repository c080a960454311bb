"""Runtime: runs exported artifacts without PyTorch.

    from modelkiln import runtime
    pipe = runtime.load("out/vit-gpt2", backend="cpu", threads=2)
    pipe("cat.jpg")                      # [{"generated_text": "a cat on a couch"}]
    pipe(["a.jpg", "b.png"], num_beams=4)  # [[{...}], [{...}]]

``load`` reads the manifest, checks the files against it and returns the pipeline the artifact's
family registers. Nothing here imports torch or transformers' modeling code, except for artifacts of
kind "torch" (bitsandbytes variants), which run on transformers (captioners) or diffusers (text-to-image).
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from modelkiln.manifest import read_manifest, require_intact
from modelkiln.registry import get_family

from .session import BACKENDS, RuntimeOptions

__all__ = ["BACKENDS", "RuntimeOptions", "load", "torch_pipeline_class"]

# Task -> module whose torch_pipeline_class(family) runs that task's torch (bitsandbytes) artifacts.
TORCH_RUNTIMES: dict[str, str] = {
    "image-to-text": "modelkiln.runtime.torch_captioning",
    "text-to-image": "modelkiln.runtime.torch_diffusion",
}


def torch_pipeline_class(family: str) -> type:
    """The pipeline class of the family's torch artifacts. Imports torch: the ONNX path never calls it."""
    module = importlib.import_module(TORCH_RUNTIMES[get_family(family).task])
    return module.torch_pipeline_class(family)


def load(
    artifact_dir: str | os.PathLike, backend: str = "cpu", threads: int | None = None, verify: bool = True
):
    """Load an artifact directory and return its runtime pipeline."""
    directory = Path(artifact_dir).absolute()
    manifest = read_manifest(directory)
    require_intact(directory, manifest, hashes=verify)
    options = RuntimeOptions(backend=backend, threads=threads, verify=verify)
    if manifest.kind == "torch":
        return torch_pipeline_class(manifest.family)(directory, manifest, options)
    pipeline_class = get_family(manifest.family).load_pipeline_class()
    return pipeline_class(directory, manifest, options)
