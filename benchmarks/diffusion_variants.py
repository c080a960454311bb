"""The text-to-image artifacts a diffusion benchmark compares: given directories plus ones made on the fly.

    variants = prepare_diffusion_variants(source, ("int8-dynamic",), given=(), work_dir, log)
    # [Variant("onnx-fp32", .../onnx-fp32), Variant("int8-dynamic", .../int8-dynamic)]

Like ``variants.prepare_variants`` (whose export, reuse and naming it shares), but quantizes with
``kiln quantize``'s own quality check cut to one small image and its int8-static calibration to a
few steps: at SD3.5 widths every transformer call costs seconds, and the benchmark measures quality
itself, against PyTorch, at the benchmark's size.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from modelkiln.manifest import read_manifest

from .variants import Variant, _reusable, label, prepare_variants

QUALITY_PROMPTS = 1  # kiln quantize's own check: one prompt ...
QUALITY_STEPS = 1  # ... one step ...
QUALITY_SIDE_MULTIPLES = 4  # ... at 4x the smallest image side the model takes (64 px for SD3)
CALIBRATION_PROMPTS = 2  # int8-static: prompts run through the fp32 parent to record activations
CALIBRATION_STEPS = 2  # int8-static: steps per calibration prompt (early and late timesteps)


def _quantize_config(parent: Path, scheme: str):
    from modelkiln.quantize.quantize import QuantizeConfig

    runtime = read_manifest(parent).runtime
    multiple = runtime["vae_scale_factor"] * runtime.get("patch_size", 1)
    return QuantizeConfig(
        scheme=scheme,
        num_prompts=QUALITY_PROMPTS,
        quality_steps=QUALITY_STEPS,
        image_size=QUALITY_SIDE_MULTIPLES * multiple,
        num_calibration=CALIBRATION_PROMPTS,
        calibration_steps=CALIBRATION_STEPS,
        overwrite=True,
    )


def _quantize(parent: Path, scheme: str, directory: Path, log: Callable[[str], None]) -> Path:
    from modelkiln.quantize.quantize import quantize_artifact

    if _reusable(directory, read_manifest(parent).source.weights_sha256) and label(directory) == scheme:
        log(f"reusing {directory}")
        return directory
    log(f"quantizing with {scheme} into {directory}")
    quantize_artifact(parent, directory, _quantize_config(parent, scheme), log=log)
    return directory


def prepare_diffusion_variants(
    source: str, schemes: tuple[str, ...], given: tuple[str, ...], work_dir: Path, log: Callable[[str], None]
) -> list[Variant]:
    """``variants.prepare_variants`` with this module's cut-down quantization."""
    return prepare_variants(source, schemes, given, work_dir, log, quantize=_quantize)
