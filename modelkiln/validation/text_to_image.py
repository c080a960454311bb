"""Validate a text-to-image artifact against the diffusers pipeline it came from.

Two checks, recorded in a JSON report and in the artifact's manifest:

1. per component, the largest absolute difference between the ONNX graph and its PyTorch wrapper on
   the inputs the artifact's own run fed that graph (real prompts, real first-step latents), and
   whether every output is finite;
2. end to end, the artifact's images against the diffusers pipeline's with identical initial latents
   and settings: PSNR and the largest pixel difference (0-255), per prompt. LoRAs recorded in the
   manifest are loaded into the diffusers pipeline unfused, so the fused export is checked against
   what diffusers itself computes.

    report = validate_diffusion("out/sd35", "stabilityai/stable-diffusion-3.5-medium",
                                DiffusionValidateConfig(steps=4, height=512, width=512))
    report["passed"]   # False -> `kiln validate` exits 1
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modelkiln import runtime
from modelkiln.exporters.source import resolve_source
from modelkiln.exporters.targets import get_target
from modelkiln.manifest import Manifest, read_manifest
from modelkiln.metrics import image_metrics
from modelkiln.registry import get_family
from modelkiln.validation.report import finish_report


@dataclass(frozen=True)
class DiffusionValidateConfig:
    """What `kiln validate` compares for a text-to-image artifact, and how strictly."""

    atol: float = 1e-3  # absolute tolerance per component output (denoisers sum thousands of products)
    rtol: float = 1e-3  # relative part, times the largest reference magnitude
    prompts: tuple[str, ...] = ("a photo of a red cat", "a dog on the beach, watercolor")  # one image each
    steps: int = 4  # denoising steps per image (the error compounds over steps; 4 shows it)
    height: int | None = None  # None: the model's default size
    width: int | None = None  # None: the model's default size
    guidance_scale: float | None = None  # None: the family's default
    seed: int = 0  # seed of the shared initial latents
    min_psnr: float = 40.0  # image PSNR (dB) vs diffusers below which validation fails
    allow_pickle: bool = False  # passed to the source loader, as for export
    backend: str = "cpu"  # runtime backend the artifact is run on
    update_manifest: bool = True  # record the report in manifest.json


def reference_pipeline(manifest: Manifest, source):
    """The diffusers pipeline in fp32, with the artifact's LoRAs loaded (not fused) at their scales."""
    # Here, not at the top: diffusers and torch take seconds to load, and `modelkiln.validation` is
    # also read (for validation_images) by quantize's calibration, which needs neither.
    import diffusers
    import torch

    from modelkiln.exporters.diffusion import Lora, quiet_loading
    from modelkiln.runtime.torch_diffusion import absent_components

    pipeline_class = getattr(diffusers, manifest.runtime["pipeline"])
    # Components the export left out (SD3's T5) are left out of the reference the same way.
    dropped = {name: None for name in manifest.runtime.get("without", [])} | absent_components(source.path)
    with quiet_loading():
        pipe = pipeline_class.from_pretrained(source.path, dtype=torch.float32, **dropped)
    names = []
    for i, lora in enumerate(manifest.source.lora):
        pipe.load_lora_weights(str(Lora(Path(lora["path"])).weights_file()), adapter_name=f"lora{i}")
        names.append(f"lora{i}")
    if names:
        pipe.set_adapters(names, adapter_weights=[lora["scale"] for lora in manifest.source.lora])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def compare_images(pipe, reference, config: DiffusionValidateConfig) -> dict[str, Any]:
    """Each prompt through both pipelines from the same latents; image metrics per prompt."""
    results = {}
    for i, prompt in enumerate(config.prompts):
        request = pipe.request(
            prompt, None, config.steps, config.guidance_scale, config.height, config.width, config.seed + i
        )
        latents = pipe.initial_latents(request)
        options = {
            "num_inference_steps": request.steps,
            "guidance_scale": request.guidance_scale,
            "height": request.height,
            "width": request.width,
            "output_type": "np",
        }
        if request.max_sequence_length:
            options["max_sequence_length"] = request.max_sequence_length
        ours = pipe(prompt, latents=latents.clone(), **options).images[0]
        theirs = reference(prompt, latents=latents.clone(), **options).images[0]
        metrics = image_metrics(ours, theirs)
        results[prompt] = {**metrics, "passed": bool(metrics["psnr"] >= config.min_psnr)}
    return results


def _compare_outputs(session, feeds: dict, expected, config: DiffusionValidateConfig) -> dict[str, Any]:
    rows = []
    for spec, got, want in zip(session.get_outputs(), session.run(None, feeds), expected, strict=True):
        want = want.numpy()
        diff = float(np.max(np.abs(got - want)))
        limit = config.atol + config.rtol * float(np.max(np.abs(want)))
        rows.append(
            {
                "output": spec.name,
                "max_abs_diff": diff,
                "limit": limit,
                "finite": bool(np.isfinite(got).all()),
            }
        )
    worst = max(rows, key=lambda row: (not row["finite"], row["max_abs_diff"] - row["limit"]))
    return {**worst, "passed": worst["finite"] and worst["max_abs_diff"] <= worst["limit"]}


def compare_components(pipe, exporter, models, config: DiffusionValidateConfig) -> dict[str, Any]:
    """Each graph vs its PyTorch wrapper on the feeds the artifact's run recorded; one module at a time."""
    import torch  # here, not at the top: see reference_pipeline

    results = {}
    for component in exporter.build_components(models, get_target(pipe.manifest.target)):
        feeds = pipe.recorder.get(component.name)
        if feeds is None:  # a graph the validation run did not need (e.g. no T5 call)
            continue
        with torch.no_grad():
            expected = component.module(*(torch.from_numpy(feeds[name]) for name in component.example_inputs))
        expected = expected if isinstance(expected, tuple) else (expected,)
        results[component.name] = _compare_outputs(pipe.sessions[component.name], feeds, expected, config)
        del component
    return results


def validate_diffusion(
    artifact_dir: str | os.PathLike, model: str, config: DiffusionValidateConfig = DiffusionValidateConfig()
) -> dict:
    """Compare a text-to-image artifact with its diffusers source; return (and record) the report."""
    from modelkiln.exporters.diffusion import Lora  # imports torch: here, see reference_pipeline

    # 1. Load the artifact and record the feeds of its first run of every graph.
    manifest = read_manifest(artifact_dir)
    pipe = runtime.load(artifact_dir, backend=config.backend)
    pipe.recorder = {}
    source = resolve_source(model, allow_pickle=config.allow_pickle)
    # 2. Whole pipeline vs diffusers, identical latents; free the reference before loading components.
    reference = reference_pipeline(manifest, source)
    images = compare_images(pipe, reference, config)
    del reference
    # 3. Every graph vs its PyTorch wrapper (LoRAs fused the way the export fused them).
    family = get_family(manifest.family)
    exporter = family.load_exporter()
    options = {
        "lora": tuple(Lora(Path(lora["path"]), lora["scale"]) for lora in manifest.source.lora),
        "max_sequence_length": manifest.runtime.get("max_sequence_length"),
        "without": tuple(manifest.runtime.get("without", [])),
    }
    options = {key: value for key, value in options.items() if key in family.export_options and value}
    models = exporter.load_model(source, **options)
    components = compare_components(pipe, exporter, models, config)
    # 4. The report, also recorded in the artifact itself.
    checks = {"components": components, "images": images}
    return finish_report(artifact_dir, manifest, source, model, config, checks)
