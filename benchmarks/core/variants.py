"""The artifact variants a benchmark compares: given directories, plus ones made on the fly.

    variants = prepare_variants(source, ("int8-dynamic",), given=(), work_dir, log, quantize_config)
    # [Variant("onnx-fp32", Path(".../onnx-fp32")), Variant("int8-dynamic", Path(...))]

On-the-fly variants are an fp32 export of the source and one quantized child per scheme, written
under ``work_dir`` and reused on a later run when they come from the same source weights and the same
quantize settings. Each task says how its children are quantized (``quantize_config``): the benchmark
measures quality itself, so `kiln quantize`'s own check is cut down.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from modelkiln.errors import KilnError
from modelkiln.exporters.source import resolve_source
from modelkiln.manifest import read_manifest
from modelkiln.quantize.quantize import QuantizeConfig, quantize_artifact
from modelkiln.quantize.schemes import SCHEMES
from modelkiln.quantize.variant import gate_failures

QuantizeConfigOf = Callable[[Path, str], QuantizeConfig]  # (parent artifact, scheme) -> settings


@dataclass(frozen=True)
class Variant:
    """One artifact under test."""

    name: str  # label in the report: the scheme, or onnx-<precision> for exports
    path: Path  # artifact directory


def label(directory: Path) -> str:
    manifest = read_manifest(directory)
    scheme = (manifest.quantization or {}).get("scheme")
    return scheme or f"onnx-{manifest.precision}"


def _reusable(directory: Path, weights_sha256: str) -> bool:
    if not (directory / "manifest.json").is_file():
        return False
    return read_manifest(directory).source.weights_sha256 == weights_sha256


def _export(source: str, directory: Path, log: Callable[[str], None]) -> Path:
    # Here, not at the top: the exporter imports torch, which the task registry must not load.
    from modelkiln.exporters.export import ExportConfig, export_model

    if _reusable(directory, resolve_source(source).weights_sha256):
        log(f"reusing {directory}")
        return directory
    log(f"exporting {source} to {directory}")
    export_model(source, directory, ExportConfig(overwrite=True), log=log)
    return directory


def _quantize(
    parent: Path, scheme: str, directory: Path, log: Callable[[str], None], config_of: QuantizeConfigOf
) -> Path:
    parent_sha = read_manifest(parent).source.weights_sha256
    config = config_of(parent, scheme)
    if _reusable(directory, parent_sha) and _settings(directory) == config.settings():
        log(f"reusing {directory}")
        return directory
    log(f"quantizing with {scheme} into {directory}")
    quantize_artifact(parent, directory, config, log=log)
    return directory


def _settings(directory: Path) -> dict | None:
    """The settings a variant was quantized with; None for an export or a variant from before they were
    recorded (so it is made again rather than trusted)."""
    return (read_manifest(directory).quantization or {}).get("settings")


def variant_gate(directory: Path) -> list[str]:
    """What a quantized variant's recorded figures miss of `kiln quantize`'s default gates; [] when it
    passes or is not a quantized variant."""
    quantization = read_manifest(directory).quantization or {}
    if "quality" not in quantization:
        return []
    return gate_failures(quantization["quality"], QuantizeConfig(scheme=quantization["scheme"]))


def check_schemes(schemes: tuple[str, ...]) -> None:
    unknown = [scheme for scheme in schemes if scheme not in SCHEMES]
    if unknown:
        raise KilnError(f"--schemes {', '.join(unknown)}: unknown scheme. Valid: {', '.join(SCHEMES)}.")


def prepare_variants(
    source: str,
    schemes: tuple[str, ...],
    given: tuple[str, ...],
    work_dir: Path,
    log: Callable[[str], None],
    quantize_config: QuantizeConfigOf,
) -> list[Variant]:
    """The given directories, then (with schemes, or when none is given) the fp32 export and its
    children, each quantized with ``quantize_config(parent, scheme)`` unless already there."""
    check_schemes(schemes)
    variants = [Variant(label(Path(d)), Path(d).absolute()) for d in given]
    if schemes or not given:
        fp32 = _export(source, work_dir / "onnx-fp32", log)
        variants.append(Variant("onnx-fp32", fp32))
        variants += [Variant(s, _quantize(fp32, s, work_dir / s, log, quantize_config)) for s in schemes]
    names = [variant.name for variant in variants]
    # Two variants with one label (e.g. two int8 exports) keep apart by their folder names.
    return [
        Variant(v.name if names.count(v.name) == 1 else f"{v.name} ({v.path.name})", v.path) for v in variants
    ]
