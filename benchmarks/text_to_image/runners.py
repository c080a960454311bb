"""One text-to-image job per prompt (text encoders, every denoising step, VAE decode), timed stage by stage.

    settings = Generation(steps=4, guidance_scale=4.5, height=512, width=512, max_sequence_length=256)
    runner = OrtDiffusionRunner(Path("out/sd35-int8"), threads=2, settings=settings)
    runner = EagerDiffusionRunner("stabilityai/stable-diffusion-3.5-medium", threads=2, settings=settings)
    job = runner.run("a red cat", latents)   # ImageJob(image, total_s, text_encoders_s, step_s, vae_decode_s)

Both take the same initial latents and settings, so their images differ only by numerics. ONNX stages
come from wrapping the ``run`` of every session in ``pipe.sessions``; PyTorch stages from forward hooks
on the diffusers pipeline's text encoders and denoiser (one call per step) and a wrapper around
``vae.decode``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from modelkiln import runtime
from modelkiln.exporters.source import resolve_source

from ..core.timing import hook_calls, timed_calls

DENOISERS = ("transformer", "unet")  # the denoiser's component name in the families' pipelines
# Graph (or module) name -> stage of the report; every text encoder counts as "text_encoders".
STAGES = {**{name: "step" for name in DENOISERS}, "vae_decoder": "vae_decode"}
Progress = Callable[[int, int], None]  # (step done, steps in all), after every denoising step


@dataclass(frozen=True)
class Generation:
    """Settings every variant generates with."""

    steps: int  # denoising steps per image
    guidance_scale: float  # > 1 runs classifier-free guidance: every denoiser call has batch 2
    height: int  # image pixels
    width: int  # image pixels
    max_sequence_length: int | None  # T5 prompt tokens (None: the family has no T5 length to set)


@dataclass(frozen=True)
class ImageJob:
    """One generated image and how long each part took."""

    image: np.ndarray  # [H, W, 3] floats in [0, 1]
    total_s: float  # wall time of the whole pipeline call
    text_encoders_s: float  # all text encoder calls together
    step_s: tuple[float, ...]  # one denoiser call per denoising step
    vae_decode_s: float  # the VAE decoder call


def stage_of(component: str) -> str:
    return "text_encoders" if component.startswith("text_encoder") else STAGES.get(component, "other")


def make_job(image: np.ndarray, total_s: float, calls: list[tuple[str, float]]) -> ImageJob:
    """An ImageJob from (component, seconds) calls in call order."""
    stages = [(stage_of(name), seconds) for name, seconds in calls]
    return ImageJob(
        image=image,
        total_s=total_s,
        text_encoders_s=sum(s for stage, s in stages if stage == "text_encoders"),
        step_s=tuple(s for stage, s in stages if stage == "step"),
        vae_decode_s=sum(s for stage, s in stages if stage == "vae_decode"),
    )


def quiet_loading() -> None:
    """No per-component loading bars and tokenizer-length notes between the benchmark's progress lines."""
    # Here, not at the top: both import torch, which the task registry must not load.
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    # diffusers warns on every call whose prompt T5 truncates: expected at the benchmark's fixed length.
    diffusers.utils.logging.set_verbosity_error()


class OrtDiffusionRunner:
    """An artifact loaded through ``modelkiln.runtime`` with its session calls timed."""

    def __init__(self, directory: Path, threads: int, settings: Generation):
        self.pipe = runtime.load(directory, threads=threads)
        self.settings = settings
        self.calls: list[tuple[str, float]] = []
        # Instance attributes shadow the class methods, so every caller inside the pipeline is timed.
        for name, session in self.pipe.sessions.items():
            session.run = timed_calls(session.run, name, self.calls)

    def run(self, prompt: str, latents, callback: Progress | None = None) -> ImageJob:
        s = self.settings
        options = {"max_sequence_length": s.max_sequence_length} if s.max_sequence_length else {}
        self.calls.clear()
        start = time.perf_counter()
        images = self.pipe(
            prompt, latents=latents.clone(), num_inference_steps=s.steps, guidance_scale=s.guidance_scale,
            height=s.height, width=s.width, output_type="np", callback=callback, **options,
        ).images  # fmt: skip
        return make_job(images[0], time.perf_counter() - start, self.calls)


class EagerDiffusionRunner:
    """The diffusers pipeline of the source in fp32: the PyTorch eager baseline."""

    def __init__(self, source: str, threads: int, settings: Generation):
        # Here, not at the top: the ONNX memory probe runs these runners without torch.
        import diffusers
        import torch

        from modelkiln.runtime.torch_diffusion import absent_components

        torch.set_num_threads(threads)
        quiet_loading()
        resolved = resolve_source(source)
        pipeline_class = getattr(diffusers, resolved.config["_class_name"])
        absent = absent_components(resolved.path)
        self.pipe = pipeline_class.from_pretrained(resolved.path, dtype=torch.float32, **absent)
        self.pipe.set_progress_bar_config(disable=True)
        self.settings = settings
        self.calls: list[tuple[str, float]] = []
        for name in (*self.text_encoders(), self.denoiser_name()):
            hook_calls(getattr(self.pipe, name), name, self.calls)
        self.pipe.vae.decode = timed_calls(self.pipe.vae.decode, "vae_decoder", self.calls)

    def text_encoders(self) -> list[str]:
        components = self.pipe.components.items()
        return sorted(
            name for name, module in components if name.startswith("text_encoder") and module is not None
        )

    def denoiser_name(self) -> str:
        return next(name for name in DENOISERS if getattr(self.pipe, name, None) is not None)

    def run(self, prompt: str, latents, callback: Progress | None = None) -> ImageJob:
        import torch  # here, not at the top: the ONNX memory probe runs these runners without torch

        s = self.settings
        options = {"max_sequence_length": s.max_sequence_length} if s.max_sequence_length else {}
        if callback is not None:
            options["callback_on_step_end"] = lambda _pipe, i, _t, kwargs: (callback(i + 1, s.steps), kwargs)[
                1
            ]
        self.calls.clear()
        start = time.perf_counter()
        with torch.no_grad():
            images = self.pipe(
                prompt, latents=latents.clone(), num_inference_steps=s.steps, guidance_scale=s.guidance_scale,
                height=s.height, width=s.width, output_type="np", **options,
            ).images  # fmt: skip
        return make_job(np.asarray(images[0]), time.perf_counter() - start, self.calls)
