"""What every quantizer shares: the request (``QuantizeConfig``), the quality measured on held-out
inputs, and the gates that decide whether a variant is kept.

ONNX schemes (``quantize.quantize``) and bitsandbytes ones (``quantize.bnb``, ``quantize.bnb_diffusion``)
all import it; it imports none of them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from modelkiln.errors import KilnError, ValidationFailedError
from modelkiln.manifest import (
    Manifest,
    folder_sha256,
    read_manifest,
    require_intact,
    sha256_file,
    write_manifest,
)
from modelkiln.validation.prompt_accuracy import (
    PromptAccuracyConfig,
    flat_figures,
    is_shapes_fixture,
    measure_pipeline,
    shipped_reader,
)

from .quality import QUALITY
from .schemes import get_scheme, resolve_options

QUALITY_SEEDS = 70_000  # drawn held-out images for quality, away from training, demo and validation seeds
# Held-out diffusion prompts for quality, none of them among the calibration prompts.
QUALITY_PROMPTS = (
    "a red cat sitting on a blue sofa",
    "a lighthouse on a cliff, stormy sea",
    "a bowl of fruit on a wooden table, still life",
    "a street in the rain at night, reflections",
    "a child drawing of a house and a tree",
    "a macro photo of a dragonfly on a leaf",
)


@dataclass(frozen=True)
class QuantizeConfig:
    """One quantization run."""

    scheme: str  # key of quantize.schemes.SCHEMES
    components: tuple[str, ...] | None = None  # graphs to quantize; None takes the family's recipe
    exclude: tuple[str, ...] = ()  # fnmatch patterns of node names or module paths kept in fp32
    options: dict[str, Any] = field(default_factory=dict)  # scheme options (block_size, symmetric, ...)
    min_agreement: float | None = None  # gate: fail below this caption exact-match rate vs the parent
    min_psnr: float | None = (
        None  # gate (diffusion): fail when any prompt's image PSNR vs the parent is below
    )
    # Gate (captioners): fail when more held-out images than this get an empty caption where the parent
    # captioned one: the collapse a broken quantized decoder shows (transformers#30383). None: off.
    max_new_empty: int | None = 0
    # Gate (text-to-image, the shipped shapes fixture only): fail below this share of images whose
    # caption, read back by the shapes captioner, equals the prompt. None: off.
    min_prompt_accuracy: float | None = None
    prompt_accuracy_prompts: int | None = None  # shapes prompts it is measured on; None: all 138
    num_images: int = 16  # held-out drawn images the quality is measured on (captioners)
    num_prompts: int = 4  # held-out prompts the quality is measured on (diffusion)
    quality_steps: int = 4  # denoising steps per quality image (diffusion)
    image_size: int | None = (
        None  # side of the quality and calibration images (diffusion); None: model default
    )
    calibration_images: str | None = None  # folder of calibration images; None draws fixture images
    num_calibration: int = 8  # calibration images (captioners) or prompts (diffusion) for static schemes
    # Text file, one prompt per line; None: the artifact's own calibration_prompts.txt, else built-in ones.
    calibration_prompts: str | None = None
    calibration_steps: int = 8  # denoising steps per calibration prompt: activations across timesteps
    overwrite: bool = False  # replace an existing output directory

    def __post_init__(self) -> None:
        # Checked on construction, so a gate that can never pass or never fail stops before any work.
        if self.min_agreement is not None and not 0.0 <= self.min_agreement <= 1.0:
            raise KilnError(
                f"--min-agreement {self.min_agreement} is outside 0..1: it is the share of captions "
                "that must match the parent's (e.g. 0.95)."
            )
        if self.min_prompt_accuracy is not None and not 0.0 <= self.min_prompt_accuracy <= 1.0:
            raise KilnError(
                f"--min-prompt-accuracy {self.min_prompt_accuracy} is outside 0..1: it is the share of images "
                "whose caption read back equals the prompt (e.g. 0.8)."
            )
        if self.prompt_accuracy_prompts is not None and self.prompt_accuracy_prompts < 1:
            raise KilnError(
                f"--prompt-accuracy-prompts must be at least 1, got {self.prompt_accuracy_prompts}."
            )
        if self.min_psnr is not None and not 0.0 <= self.min_psnr < float("inf"):
            raise KilnError(f"--min-psnr {self.min_psnr} must be a finite number of dB, 0 or more (e.g. 30).")
        if self.max_new_empty is not None and (
            isinstance(self.max_new_empty, bool) or self.max_new_empty < 0
        ):
            raise KilnError(f"--max-new-empty {self.max_new_empty} must be a whole number, 0 or more.")
        for name in ("num_images", "num_prompts", "quality_steps", "num_calibration", "calibration_steps"):
            if getattr(self, name) < 1:
                raise KilnError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}.")

    def settings(self) -> dict[str, Any]:
        """The request's fields that decide the variant's weights (not how its quality is checked), as the
        manifest records them: a benchmark reuses a variant it made, and a build its cached one, only while
        these still match. Options are resolved, so a changed scheme default counts; calibration inputs
        count by content, not by the path they were read from."""
        prompts = self.calibration_prompts
        options = resolve_options(get_scheme(self.scheme), self.options)
        return {
            "scheme": self.scheme,
            "components": list(self.components) if self.components is not None else None,
            "exclude": list(self.exclude),
            "options": json.loads(json.dumps(options)),  # as read back: tuples are lists there
            "calibration_images_sha256": folder_sha256(self.calibration_images),
            "num_calibration": self.num_calibration,
            "calibration_prompts_sha256": sha256_file(prompts) if prompts else None,
            "calibration_steps": self.calibration_steps,
            "image_size": self.image_size,
        }


def measure_quality(parent_pipe, variant_pipe, manifest: Manifest, config: QuantizeConfig) -> dict:
    """The task's quality figures of two loaded pipelines on held-out inputs."""
    if manifest.task == "text-to-image":
        prompts = list(QUALITY_PROMPTS[: config.num_prompts])
        quality = QUALITY[manifest.task](
            parent_pipe, variant_pipe, prompts, config.quality_steps, config.image_size, QUALITY_SEEDS
        )
        if is_shapes_fixture(manifest.source.model):
            quality |= prompt_figures(parent_pipe, variant_pipe, config)
        return quality
    from modelkiln.fixtures import shapes

    drawn = [shapes.draw(QUALITY_SEEDS + i) for i in range(config.num_images)]
    images = [image for image, _ in drawn]
    # The drawn captions are the truth only for the captioner trained on them.
    truths = [truth for _, truth in drawn] if _is_fixture(manifest.source.model) else None
    return QUALITY[manifest.task](parent_pipe, variant_pipe, images, truths)


def prompt_figures(parent_pipe, variant_pipe, config: QuantizeConfig) -> dict:
    """Prompt accuracy of the variant and its parent (exact and per attribute), read back by the shapes
    captioner, from the same latents at the fixture's default steps and guidance."""
    settings = PromptAccuracyConfig(prompts=config.prompt_accuracy_prompts)
    read = shipped_reader()
    variant = measure_pipeline(variant_pipe, read, settings)
    parent = measure_pipeline(parent_pipe, read, settings)
    return {
        **flat_figures(variant),
        **flat_figures(parent, "parent_prompt_accuracy"),
        "prompt_accuracy_weakest": variant["weakest"],
        "prompt_accuracy_misses": variant["misses"][:8],
    }


def _is_fixture(model: str) -> bool:
    from modelkiln.fixtures import CAPTIONER_DIR

    return Path(model).absolute().resolve() == CAPTIONER_DIR.resolve()


def relative_parent(parent: str | os.PathLike, out: str | os.PathLike) -> str:
    """The parent's path relative to the variant: an absolute one would make two otherwise identical
    builds in different folders differ, and break when both folders move together."""
    return Path(os.path.relpath(Path(parent).absolute(), Path(out).absolute())).as_posix()


def gate_failures(quality: dict, config: QuantizeConfig) -> list[str]:
    """What the figures miss of the config's gates, one readable line each; [] when all pass."""
    failures = []
    if config.min_agreement is not None and quality["agreement"] < config.min_agreement:
        failures.append(f"agreement {quality['agreement']:.3f} < --min-agreement {config.min_agreement}")
    new_empty = quality.get("new_empty_captions", 0)
    if config.max_new_empty is not None and new_empty > config.max_new_empty:
        failures.append(
            f"{new_empty} empty captions where the parent captioned > --max-new-empty {config.max_new_empty}"
        )
    if config.min_psnr is not None and quality.get("psnr_min", float("inf")) < config.min_psnr:
        failures.append(f"worst image PSNR {quality['psnr_min']:.1f} dB < --min-psnr {config.min_psnr}")
    if config.min_prompt_accuracy is not None:
        if "prompt_accuracy" not in quality:
            failures.append(
                "--min-prompt-accuracy needs the shipped shapes pipeline as the source "
                "(modelkiln/fixtures/shapes_sd3): no other model's images can be read back"
            )
        elif quality["prompt_accuracy"] < config.min_prompt_accuracy:
            failures.append(
                f"prompt accuracy {quality['prompt_accuracy']:.3f} < --min-prompt-accuracy "
                f"{config.min_prompt_accuracy} (weakest attribute: {quality['prompt_accuracy_weakest']})"
            )
    if quality.get("non_finite_images"):
        failures.append(f"{quality['non_finite_images']} images failed with NaN/Inf in a graph")
    return failures


def record_quality(staging: Path, variant: Manifest, quality: dict, config: QuantizeConfig) -> Manifest:
    """Write the figures into the staged manifest; below the gate raise, so the staging dir is dropped."""
    failures = gate_failures(quality, config)
    recorded = {"settings": config.settings(), "quality": quality, "gate": failures}
    variant = replace(variant, quantization={**variant.quantization, **recorded})
    write_manifest(staging, variant)
    if failures:
        raise ValidationFailedError(f"quality gate failed for {config.scheme}: {'; '.join(failures)}.")
    return variant


def read_onnx_parent(directory: str | os.PathLike, refusal: str) -> tuple[Path, Manifest]:
    """The intact ONNX artifact a variant is made from. A torch (bitsandbytes) variant is refused with
    ``refusal``, formatted with ``path``, ``kind``, ``precision`` and ``source`` (its source model)."""
    parent = Path(directory).absolute()
    manifest = read_manifest(parent)
    if manifest.kind != "onnx":
        fields = {"path": parent, "kind": manifest.kind, "precision": manifest.precision}
        raise KilnError(refusal.format(**fields, source=manifest.source.model))
    require_intact(parent, manifest)
    return parent, manifest
