"""Prompt accuracy: does a text-to-image model draw what its prompt says?

The shapes prompts ("a small red circle on a white background") name four attributes. Each generated
image is read back by the shipped shapes captioner, which captions held-out drawings 98% exactly, and
the caption is compared with the prompt: exactly, and attribute by attribute::

    reader = shipped_reader()                               # the captioner, on transformers
    report = prompt_accuracy(generate, reader, PromptAccuracyConfig(prompts=48))
    report["exact"], report["attributes"]["colour"]         # 0.92, 0.98

``generate(prompts, latents)`` is any text-to-image call: the diffusers pipeline, an ONNX artifact or a
quantized variant. Every call gets the same seeded latents for the same prompt, so two pipelines are
compared on identical inputs and their figures differ only by what the pipelines do.
`kiln quantize`, `kiln bench` and `kiln build` all measure through ``prompt_accuracy``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from modelkiln.fixtures import TEXT_TO_IMAGE_DIR, shapes

PROMPT_SEEDS = 80_000  # latent seeds: one per prompt and round, never used by training

# (prompts, latents [N, C, h, w] float32) -> one PIL image per prompt
Generate = Callable[[list[str], np.ndarray], list[Image.Image]]
Reader = Callable[[list[Image.Image]], list[str]]  # images -> captions


@dataclass(frozen=True)
class PromptAccuracyConfig:
    """Which prompts and latents a measurement draws, and the generation settings it runs at: the
    shipped fixture's defaults (diffusers' 28 steps and guidance 7 at the captioner's 48 pixels)."""

    prompts: int | None = None  # how many of the 138 shapes prompts, spread evenly; None: every one
    rounds: int = 1  # images per prompt, each from its own latent seed
    batch: int = 8  # prompts per generate call
    seed: int = PROMPT_SEEDS  # first latent seed
    steps: int = 28  # denoising steps per image
    guidance: float = 7.0  # classifier-free guidance scale
    side: int = 48  # image side in pixels
    # One image's latents at ``side``: the fixture's VAE halves each side into 4 channels.
    latent_shape: tuple[int, int, int] = (4, 24, 24)


def prompt_sample(count: int | None) -> list[shapes.Attributes]:
    """``count`` prompts spread evenly over every shapes prompt (all of them for None): the same list on
    every run, and every attribute value represented once count reaches a dozen."""
    every = shapes.every_caption()
    if count is None or count >= len(every):
        return every
    if count < 1:
        raise ValueError(f"prompt count must be at least 1, got {count}")
    return [every[int(i)] for i in np.linspace(0, len(every) - 1, count).round()]


def seeded_latents(seed: int, shape: Sequence[int]) -> np.ndarray:
    """Standard normal latents of ``shape`` from one seed (numpy, so every runtime can make them)."""
    return np.random.default_rng(seed).standard_normal(tuple(shape)).astype(np.float32)


def score(prompts: Sequence[shapes.Attributes], captions: Sequence[str]) -> dict:
    """Exact and per-attribute accuracy of captions read back from images drawn for ``prompts``."""
    read = [shapes.parse(text) for text in captions]
    hits = {
        name: [
            got is not None and getattr(got, name) == getattr(want, name)
            for want, got in zip(prompts, read, strict=True)
        ]
        for name in shapes.ATTRIBUTE_NAMES
    }
    exact = [text == want.caption for want, text in zip(prompts, captions, strict=True)]
    attributes = {name: float(np.mean(values)) for name, values in hits.items()}
    return {
        "images": len(captions),
        "exact": float(np.mean(exact)),
        "attributes": attributes,
        # The attribute a degraded model loses first: what a report names when a variant misses.
        "weakest": min(attributes, key=attributes.get),
        "misses": [
            {"prompt": want.caption, "caption": text}
            for want, text, ok in zip(prompts, captions, exact, strict=True)
            if not ok
        ],
    }


def prompt_accuracy(
    generate: Generate, read: Reader, latent_shape: Sequence[int], config: PromptAccuracyConfig
) -> dict:
    """Generate every sampled prompt ``config.rounds`` times, read the images back and score them.
    ``latent_shape`` is one image's latents ([C, h, w]) at the size being measured."""
    prompts = prompt_sample(config.prompts) * config.rounds
    captions: list[str] = []
    for start in range(0, len(prompts), config.batch):
        chunk = prompts[start : start + config.batch]
        latents = np.stack([seeded_latents(config.seed + start + i, latent_shape) for i in range(len(chunk))])
        captions += read(generate([p.caption for p in chunk], latents))
    return score(prompts, captions) | {"prompts": len(prompts) // config.rounds, "rounds": config.rounds}


def is_shapes_fixture(model: str | os.PathLike) -> bool:
    """Whether ``model`` is the shipped shapes text-to-image pipeline, the one source whose images the
    shapes captioner can read back (prompt accuracy means nothing for other models)."""
    return Path(model).absolute().resolve() == TEXT_TO_IMAGE_DIR.resolve()


def pipeline_generate(pipe: Any, config: PromptAccuracyConfig) -> Generate:
    """``generate`` for a diffusers pipeline or a modelkiln runtime pipeline: both take these keywords."""
    import torch  # here, not at the top: scoring needs no torch, and diffusers takes torch latents

    def generate(prompts: list[str], latents: np.ndarray) -> list[Image.Image]:
        return pipe(
            prompts,
            latents=torch.from_numpy(latents),
            num_inference_steps=config.steps,
            guidance_scale=config.guidance,
            height=config.side,
            width=config.side,
        ).images

    return generate


def measure_pipeline(pipe: Any, read: Reader, config: PromptAccuracyConfig = PromptAccuracyConfig()) -> dict:
    """Prompt accuracy of one loaded pipeline of the shipped fixture (eager, ONNX or quantized)."""
    return prompt_accuracy(pipeline_generate(pipe, config), read, config.latent_shape, config)


def flat_figures(report: dict, prefix: str = "prompt_accuracy") -> dict[str, float]:
    """The report as flat quality figures (``prompt_accuracy``, ``prompt_accuracy_colour``, ...), the
    names `kiln build` gates take (``min_prompt_accuracy = 0.8``)."""
    return {prefix: report["exact"]} | {f"{prefix}_{name}": v for name, v in report["attributes"].items()}


def shipped_reader(threads: int | None = None) -> Reader:
    """The shipped shapes captioner as a reader, on transformers (greedy, as it was evaluated)."""
    import torch  # here, not at the top: the module's scoring needs no torch
    from transformers import AutoImageProcessor, AutoTokenizer, VisionEncoderDecoderModel

    from modelkiln.fixtures import CAPTIONER_DIR

    model = VisionEncoderDecoderModel.from_pretrained(CAPTIONER_DIR).eval()
    processor = AutoImageProcessor.from_pretrained(CAPTIONER_DIR)
    tokenizer = AutoTokenizer.from_pretrained(CAPTIONER_DIR)

    def read(images: list[Image.Image]) -> list[str]:
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            ids = model.generate(pixel_values=pixels)
        return [text.strip() for text in tokenizer.batch_decode(ids, skip_special_tokens=True)]

    if threads is not None:
        torch.set_num_threads(threads)
    return read
