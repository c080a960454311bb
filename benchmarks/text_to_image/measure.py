"""Everything a diffusion benchmark row holds beside the raw timings: stage percentiles, image quality
against the eager images, sizes, peak memory, the step's roofline and its op profile.

    rows = measure_variants(source, variants, runners, timings, latent_shape, context, log)

``context`` carries the config, the machine figures, the generation settings and the family, as
``harness.run_diffusion_bench`` builds it. The runners are released here (``runners`` is
emptied) once the eager step is profiled: the ONNX profiles and the memory probes need that memory.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from modelkiln.exporters.source import resolve_source
from modelkiln.manifest import read_manifest
from modelkiln.metrics import image_metrics
from modelkiln.registry import get_family
from modelkiln.validation.prompt_accuracy import (
    PromptAccuracyConfig,
    is_shapes_fixture,
    measure_pipeline,
    prompt_sample,
    shipped_reader,
)

from ..core.timing import EAGER, percentiles
from ..core.variants import Variant
from .probe import measure_diffusion_rss
from .profile import ort_step_profile, torch_step_profile
from .roofline import step_bounds, step_flops
from .runners import DENOISERS, ImageJob


@dataclass(frozen=True)
class Sizes:
    """What a variant weighs on disk."""

    total_bytes: int  # every file of the artifact (eager: the source's weight files)
    denoiser_bytes: int  # the denoiser's graph and weights (eager: its weight files)
    precision: str  # the denoiser's precision (fp32, int8, int4, fp16)
    denoiser_file: Path | None  # the denoiser graph to profile; None for eager


def latency(jobs: list[ImageJob]) -> dict[str, dict]:
    """Percentiles of the whole pipeline and of each stage; every step call counts once."""
    other = [job.total_s - job.text_encoders_s - sum(job.step_s) - job.vae_decode_s for job in jobs]
    return {
        "pipeline": percentiles([job.total_s for job in jobs]),
        "text_encoders": percentiles([job.text_encoders_s for job in jobs]),
        "step": percentiles([s for job in jobs for s in job.step_s]),
        "vae_decode": percentiles([job.vae_decode_s for job in jobs]),
        # Tokenizers, scheduler arithmetic, guidance and array copies between the graphs.
        "other": percentiles(other),
    }


def image_agreement(baseline: list[np.ndarray], images: list[np.ndarray]) -> dict:
    """PSNR/SSIM of each image against the eager image from the same prompt and latents."""
    rows = [image_metrics(image, reference) for image, reference in zip(images, baseline, strict=True)]
    return {
        "images": len(rows),
        "psnr_mean": statistics.fmean(row["psnr"] for row in rows),
        "psnr_min": min(row["psnr"] for row in rows),
        "ssim_mean": statistics.fmean(row["ssim"] for row in rows),
        "max_pixel_diff": max(row["max_pixel_diff"] for row in rows),
        "per_image": rows,
    }


def artifact_sizes(directory: Path) -> Sizes:
    manifest = read_manifest(directory)
    name = next(n for n in DENOISERS if n in manifest.components)
    spec = manifest.components[name]
    files = [spec.file] + ([spec.external_data] if spec.external_data else [])
    return Sizes(
        total_bytes=sum((directory / f).stat().st_size for f in manifest.files),
        denoiser_bytes=sum((directory / f).stat().st_size for f in files),
        precision=spec.precision or manifest.precision,
        denoiser_file=directory / spec.file,
    )


def source_sizes(source: str) -> Sizes:
    resolved = resolve_source(source)
    sizes = {name: (resolved.path / name).stat().st_size for name in resolved.weight_files}
    denoiser = sum(size for name, size in sizes.items() if name.split("/")[0] in DENOISERS)
    return Sizes(sum(sizes.values()), denoiser, "fp32", None)


def profile_steps(runners: dict, variants: list[Variant], config, log: Callable[[str], None]) -> dict:
    """One profiled denoising step per variant, on the feeds the first ONNX variant recorded.

    Empties ``runners`` after the eager profile, so each ONNX profile session loads alone."""
    recorded = runners[variants[0].name].pipe.recorder
    denoiser = next(name for name in DENOISERS if name in recorded)
    feeds = recorded[denoiser]
    eager = runners.pop(EAGER)
    profiles = {}
    if config.profile:
        log("profiling one denoising step of each variant")
        profiles[EAGER] = torch_step_profile(
            getattr(eager.pipe, eager.denoiser_name()), feeds, config.threads
        )
    del eager
    runners.clear()
    for variant in variants if config.profile else []:
        profiles[variant.name] = ort_step_profile(
            artifact_sizes(variant.path).denoiser_file, feeds, config.threads
        )
    return profiles


def _rss(target: str, eager: bool, latent_shape: tuple[int, ...], context: dict) -> int | None:
    config = context["config"]
    if not config.measure_rss:
        return None
    return measure_diffusion_rss(target, eager, context["settings"], tuple(latent_shape), config.threads)


def step_flops_of(source: str, context: dict) -> dict | None:
    """FLOPs of one denoiser call at the benchmark's shapes: batch and text tokens as the family
    declares them (``BenchSupport.guided_batch``, ``clip_tokens``)."""
    settings = context["settings"]
    bench = get_family(context["family"]).bench
    folder = resolve_source(source).path
    denoiser = next(name for name in DENOISERS if (folder / name / "config.json").is_file())
    config = json.loads((folder / denoiser / "config.json").read_text())
    shape = {
        # From the image size, not the latents' shape: Flux's latents are packed [B, tokens, 4C].
        "latent_height": settings.height // _vae_scale(folder),
        "latent_width": settings.width // _vae_scale(folder),
        "text_tokens": bench.clip_tokens + (settings.max_sequence_length or 0),
        "batch": bench.guided_batch if settings.guidance_scale > 1 else 1,
    }
    return step_flops(context["family"], config, **shape)


def _vae_scale(folder: Path) -> int:
    """The VAE's scale factor, as diffusers derives it: 2 per block after the first."""
    vae = json.loads((folder / "vae" / "config.json").read_text())
    return 2 ** (len(vae["block_out_channels"]) - 1)


def variant_row(
    name: str, target: str, sizes: Sizes, rss: int | None, timings, baseline, context: dict
) -> dict:
    """Everything measured for one variant, as report.json stores it."""
    stages = latency(timings.jobs)
    total = sum(job.total_s for job in timings.jobs)
    return {
        "name": name,
        "path": target,
        "precision": sizes.precision,
        "size_bytes": sizes.total_bytes,
        "denoiser_bytes": sizes.denoiser_bytes,
        "peak_rss_bytes": rss,
        "latency": stages,
        "images_per_s": len(timings.jobs) / total,
        "quality": image_agreement(
            [j.image for j in baseline.first_pass], [j.image for j in timings.first_pass]
        ),
        "roofline": step_bounds(
            context["machine"], context["flops"], sizes.precision, stages["step"]["p50_s"], name == EAGER
        ),
        "profile": context["profiles"].get(name),
        "prompt_accuracy": context["prompt_accuracy"].get(name),
    }


def prompt_accuracies(source: str, runners: dict, config, log: Callable[[str], None]) -> dict:
    """Per runner, prompt accuracy at the fixture's defaults; {} unless the source is the shipped shapes
    pipeline, the only one whose images the shapes captioner can read back."""
    if not is_shapes_fixture(source):
        return {}
    settings = PromptAccuracyConfig(prompts=config.prompt_accuracy_prompts)
    log(f"prompt accuracy of every variant: {len(prompt_sample(settings.prompts))} shapes prompts, read back")
    read = shipped_reader(config.threads)
    return {name: measure_pipeline(runner.pipe, read, settings) for name, runner in runners.items()}


def measure_variants(
    source: str, variants: list[Variant], runners: dict, timings: dict, latent_shape, context: dict, log
) -> list[dict]:
    """One report row per variant, eager first; releases the runners (see the module docstring)."""
    # 1. Prompt accuracy, then one profiled step of each variant; the runners are released on the way.
    context = {**context, "prompt_accuracy": prompt_accuracies(source, runners, context["config"], log)}
    context["profiles"] = profile_steps(runners, variants, context["config"], log)
    context["flops"] = step_flops_of(source, context)
    # 2. Sizes and peak memory (a fresh process each), then the rows.
    targets = [(EAGER, source, source_sizes(source))]
    targets += [(v.name, str(v.path), artifact_sizes(v.path)) for v in variants]
    if context["config"].measure_rss:
        log("measuring peak memory per variant, each in a fresh process")
    rows = []
    for name, target, sizes in targets:
        rss = _rss(target, name == EAGER, tuple(latent_shape), context)
        rows.append(variant_row(name, target, sizes, rss, timings[name], timings[EAGER], context))
    return rows
