"""Validate an artifact against the PyTorch model it came from.

Two checks, both recorded in a JSON report and in the artifact's manifest:

1. per component, the largest absolute difference between the ONNX graph and the PyTorch wrapper on
   the same realistic inputs, against a tolerance;
2. end to end, the artifact's caption tokens against PyTorch ``generate`` with the same settings,
   greedy and beam search, over a set of images (the drawn fixture images unless a folder is given).

    report = validate_artifact("out/vit-gpt2", "nlpconnect/vit-gpt2-image-captioning")
    report["passed"]   # False -> `kiln validate` exits 1
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modelkiln import runtime
from modelkiln.errors import ImageInputError
from modelkiln.exporters.source import resolve_source
from modelkiln.exporters.targets import get_target
from modelkiln.fixtures import shapes
from modelkiln.manifest import read_manifest
from modelkiln.registry import get_family
from modelkiln.runtime.images import load_images
from modelkiln.validation.report import finish_report

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass(frozen=True)
class ValidateConfig:
    """What `kiln validate` compares and how strictly."""

    atol: float = 1e-4  # absolute tolerance per component output
    rtol: float = 1e-4  # relative part, times the largest reference magnitude (logits reach the 100s)
    images: str | None = None  # folder of validation images; None draws fixture images
    num_images: int = 8  # drawn images when no folder is given
    max_new_tokens: int = 16  # caption length compared end to end
    beams: tuple[int, ...] = (1, 4)  # decoding modes compared: 1 = greedy
    prompts: tuple[str | None, ...] = (None,)  # text prefixes compared (None: unconditional captioning)
    allow_pickle: bool = False  # passed to the source loader, as for export
    backend: str = "cpu"  # runtime backend the artifact is run on
    update_manifest: bool = True  # record the report in manifest.json


def validation_images(config: ValidateConfig) -> tuple[list, str]:
    """The images to validate on, and a description for the report."""
    if config.images is None:
        return [shapes.draw(seed)[0] for seed in range(90_000, 90_000 + config.num_images)], (
            f"{config.num_images} drawn fixture images (seeds 90000+)"
        )
    folder = Path(config.images)
    files = (
        sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    )
    if not files:
        raise ImageInputError(
            f"--images {folder} is not a folder of images ({', '.join(sorted(IMAGE_SUFFIXES))})."
        )
    return files, f"{len(files)} images from {folder}"


def _compare(session, outputs: list[str], inputs: dict, expected, config: ValidateConfig) -> dict[str, Any]:
    """The output furthest beyond (or closest to) its tolerance, with its max abs diff."""
    # Only what the graph declares: the exporter drops inputs a graph does not use.
    declared = {value.name for value in session.get_inputs()}
    feeds = {name: tensor.numpy() for name, tensor in inputs.items() if name in declared}
    rows = []
    for name, got, want in zip(outputs, session.run(outputs, feeds), expected, strict=True):
        want = want.numpy()
        diff = float(np.max(np.abs(got - want))) if want.size else 0.0
        limit = config.atol + config.rtol * (float(np.max(np.abs(want))) if want.size else 0.0)
        finite = bool(np.isfinite(got).all())
        rows.append({"output": name, "max_abs_diff": diff, "limit": limit, "finite": finite})
    worst = max(rows, key=lambda row: (not row["finite"], row["max_abs_diff"] - row["limit"]))
    return {**worst, "passed": worst["finite"] and worst["max_abs_diff"] <= worst["limit"]}


def compare_components(pipe, exporter, model, pixel_values, config: ValidateConfig) -> dict[str, Any]:
    """Max abs diff per component and case (e.g. decoder first step, later step)."""
    # torch here, not at the top: quantize's calibration reads validation_images without loading it.
    import torch

    # Families draw some inputs at random (a later decode step's token ids, a KV cache); a fixed seed
    # makes the report, and the manifest that records it, the same on every run.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        target = get_target(pipe.manifest.target)  # the graphs' form: a decoder's cache is the target's
        modules = {component.name: component.module for component in exporter.build_components(model, target)}
        cases = exporter.validation_cases(model, pixel_values, target)
    results: dict[str, Any] = {}
    for name, case, inputs in cases:
        with torch.no_grad():
            expected = modules[name](*inputs.values())
        session = pipe.sessions[name]
        outputs = [value.name for value in session.get_outputs()]
        results[f"{name}: {case}"] = _compare(session, outputs, inputs, expected, config)
    return results


def _until_eos(tokens: list[int], eos: set[int]) -> list[int]:
    for i, token in enumerate(tokens):
        if token in eos:
            return tokens[: i + 1]
    return tokens


def _caption_mode(beams: int, prompt: str | None) -> str:
    mode = "greedy" if beams == 1 else f"beam{beams}"
    return mode if prompt is None else f"{mode}, prompt {prompt!r}"


def compare_captions(pipe, exporter, model, images, torch_pixels, config: ValidateConfig) -> dict[str, Any]:
    """Token-exact caption match per decoding mode and prompt, plus the mismatching captions for reading."""
    ours_pixels = pipe.preprocess(images)
    results = {}
    for prompt, beams in ((p, b) for p in config.prompts for b in config.beams):
        options = {"max_new_tokens": config.max_new_tokens, "num_beams": beams, "do_sample": False}
        eos = set(pipe.settings(**options).eos_token_ids)
        ours = [_until_eos(t, eos) for t in pipe.generate_tokens(ours_pixels, prompt, **options)[1]]
        theirs = [_until_eos(t, eos) for t in exporter.torch_captions(model, torch_pixels, prompt, **options)]
        mismatches = [
            {"image": i, "artifact": pipe.codec.decode(a), "pytorch": pipe.codec.decode(b)}
            for i, (a, b) in enumerate(zip(ours, theirs, strict=True))
            if a != b
        ]
        empty = sum(not pipe.codec.decode(a).strip() for a in ours)
        results[_caption_mode(beams, prompt)] = {
            "matches": len(ours) - len(mismatches),
            "total": len(ours),
            "empty_captions": empty,
            "examples": [pipe.codec.decode(a) for a in ours[:3]],
            "mismatches": mismatches,
            # An empty caption is never a right answer (quantized BLIP-2 can produce them: transformers#30383).
            "passed": not mismatches and empty == 0,
        }
    return results


def validate_artifact(
    artifact_dir: str | os.PathLike, model: str, config: ValidateConfig = ValidateConfig()
) -> dict:
    """Compare an artifact with its PyTorch source; return (and record) the report."""
    import torch  # here, not at the top: see compare_components

    # 1. Load both sides: the artifact through the runtime, the source through the family exporter.
    manifest = read_manifest(artifact_dir)
    pipe = runtime.load(artifact_dir, backend=config.backend)
    exporter = get_family(manifest.family).load_exporter()
    source = resolve_source(model, allow_pickle=config.allow_pickle)
    torch_model = exporter.load_model(source)
    # 2. Preprocess the images: ours for the artifact, the model's own processor for PyTorch.
    images, description = validation_images(config)
    pil_images = load_images(images)
    processor = exporter.reference_processor(source)
    torch_pixels = processor(images=pil_images, return_tensors="pt")["pixel_values"].to(torch.float32)
    # 3. Compare components, then captions.
    components = compare_components(pipe, exporter, torch_model, torch_pixels, config)
    captions = compare_captions(pipe, exporter, torch_model, pil_images, torch_pixels, config)
    # 4. The report, also recorded in the artifact itself.
    checks = {"components": components, "captions": captions}
    return finish_report(artifact_dir, manifest, source, model, config, checks, {"images": description})
