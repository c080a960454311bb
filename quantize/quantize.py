"""Make a quantized variant of an artifact, measure it against its parent, and gate on the result.

    from modelkiln.quantize.quantize import QuantizeConfig, quantize_artifact
    manifest = quantize_artifact("out/vit-gpt2", "out/vit-gpt2-int8", QuantizeConfig("int8-dynamic"))

The variant is a complete artifact (graphs, tokenizer, configs, manifest) whose manifest names its
parent (path and content hash), the scheme, options, components, excluded nodes, node counts and the
quality figures. If the quality gate fails, no variant directory is left behind.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import onnx

from modelkiln.artifact import finish, staged_artifact
from modelkiln.errors import KilnError
from modelkiln.exporters.target_graphs import check_target
from modelkiln.exporters.targets import get_target, scheme_refusal
from modelkiln.manifest import (
    Manifest,
    artifact_hash,
    read_manifest,
)
from modelkiln.registry import get_family

from .bnb import make_bnb_artifact
from .calibration import record_calibration
from .graph_prep import excluded_nodes, load_graph, prepare_weight_matmuls
from .schemes import base_schemes, component_scheme, get_scheme, resolve_options
from .variant import QuantizeConfig, measure_quality, read_onnx_parent, record_quality, relative_parent


def _components(manifest: Manifest, config: QuantizeConfig) -> tuple[str, ...]:
    recipe = get_family(manifest.family).quantize_recipes
    chosen = config.components or recipe.get(config.scheme, tuple(manifest.components))
    unknown = [name for name in chosen if name not in manifest.components]
    if unknown:
        raise KilnError(
            f"--components {', '.join(unknown)}: no such component. This artifact has: {', '.join(manifest.components)}."
        )
    scheme = get_scheme(config.scheme)
    for name in chosen:  # a mixed scheme must have a part for every graph it is asked to quantize
        component_scheme(scheme, name, scheme.options)
    return tuple(chosen)


def recipe_exclude(manifest: Manifest, name: str) -> tuple[str, ...]:
    """The family's declared patterns kept in fp32 for this component (e.g. a denoiser's embedders)."""
    return tuple(get_family(manifest.family).quantize_exclude.get(name, ()))


def _target_options(manifest: Manifest, config: QuantizeConfig) -> dict:
    """The scheme's options with what the parent's export target needs forced (TensorRT: symmetric
    int8); a scheme the target cannot run, or a contrary option, is refused."""
    target = get_target(manifest.target)
    scheme = get_scheme(config.scheme)
    options = resolve_options(scheme, config.options)
    needed = (target.schemes or {}).get(scheme.name, {})
    for key, value in needed.items():
        if key in config.options and config.options[key] != value:
            raise KilnError(
                f"scheme {scheme.name} on a {target.name} artifact needs {key}={str(value).lower()}; "
                f"drop --option {key}={str(config.options[key]).lower()}."
            )
    return {**options, **needed}


def _quantize_graph(
    parent: Path, staging: Path, name: str, manifest: Manifest, config, options, feeds
) -> dict:
    spec = manifest.components[name]
    model = load_graph(parent / spec.file)  # also when the parent is symlinks into the hub cache
    prep = prepare_weight_matmuls(model)
    excluded = excluded_nodes(model, (*recipe_exclude(manifest, name), *config.exclude))
    scheme, options = component_scheme(get_scheme(config.scheme), name, options)
    extra = {"calibration": feeds[name]} if scheme.calibrated else {}
    stats = scheme.load_apply()(
        model, staging / spec.file, options, excluded, spec.external_data is not None, **extra
    )
    written = onnx.load(str(staging / spec.file), load_external_data=False)
    check_target(written, get_target(manifest.target), f"component {name} with {config.scheme}", staging)
    if stats["quantized_nodes"] == 0:
        raise KilnError(
            f"scheme {config.scheme} quantized no node of component {name} (excluded: {len(excluded)}). "
            "Nothing would change: check --exclude, or leave this component out with --components."
        )
    return {**stats, **prep, "excluded_nodes": excluded, "scheme": scheme.name, "precision": scheme.precision}


def _copy_untouched(parent: Path, staging: Path, manifest: Manifest, quantized: tuple[str, ...]) -> None:
    graph_files = {
        f for n in quantized for f in (manifest.components[n].file, manifest.components[n].external_data)
    }
    for name in manifest.files:
        if name not in graph_files:
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(parent / name, staging / name)


def _measure(parent: Path, staging: Path, manifest: Manifest, config: QuantizeConfig) -> dict:
    from modelkiln import runtime

    return measure_quality(runtime.load(parent), runtime.load(staging), manifest, config)


def _refuse_target(parent_dir: str | os.PathLike, name: str) -> None:
    """Stop when the parent's export target cannot run the scheme (a mixed one: any of its parts)."""
    target = get_target(read_manifest(parent_dir).target)
    for scheme in base_schemes(get_scheme(name)):
        refusal = scheme_refusal(target, scheme.name)
        if refusal:
            raise KilnError(refusal if scheme.name == name else f"{name}: {refusal}")


def quantize_artifact(
    parent_dir: str | os.PathLike,
    out: str | os.PathLike,
    config: QuantizeConfig,
    log: Callable[[str], None] = lambda message: None,
) -> Manifest:
    """Quantize ``parent_dir`` into ``out``; raise ValidationFailedError (nothing written) below the gate."""
    _refuse_target(parent_dir, config.scheme)
    if get_scheme(config.scheme).kind == "torch":
        # bitsandbytes quantizes the PyTorch source model, not the graphs: a separate path.
        return make_bnb_artifact(parent_dir, out, config.scheme, config, log=log)
    # 1. Check the parent and the request before any work.
    refusal = (
        f"{{path}} is a {{kind}} artifact; scheme {config.scheme} quantizes ONNX graphs. "
        "Pass its ONNX parent or export {source} first."
    )
    parent, manifest = read_onnx_parent(parent_dir, refusal)
    options = _target_options(manifest, config)
    components = _components(manifest, config)
    with staged_artifact(out, overwrite=config.overwrite) as staging:
        # 2. Quantize the chosen graphs; copy everything else unchanged.
        _copy_untouched(parent, staging, manifest, components)
        feeds, calibration = {}, None
        if any(scheme.calibrated for scheme in base_schemes(get_scheme(config.scheme))):
            log("recording calibration inputs")
            feeds, calibration = record_calibration(
                parent,
                config.calibration_images,
                config.num_calibration,
                config.calibration_prompts,
                config.calibration_steps,
                config.image_size,
            )
        stats = {}
        for name in components:
            log(f"quantizing {name} with {config.scheme}")
            stats[name] = _quantize_graph(parent, staging, name, manifest, config, options, feeds)
        # 3. Describe the variant, then measure it against the parent on held-out images.
        variant = replace(
            manifest,
            precision=get_scheme(config.scheme).precision,
            # Each graph records what its weights are stored as: a mixed scheme's parts differ.
            components={
                n: replace(s, precision=stats[n]["precision"]) if n in components else s
                for n, s in manifest.components.items()
            },
            parent={
                "path": relative_parent(parent, out),
                "artifact_sha256": artifact_hash(manifest),
                "precision": manifest.precision,
            },
            quantization={
                "scheme": config.scheme,
                "options": options,
                "components": list(components),
                "exclude": list(config.exclude),
                "recipe_exclude": {name: list(recipe_exclude(manifest, name)) for name in components},
                "calibration": calibration,
                "nodes": stats,
            },
            validation=None,
        )
        variant = finish(staging, variant)
        log("measuring quality against the parent")
        quality = _measure(parent, staging, manifest, config)
        # 4. Record the figures; below the gate, leave nothing that looks like an artifact.
        return record_quality(staging, variant, quality, config)
