"""The source model a benchmark runs: --model as given, or a preset built (or reused) under the work dir.

source = model_or_preset(config, PRESETS, build_preset, log)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from modelkiln.errors import KilnError
from modelkiln.exporters.source import resolve_source

from .config import BenchConfig


def model_or_preset(
    config: BenchConfig, presets: dict, build: Callable[[str, Path], Path], log: Callable[[str], None]
) -> str:
    """``config.model`` as given, or ``build(preset, artifacts_dir)``: the preset's source built (or reused)."""
    model, preset = config.model, config.preset
    if (model is None) == (preset is None):
        raise KilnError("give exactly one of --model SRC or --preset {tiny,full}.")
    if model is not None:
        refuse_pickle(model)
        return model
    if preset not in presets:
        raise KilnError(f"--preset {preset}: unknown. Valid presets: {', '.join(presets)}.")
    log(f"preset {preset}: building or reusing it under {config.artifacts_dir}")
    return str(build(preset, config.artifacts_dir))


def refuse_pickle(model: str) -> None:
    """The benchmark loads its source several times over; it takes safetensors weights only."""
    source = resolve_source(model, allow_pickle=True)
    if source.uses_pickle:
        raise KilnError(
            f"{source.path} holds only pickle weights ({', '.join(source.weight_files[:3])}); kiln bench "
            "loads safetensors only. Re-save the model with save_pretrained(..., safe_serialization=True) "
            "if you trust its origin, then bench that folder."
        )
