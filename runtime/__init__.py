"""Runtime: runs exported artifacts without PyTorch.

    from modelkiln import runtime
    pipe = runtime.load("out/vit-gpt2", backend="cpu", threads=2)
    pipe("cat.jpg")                      # [{"generated_text": "a cat on a couch"}]
    pipe(["a.jpg", "b.png"], num_beams=4)  # [[{...}], [{...}]]
    runtime.caption_dataset("out/vit-gpt2", "photos/", "photos/metadata.jsonl")  # see runtime.datasets

``load`` reads the manifest, checks the files against it and returns the pipeline the artifact's
family registers. Every path the manifest and its graphs name must stay inside the artifact and be
hashed by the manifest (modelkiln.confine); files it does not list (a ``.DS_Store``, a README) are left
out of what the pipeline sees, so the runtime opens listed files only. Nothing here imports torch or
transformers' modeling code, except for artifacts of kind "torch" (bitsandbytes variants), which run on
transformers (captioners) or diffusers (text-to-image), and of kind "tensorrt" (`kiln engine`), whose
engines run on TensorRT's runtime with ``backend="tensorrt"`` (runtime.tensorrt).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from pathlib import Path

from modelkiln.errors import ArtifactError, KilnError
from modelkiln.manifest import Manifest, extra_files, read_manifest, require_intact
from modelkiln.registry import get_family, load_attr

from .datasets import caption_dataset
from .session import BACKENDS, RuntimeOptions, tensorrt_provider_options
from .tensorrt import check_engines

__all__ = ["BACKENDS", "RuntimeOptions", "caption_dataset", "load", "torch_pipeline_class"]


def torch_pipeline_class(family: str) -> type:
    """The pipeline class of the family's torch artifacts. Imports torch: the ONNX path never calls it."""
    declared = get_family(family).torch_runtime
    if declared is None:
        raise KilnError(
            f"family {family} has no PyTorch (bitsandbytes) runtime; use an ONNX scheme for its artifacts."
        )
    return load_attr(declared.runtime)(family)


def load(
    artifact_dir: str | os.PathLike,
    backend: str = "cpu",
    threads: int | None = None,
    verify: bool = True,
    cache_dir: str | os.PathLike | None = None,
):
    """Load an artifact directory and return its runtime pipeline. ``cache_dir`` (backend "tensorrt",
    ONNX artifacts): where onnxruntime's TensorRT provider keeps the engines it builds; None: a folder
    per artifact under ~/.cache/modelkiln/tensorrt."""
    directory = Path(artifact_dir).absolute()
    manifest = read_manifest(directory)
    require_intact(directory, manifest, hashes=verify)
    on_provider = backend == "tensorrt" and manifest.kind == "onnx"  # onnxruntime's TensorRT provider
    trt_options = tensorrt_provider_options(manifest, cache_dir) if on_provider else {}
    options = RuntimeOptions(
        backend=backend,
        threads=threads,
        verify=verify,
        cache_dir=cache_dir and str(cache_dir),
        tensorrt=trt_options,
    )
    if manifest.kind == "torch":
        pipeline_class = torch_pipeline_class(manifest.family)
    else:
        pipeline_class = get_family(manifest.family).load_pipeline_class()
    if manifest.kind == "tensorrt" and backend == "tensorrt":
        check_engines(directory, manifest)  # one line naming the rebuild, before any engine is read
    if not extra_files(directory, manifest):
        return pipeline_class(directory, manifest, options)
    view = listed_view(directory, manifest)
    try:
        pipeline = pipeline_class(view, manifest, options)
    except BaseException:
        shutil.rmtree(view, ignore_errors=True)
        raise
    weakref.finalize(pipeline, shutil.rmtree, view, True)
    return pipeline


def listed_view(directory: Path, manifest: Manifest) -> Path:
    """A temporary folder of symlinks to the files the manifest lists, and nothing else.

    Pipelines open files by fixed names and libraries load whole folders (tokenizers, diffusers), so a
    file the manifest does not list (unhashed) could otherwise be read: run from this view, they can
    only see listed files. The names were checked to be confined by require_intact."""
    view = Path(tempfile.mkdtemp(prefix=f"kiln-{directory.name}-"))
    try:
        for name in manifest.files:
            (view / name).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(directory / name, view / name)
    except OSError as error:
        shutil.rmtree(view, ignore_errors=True)
        raise ArtifactError(
            f"{directory} holds files its manifest does not list ({', '.join(extra_files(directory, manifest)[:3])}"
            f"...), and a view without them cannot be made here ({error}). Remove those files."
        ) from error
    return view
