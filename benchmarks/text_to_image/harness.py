"""`kiln bench --family sd3`: the text-to-image benchmark; the denoising step is what it is about.

    from modelkiln.benchmarks.text_to_image.harness import TextToImageConfig, run_diffusion_bench
    report = run_diffusion_bench(TextToImageConfig(out=Path("bench"), preset="tiny", schemes=("int8-dynamic",)))
    # bench/report.json, bench/report.md, bench/*.png

Every variant (the diffusers pipeline in PyTorch eager fp32 first, then each ONNX artifact) generates
the same prompts from the same initial latents with the same settings, one image per prompt. Variants
are timed round-robin, each pass running every variant over every prompt in turn, so the machine's
drift over minutes hits all of them alike. Per variant: latency percentiles of the whole pipeline and
of each stage (text encoders, one denoising step = one transformer call, VAE decode), images/s, peak
RSS in a fresh process, artifact size, PSNR and SSIM against the eager images, the step's FLOP
roofline, and an op profile of one step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from modelkiln.errors import KilnError
from modelkiln.exporters.source import resolve_source as resolve_model
from modelkiln.manifest import read_manifest
from modelkiln.quantize.quantize import QuantizeConfig
from modelkiln.quantize.schemes import SCHEMES
from modelkiln.registry import bench_families, detect_family
from modelkiln.validation.prompt_accuracy import PromptAccuracyConfig, is_shapes_fixture

from ..core import roofline
from ..core.config import BenchConfig, TaskOptions, check_config
from ..core.source import family_preset, model_or_preset
from ..core.timing import EAGER, Schedule, time_variants
from ..core.variants import Variant, prepare_variants
from .measure import measure_variants
from .report import assemble_report, derived, write_diffusion_reports
from .runners import EagerDiffusionRunner, Generation, ImageJob, OrtDiffusionRunner

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
DEFAULT_FAMILY = "sd3"  # the family of --preset without --family
DEFAULT_STEPS = 4  # steps per image when neither the preset nor --steps says
QUALITY_PROMPTS = 1  # kiln quantize's own check: one prompt ...
QUALITY_STEPS = 1  # ... one step ...
QUALITY_SIDE_MULTIPLES = 4  # ... at 4x the smallest image side the model takes (64 px for SD3)
QUALITY_PROMPT_ACCURACY = 12  # ... and, for the shipped shapes pipeline, 12 shapes prompts read back
CALIBRATION_PROMPTS = 2  # int8-static: prompts run through the fp32 parent to record activations
CALIBRATION_STEPS = 2  # int8-static: steps per calibration prompt (early and late timesteps)
# The shipped shapes pipeline costs milliseconds per step, so its variants are made as a user would make
# them for its workload (benchmarks/results/sd3-shapes/notes.md has the measurements behind each):
SHAPES_CALIBRATION_PROMPTS = 16  # int8-static: of the prompts it ships (the built-in scenes' words it lacks)
SHAPES_CALIBRATION_STEPS = 8  # ... each run this many steps at the fixture's own 48 px
SHAPES_INT4_BLOCK = 16  # int4-weight: its rows are 64 wide, which the default block of 128 pads to 128
# ... with zero points: symmetric blocks read back 75.4% of the 138 prompts, asymmetric 81.9% (fp32 81.2%).


@dataclass(frozen=True)
class TextToImageConfig(BenchConfig):
    """One text-to-image benchmark run: the shared fields, then the task's."""

    repeats: int = 3  # timed passes over the prompts per variant (an image costs more than a caption)
    family: str = DEFAULT_FAMILY  # family of the preset (a --model's family is detected from it)
    prompts: int = 2  # prompts per pass, one image each
    steps: int | None = None  # denoising steps per image; None: the preset's (or 4 for --model)
    size: int | None = None  # image side in pixels; None: the preset's (or the model's default)
    profile: bool = True  # op profile of one denoising step per variant
    # Shipped shapes pipeline as the source: shapes prompts each variant's prompt accuracy is measured
    # on, at the fixture's default steps and guidance (None: all 138). Other sources have none.
    prompt_accuracy_prompts: int | None = None


def configure(base: BenchConfig, options: TaskOptions) -> TextToImageConfig:
    """The text-to-image config of a request: prompts per pass, steps, size and family from ``options``."""
    if options.peers:
        raise KilnError("--peers compares captioning toolchains only; drop it for a text-to-image benchmark.")
    return TextToImageConfig(
        **{**vars(base), "family": options.family or base.family or DEFAULT_FAMILY},
        prompts=options.per_pass,
        steps=options.steps,
        size=options.size,
    )


def _check(config: TextToImageConfig) -> None:
    check_config(config, ("threads", "repeats", "prompts"))
    if config.prompts > len(PROMPTS):
        raise KilnError(
            f"--images {config.prompts}: at most {len(PROMPTS)} benchmark prompts; ask for fewer."
        )
    if config.steps is not None and config.steps < 1:
        raise KilnError(f"--steps must be at least 1, got {config.steps}.")
    torch_schemes = [name for name in config.schemes if name in SCHEMES and SCHEMES[name].kind == "torch"]
    if torch_schemes:
        # Its rows profile and size the denoiser graph, which a bitsandbytes (PyTorch) variant has not.
        onnx = ", ".join(name for name, scheme in SCHEMES.items() if scheme.kind == "onnx")
        raise KilnError(
            f"--schemes {', '.join(torch_schemes)}: the text-to-image benchmark compares ONNX variants "
            f"({onnx}); measure bitsandbytes variants with kiln quantize, which reports their quality."
        )


def resolve_diffusion_source(config: TextToImageConfig, log: Callable[[str], None]) -> str:
    """The source pipeline path: --model as given, or the preset built under the work dir."""
    return model_or_preset(config, DEFAULT_FAMILY, log)


def quantize_config(parent: Path, scheme: str) -> QuantizeConfig:
    """`kiln quantize`'s settings for an on-the-fly variant: its own quality check cut to one small
    image and its int8-static calibration to a few steps. At SD3.5 widths every transformer call costs
    seconds, and the benchmark measures quality itself, against PyTorch, at the benchmark's size."""
    manifest = read_manifest(parent)
    multiple = manifest.runtime["vae_scale_factor"] * manifest.runtime.get("patch_size", 1)
    config = QuantizeConfig(
        scheme=scheme,
        num_prompts=QUALITY_PROMPTS,
        quality_steps=QUALITY_STEPS,
        image_size=QUALITY_SIDE_MULTIPLES * multiple,
        prompt_accuracy_prompts=QUALITY_PROMPT_ACCURACY,
        num_calibration=CALIBRATION_PROMPTS,
        calibration_steps=CALIBRATION_STEPS,
        overwrite=True,
    )
    if is_shapes_fixture(manifest.source.model):
        return replace(config, **_shapes_settings(scheme))
    return config


def _shapes_settings(scheme: str) -> dict:
    """The shapes pipeline's calibration (on the prompts it ships, at its own size) and int4 block."""
    settings = {
        "num_calibration": SHAPES_CALIBRATION_PROMPTS,
        "calibration_steps": SHAPES_CALIBRATION_STEPS,
        "image_size": PromptAccuracyConfig().side,
    }
    if scheme == "int4-weight":
        settings["options"] = {"block_size": SHAPES_INT4_BLOCK, "symmetric": False}
    return settings


def generation_settings(config: TextToImageConfig, fp32: Variant) -> Generation:
    """Steps, guidance, size and T5 length: --steps/--size, else the preset's, else the artifact's defaults."""
    runtime = read_manifest(fp32.path).runtime
    preset = family_preset(config.family, config.preset) if config.preset else None
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


def load_runners(source: str, variants: list[Variant], settings: Generation, threads: int) -> dict[str, Any]:
    runners: dict[str, Any] = {EAGER: EagerDiffusionRunner(source, threads, settings)}
    for variant in variants:
        runners[variant.name] = OrtDiffusionRunner(variant.path, threads, settings)
    # The first ONNX variant records its first feeds of every graph: the profiles replay them.
    runners[variants[0].name].pipe.recorder = {}
    return runners


def _time(runners: dict[str, Any], latents: list, config: TextToImageConfig, steps: int, probe) -> dict:
    """Every variant over every prompt in turn, pass by pass; every timed pass also samples the GEMM
    rates (``probe``) under the load it ran at."""

    def run(runner, index: int, advance) -> ImageJob:
        return runner.run(PROMPTS[index], latents[index], callback=advance)

    schedule = Schedule(by_input=False, units_per_job=steps, on_timed_pass=probe.sample)
    return time_variants(runners, len(latents), config, run, schedule)


def run_diffusion_bench(config: TextToImageConfig, log: Callable[[str], None] = lambda message: None) -> dict:
    """Run the whole text-to-image benchmark and write report.json, report.md and plots into ``config.out``."""
    # 1. Check the request; build or find the source; measure the machine; export and quantize.
    _check(config)
    source = resolve_diffusion_source(config, log)
    family = check_family(source)
    log("measuring this machine's fp32 and int8 GEMM rates and memory bandwidth")
    machine = roofline.with_int8_rate(roofline.measure_machine(config.threads), config.threads)
    variants = prepare_variants(
        source, config.schemes, config.variants, config.artifacts_dir, log, quantize_config
    )
    fp32 = next((v for v in variants if v.name == "onnx-fp32"), variants[0])
    settings = generation_settings(config, fp32)
    # 2. Time every variant on the same prompts and latents, round-robin; profile one step of each.
    log(f"timing {len(variants) + 1} variants: {settings.steps} steps at {settings.height}x{settings.width}")
    runners = load_runners(source, variants, settings, config.threads)
    latents = draw_latents(runners[variants[0].name], settings, config.prompts)
    probe = roofline.RateProbe(config.threads)
    timings = _time(runners, latents, config, settings.steps, probe)
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
    family = detect_family(resolve_model(source).config, source).name
    runs = bench_families("text-to-image")
    if family not in runs:
        raise KilnError(
            f"{source} is a {family} pipeline; the text-to-image benchmark runs {', '.join(runs)}. "
            "Export and run it with kiln export / kiln generate instead."
        )
    return family


def p50_s(row: dict) -> float:
    """A report row's median seconds per image, the whole pipeline."""
    return row["latency"]["pipeline"]["p50_s"]


def print_rows(report: dict, console) -> None:
    """One line per variant and per target on ``console``."""
    figures = derived(report)
    for row in report["variants"]:
        step, figure = row["latency"]["step"]["p50_s"], figures[row["name"]]
        console.print(
            f"  {row['name']:14} step p50 {step * 1e3:9.1f} ms  {figure['step_speedup']:5.2f}x eager  "
            f"pipeline {figure['pipeline_speedup']:5.2f}x  PSNR {row['quality']['psnr_mean']:6.1f} dB"
        )
    for check in report["targets"]:
        console.print(f"  {'met' if check['met'] else 'MISSED':6} {check['target']}: {check['value']:.3f}x")
