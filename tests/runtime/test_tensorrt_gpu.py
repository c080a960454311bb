"""TensorRT on a GPU: engines built by `kiln engine` and run through TensorRT's runtime with the ONNX
pipelines' call shapes, refit with a LoRA, refused elsewhere; onnxruntime's TensorRT provider with the
manifest's profiles and caches.

Marked ``gpu``: they run where ``tensorrt`` imports and a CUDA device answers, and are skipped elsewhere
with the reason (no machine of this project's CI has either; see the README's TensorRT section).
"""

from __future__ import annotations

import shutil
from dataclasses import replace

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from modelkiln import runtime
from modelkiln.errors import ArtifactError, KilnError
from modelkiln.exporters.engine import EngineConfig, build_engines, refit_engines
from modelkiln.exporters.export import ExportConfig, export_model
from modelkiln.fixtures.tiny_diffusion import build_pipeline, save_tiny_lora
from modelkiln.manifest import read_manifest, write_manifest
from modelkiln.metrics import psnr
from modelkiln.runtime.cuda import CudaDevice


def _no_gpu_reason() -> str | None:
    try:
        import tensorrt  # noqa: F401  (only whether it imports)
    except ImportError as error:
        return f"tensorrt does not import here ({error})"
    try:
        CudaDevice()
    except KilnError as error:
        return f"no CUDA device here: {error}"
    return None


REASON = _no_gpu_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(REASON is not None, reason=str(REASON))]
SIZE = {"height": 128, "width": 128, "num_inference_steps": 2}  # tiny SD 1.x (VAE factor 8): 16x16 latents


@pytest.fixture(scope="module")
def sd1_engines(target_artifact, tmp_path_factory):
    """(ONNX artifact, engine artifact) of the tiny SD 1.x, fp32 engines from the derived profiles."""
    _, artifact = target_artifact("sd1", "tensorrt")
    out = tmp_path_factory.mktemp("sd1-engines") / "engines"
    build_engines(artifact, out)
    return artifact, out


def _images(artifact, backend: str, **options):
    return runtime.load(artifact, backend=backend, **options)("a red cat", seed=3, **SIZE).images


def test_engines_record_where_and_how_they_were_built(sd1_engines):
    _, engines = sd1_engines
    manifest = read_manifest(engines)
    engine = manifest.engine
    assert manifest.kind == "tensorrt" and manifest.parent["artifact_sha256"]
    assert engine["precision"] == "fp32" and engine["refittable"] and engine["gpu"] == CudaDevice().name()
    assert engine["profiles"]["unet"]["sample"]["max"] == [8, 4, 24, 24]
    assert (engines / engine["timing_cache"]).stat().st_size > 0 and "timing.cache" in manifest.files


def test_sd1_engines_make_the_onnx_pipelines_image(sd1_engines):
    artifact, engines = sd1_engines
    ours, reference = _images(engines, "tensorrt")[0], _images(artifact, "cpu")[0]
    assert psnr(np.asarray(ours), np.asarray(reference)) >= 40


def test_a_shape_outside_the_profile_names_the_fix(sd1_engines):
    pipe = runtime.load(sd1_engines[1], backend="tensorrt")
    with pytest.raises(KilnError, match="outside the engine's optimization profile"):
        pipe("a red cat", height=256, width=256, num_inference_steps=1)  # 32x32 latents: max 24


def test_fp16_engines_stay_close(sd1_engines, tmp_path):
    artifact, _ = sd1_engines
    build_engines(artifact, tmp_path / "fp16", EngineConfig(precision="fp16"))
    ours, reference = _images(tmp_path / "fp16", "tensorrt")[0], _images(artifact, "cpu")[0]
    assert psnr(np.asarray(ours), np.asarray(reference)) >= 25


def test_refit_puts_a_lora_in_without_rebuilding(sd1_engines, target_artifact, tmp_path):
    artifact, engines = sd1_engines
    source, _ = target_artifact("sd1", "tensorrt")
    save_tiny_lora(build_pipeline("sd1"), tmp_path / "lora")
    lora = tmp_path / "lora-onnx"
    export_model(source, lora, ExportConfig(target="tensorrt", lora=(f"{tmp_path / 'lora'}:0.8",)))
    manifest = refit_engines(lora, engines, tmp_path / "refit")
    assert manifest.engine["refitted_from"] and manifest.source.lora
    ours, reference = _images(tmp_path / "refit", "tensorrt")[0], _images(lora, "cpu")[0]
    assert psnr(np.asarray(ours), np.asarray(reference)) >= 40
    assert psnr(np.asarray(ours), np.asarray(_images(artifact, "cpu")[0])) < 40  # the LoRA changed it


def test_engines_from_another_tensorrt_are_refused_naming_the_rebuild(sd1_engines, tmp_path):
    copy = tmp_path / "engines"
    shutil.copytree(sd1_engines[1], copy)
    manifest = read_manifest(copy)
    write_manifest(copy, replace(manifest, engine={**manifest.engine, "tensorrt": "9.0.0"}))
    with pytest.raises(
        ArtifactError, match=r"built with TensorRT 9\.0\.0 .* Rebuild them here: kiln engine "
    ):
        runtime.load(copy, backend="tensorrt")


def test_captioner_engines_caption_like_the_onnx_artifact(target_artifact, tmp_path):
    _, artifact = target_artifact("vit-gpt2", "tensorrt")
    build_engines(artifact, tmp_path / "engines")
    images = [
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8))
        for i in range(3)
    ]
    for beams in (1, 4):
        options = {"num_beams": beams, "max_new_tokens": 8}
        ours = runtime.load(tmp_path / "engines", backend="tensorrt")(images, **options)
        assert ours == runtime.load(artifact)(images, **options)


@pytest.mark.skipif(
    "TensorrtExecutionProvider" not in ort.get_available_providers(),
    reason="this onnxruntime has no TensorRT execution provider (install onnxruntime-gpu)",
)
def test_onnxruntime_tensorrt_provider_uses_the_profiles_and_caches(target_artifact, tmp_path):
    _, artifact = target_artifact("sd1", "tensorrt")
    ours = _images(artifact, "tensorrt", cache_dir=str(tmp_path / "cache"))[0]
    assert psnr(np.asarray(ours), np.asarray(_images(artifact, "cpu")[0])) >= 40
    assert list((tmp_path / "cache").rglob("*.engine")) and list((tmp_path / "cache").rglob("*timing*"))
    # A second load at another size in the profile reuses the cached engines instead of rebuilding.
    built = {p: p.stat().st_mtime for p in (tmp_path / "cache").rglob("*.engine")}
    runtime.load(artifact, backend="tensorrt", cache_dir=str(tmp_path / "cache"))(
        "a dog",
        height=160,
        width=160,
        num_inference_steps=1,  # 20x20 latents
    )
    assert {p: p.stat().st_mtime for p in (tmp_path / "cache").rglob("*.engine")} == built
