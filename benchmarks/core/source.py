"""The source model a benchmark runs: --model as given, or a family's preset built (or reused) under the work dir.

    source = model_or_preset(config, "sd3", log)        # "sd3": the family when config.family is None
    preset = family_preset("flux", "full")              # its sizes and run settings
    path = build_preset_source("blip", "full", Path("/tmp/kiln-bench"))

Each family's presets are the dict its registry entry names (``BenchSupport.preset_table``): preset
name -> a frozen dataclass of sizes whose ``save(directory)`` writes a random-weight source the way
``save_pretrained`` would. A saved preset is reused when its ``preset.json`` matches the sizes asked for.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from modelkiln.errors import KilnError
from modelkiln.exporters.source import resolve_source
from modelkiln.registry import FAMILIES, get_family, load_attr

from .config import BenchConfig


def family_presets(family: str) -> dict[str, Any]:
    """The family's preset table, or an error naming the families that have one."""
    bench = get_family(family).bench
    if bench is None or not bench.preset_table:
        having = [name for name, f in FAMILIES.items() if f.bench and f.bench.preset_table]
        raise KilnError(
            f"--family {family} has no --preset sources; families with presets: {', '.join(having)}. "
            "Bench this family with --model SRC instead."
        )
    return load_attr(bench.preset_table)


def family_preset(family: str, name: str) -> Any:
    """The family's preset ``name``, or an error listing the family's valid presets."""
    presets = family_presets(family)
    if name not in presets:
        raise KilnError(
            f"--preset {name}: unknown for --family {family}. Valid presets: {', '.join(presets)}."
        )
    return presets[name]


def build_preset_source(family: str, name: str, cache_dir: Path) -> Path:
    """The preset's source directory under ``cache_dir``, built unless an identical one is there."""
    preset = family_preset(family, name)
    directory = Path(cache_dir) / f"source-{family}-{name}"
    marker = directory / "preset.json"
    wanted = json.loads(json.dumps(asdict(preset)))  # tuples as JSON lists, as the marker stores them
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    preset.save(directory)
    # Written last: its presence marks a complete save.
    marker.write_text(json.dumps(wanted, indent=2) + "\n")
    return directory


def model_or_preset(config: BenchConfig, default_family: str, log: Callable[[str], None]) -> str:
    """``config.model`` as given, or the preset's source of ``config.family`` (``default_family`` when
    None) built (or reused) under the artifacts dir."""
    model, preset = config.model, config.preset
    if (model is None) == (preset is None):
        raise KilnError(
            "give exactly one of --model SRC or --preset NAME (with --family to pick the family)."
        )
    if model is not None:
        refuse_pickle(model)
        return model
    family = config.family or default_family
    family_preset(family, preset)  # an unknown name fails before the message below
    log(f"preset {preset} of {family}: building or reusing it under {config.artifacts_dir}")
    return str(build_preset_source(family, preset, config.artifacts_dir))


def refuse_pickle(model: str) -> None:
    """The benchmark loads its source several times over; it takes safetensors weights only."""
    source = resolve_source(model, allow_pickle=True)
    if source.uses_pickle:
        raise KilnError(
            f"{source.path} holds only pickle weights ({', '.join(source.weight_files[:3])}); kiln bench "
            "loads safetensors only. Re-save the model with save_pretrained(..., safe_serialization=True) "
            "if you trust its origin, then bench that folder."
        )
