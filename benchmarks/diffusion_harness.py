"""`kiln bench --family sd3`: the text-to-image benchmark; the denoising step is what it is about.

    from modelkiln.benchmarks.diffusion_harness import DiffusionBenchConfig, run_diffusion_bench
    report = run_diffusion_bench(DiffusionBenchConfig(out=Path("bench"), preset="tiny", schemes=("int8-dynamic",)))
    # bench/report.json, bench/report.md, bench/*.png

Every variant (the diffusers pipeline in PyTorch eager fp32 first, then each ONNX artifact) generates
the same prompts from the same initial latents with the same settings, one image per prompt. Variants
are timed round-robin, prompt by prompt, so the machine's drift over minutes hits all of them alike.
Per variant: latency percentiles of the whole pipeline and of each stage (text encoders, one denoising
step = one transformer call, VAE decode), images/s, peak RSS in a fresh process, artifact size, PSNR
and SSIM against the eager images, the step's FLOP roofline, and an op profile of one step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import Progress

from modelkiln.errors import KilnError

from .diffusion_measure import EAGER
from .diffusion_roofline import RateProbe
from .diffusion_runners import EagerDiffusionRunner, Generation, ImageJob, OrtDiffusionRunner
from .harness import model_or_preset
from .variants import Variant

LATENT_SEEDS = 90_000  # initial latents of the benchmark prompts: away from quantize and validation seeds
# Benchmark prompts, none of them among kiln quantize's calibration or quality prompts.
PROMPTS = (
    "a photo of an astronaut riding a horse on mars",
    "a watercolor painting of a fox in a snowy forest",
    "a bowl of ramen on a wooden table, studio lighting",
    "an isometric illustration of a tiny city on an island",
    "a portrait of an old fisherman, dramatic light",
    "a red vintage car parked on a cobblestone street",
    "a cozy reading nook with plants and warm lamps",
    "a futuristic train crossing a desert at sunset",
)
DEFAULT_STEPS = 4  # steps per image when neither the preset nor --steps says


@dataclass(frozen=True)
class DiffusionBenchConfig:
    """One text-to-image benchmark run."""

    out: Path  # results folder: report.json, report.md, PNG plots
    model: str | None = None  # source pipeline (hub id or local dir): the eager baseline and the exports
    preset: str | None = None  # "tiny" or "full": build a random-weight SD3.5-Medium-shaped source instead
    family: str = "sd3"  # family of the preset (a --model's family is detected from it)
    variants: tuple[str, ...] = ()  # existing artifact directories to compare
    schemes: tuple[str, ...] = ()  # schemes to quantize on the fly from an fp32 export of the source
    work_dir: Path | None = None  # presets and on-the-fly artifacts; None puts them in OUT/artifacts
    threads: int = 2  # intra-op threads for torch and onnxruntime alike
    repeats: int = 3  # timed passes over the prompts per variant
    warmup: int = 1  # untimed passes first (thread pools, weight packing, page cache)
    prompts: int = 2  # prompts per pass, one image each
    steps: int | None = None  # denoising steps per image; None: the preset's (or 4 for --model)
    size: int | None = None  # image side in pixels; None: the preset's (or the model's default)
    measure_rss: bool = True  # peak RSS per variant in a fresh subprocess
    profile: bool = True  # op profile of one denoising step per variant
    plots: bool = True  # PNG plots when matplotlib is importable
    progress: bool = True  # rich progress bar on stderr
    command: str = ""  # the exact command line, recorded in the report

    @property
    def artifacts_dir(self) -> Path:
        return self.work_dir or self.out / "artifacts"


def _check(config: DiffusionBenchConfig) -> None:
    from .variants import check_schemes

    for name in ("threads", "repeats", "prompts"):
        if getattr(config, name) < 1:
            raise KilnError(f"--{name} must be at least 1, got {getattr(config, name)}.")
    if config.prompts > len(PROMPTS):
        raise KilnError(
            f"--images {config.prompts}: at most {len(PROMPTS)} benchmark prompts; ask for fewer."
        )
    if config.warmup < 0:
        raise KilnError(f"--warmup must be 0 or more, got {config.warmup}.")
    if config.steps is not None and config.steps < 1:
        raise KilnError(f"--steps must be at least 1, got {config.steps}.")
    check_schemes(config.schemes)


def resolve_diffusion_source(config: DiffusionBenchConfig, log: Callable[[str], None]) -> str:
    """The source pipeline path: --model as given, or the preset built under the work dir."""
    from .diffusion_presets import DIFFUSION_PRESETS, build_diffusion_preset

    return model_or_preset(
        config.model, config.preset, DIFFUSION_PRESETS, build_diffusion_preset, config.artifacts_dir, log
    )


def generation_settings(config: DiffusionBenchConfig, fp32: Variant) -> Generation:
    """Steps, guidance, size and T5 length: --steps/--size, else the preset's, else the artifact's defaults."""
    from modelkiln.manifest import read_manifest

    from .diffusion_presets import DIFFUSION_PRESETS

    runtime = read_manifest(fp32.path).runtime
    preset = DIFFUSION_PRESETS.get(config.preset) if config.preset else None
    if preset is not None:
        defaults = (preset.steps, preset.size, preset.guidance_scale, preset.max_sequence_length)
    else:
        size = runtime["default_sample_size"] * runtime["vae_scale_factor"]
        defaults = (
            DEFAULT_STEPS,
            size,
            runtime["default_guidance_scale"],
            runtime.get("max_sequence_length"),
        )
    steps, size, guidance, length = defaults
    size = config.size or size
    return Generation(config.steps or steps, guidance, size, size, length)


def draw_latents(runner: OrtDiffusionRunner, settings: Generation, count: int) -> list:
    """Initial latents per prompt, drawn the way the runtime (and diffusers) draws them from a seed."""
    pipe = runner.pipe
    latents = []
    for i in range(count):
        request = pipe.request(PROMPTS[i], None, settings.steps, settings.guidance_scale,
                               settings.height, settings.width, LATENT_SEEDS + i)  # fmt: skip
        latents.append(pipe.initial_latents(request))
    return latents


@dataclass
class Timings:
    """Measured jobs of one variant: the images of the first pass and every timed job."""

    images: list[np.ndarray] = field(default_factory=list)
    jobs: list[ImageJob] = field(default_factory=list)


def time_variants(
    runners: dict[str, Any], latents: list, config: DiffusionBenchConfig, steps: int, probe
) -> dict:
    """Warm-up passes, then timed passes, each pass running every variant over every prompt in turn;
    every timed pass also samples the GEMM rates (``probe``) under the load it ran at."""
    timings = {name: Timings() for name in runners}
    passes = config.warmup + config.repeats
    with Progress(console=Console(stderr=True), transient=True, disable=not config.progress) as progress:
        task = progress.add_task("timing", total=passes * len(runners) * len(latents) * steps)
        for index in range(passes):
            if index >= config.warmup:
                probe.sample()
            for name, runner in runners.items():
                for i, start in enumerate(latents):
                    progress.update(task, description=f"pass {index + 1}/{passes}: {name}, prompt {i + 1}")
                    job = runner.run(PROMPTS[i], start, callback=lambda *_: progress.advance(task))
                    if index == 0:
                        timings[name].images.append(job.image)
                    if index >= config.warmup:
                        timings[name].jobs.append(job)
    return timings


def load_runners(source: str, variants: list[Variant], settings: Generation, threads: int) -> dict[str, Any]:
    runners: dict[str, Any] = {EAGER: EagerDiffusionRunner(source, threads, settings)}
    for variant in variants:
        runners[variant.name] = OrtDiffusionRunner(variant.path, threads, settings)
    # The first ONNX variant records its first feeds of every graph: the profiles replay them.
    runners[variants[0].name].pipe.recorder = {}
    return runners


def run_diffusion_bench(
    config: DiffusionBenchConfig, log: Callable[[str], None] = lambda message: None
) -> dict:
    """Run the whole text-to-image benchmark and write report.json, report.md and plots into ``config.out``."""
    from .diffusion_measure import measure_variants
    from .diffusion_report import assemble_report, write_diffusion_reports
    from .diffusion_variants import prepare_diffusion_variants

    # 1. Check the request; build or find the source; measure the machine; export and quantize.
    _check(config)
    source = resolve_diffusion_source(config, log)
    family = check_family(source)
    machine = measure_machine(config.threads, log)
    variants = prepare_diffusion_variants(source, config.schemes, config.variants, config.artifacts_dir, log)
    fp32 = next((v for v in variants if v.name == "onnx-fp32"), variants[0])
    settings = generation_settings(config, fp32)
    # 2. Time every variant on the same prompts and latents, round-robin; profile one step of each.
    log(f"timing {len(variants) + 1} variants: {settings.steps} steps at {settings.height}x{settings.width}")
    runners = load_runners(source, variants, settings, config.threads)
    latents = draw_latents(runners[variants[0].name], settings, config.prompts)
    probe = RateProbe(config.threads)
    timings = time_variants(runners, latents, config, settings.steps, probe)
    machine["during"] = probe.summary()
    # 3. Profiles, sizes, peak memory and roofline per variant, each against the eager baseline.
    context = {"config": config, "machine": machine, "settings": settings, "family": family}
    rows = measure_variants(source, variants, runners, timings, latents[0].shape, context, log)
    # 4. Write the reports.
    report = assemble_report(config, source, family, settings, machine, rows)
    write_diffusion_reports(report, config.out, config.plots)
    return report


def check_family(source: str) -> str:
    """The source's family, which must be one this benchmark knows how to run."""
    from modelkiln.exporters.source import resolve_source
    from modelkiln.registry import detect_family

    from .diffusion_tasks import DIFFUSION_FAMILIES

    family = detect_family(resolve_source(source).config, source).name
    if family not in DIFFUSION_FAMILIES:
        raise KilnError(
            f"{source} is a {family} pipeline; the text-to-image benchmark runs {', '.join(DIFFUSION_FAMILIES)}. "
            "Export and run it with kiln export / kiln generate instead."
        )
    return family


def measure_machine(threads: int, log: Callable[[str], None]) -> dict:
    """fp32 GEMM and read bandwidth (as the captioner bench measures them) plus onnxruntime's int8 GEMM."""
    from . import roofline
    from .diffusion_roofline import measure_int8_gops

    log("measuring this machine's fp32 and int8 GEMM rates and memory bandwidth")
    machine = roofline.measure_machine(threads)
    machine["int8_gops"] = measure_int8_gops(threads)
    machine["method"] += f"; onnxruntime DynamicQuantizeMatMul {2048}^2 u8s8"
    return machine
