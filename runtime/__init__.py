"""Runtime: runs exported artifacts without PyTorch.

    from modelkiln import runtime
    pipe = runtime.load("out/vit-gpt2", backend="cpu", threads=2)
    pipe("cat.jpg")                      # [{"generated_text": "a cat on a couch"}]
    pipe(["a.jpg", "b.png"], num_beams=4)  # [[{...}], [{...}]]

``load`` reads the manifest, checks the files against it and returns the pipeline the artifact's
family registers. Nothing here imports torch or transformers' modeling code, except for artifacts of
kind "torch" (bitsandbytes variants), which run on transformers.
"""

from __future__ import annotations

import os
from pathlib import Path

from modelkiln.manifest import read_manifest, require_intact
from modelkiln.registry import get_family

from .session import BACKENDS, RuntimeOptions

__all__ = ["BACKENDS", "RuntimeOptions", "load"]


def load(
    artifact_dir: str | os.PathLike, backend: str = "cpu", threads: int | None = None, verify: bool = True
):
    """Load an artifact directory and return its runtime pipeline."""
    directory = Path(artifact_dir).absolute()
    manifest = read_manifest(directory)
    require_intact(directory, manifest, hashes=verify)
    options = RuntimeOptions(backend=backend, threads=threads, verify=verify)
    if manifest.kind == "torch":
        # Imported here only: the ONNX path must stay free of torch.
        from .torch_captioning import torch_pipeline_class

        return torch_pipeline_class(manifest.family)(directory, manifest, options)
    pipeline_class = get_family(manifest.family).load_pipeline_class()
    return pipeline_class(directory, manifest, options)
