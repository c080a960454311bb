"""kiln inspect DIR [--json]: a summary of an artifact's manifest (--json: all of it)."""

from __future__ import annotations

import argparse
from dataclasses import asdict

from modelkiln.cli.common import next_hint, print_json

HELP = "summarise an artifact's manifest"
LOADS_MODELS = False  # reads one JSON file: works in the runtime-only install


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifact")
    parser.add_argument("--json", action="store_true", help="print the whole manifest as JSON")


def run(args: argparse.Namespace) -> int:
    # Here, not at the top: the manifest module (hashing, graph confinement) is not needed to build the
    # parser, and `kiln --help` should not wait for it.
    from modelkiln.manifest import read_manifest

    manifest = read_manifest(args.artifact)
    if args.json:
        print_json(asdict(manifest))
    else:
        print("\n".join(_inspect_lines(manifest)))
    next_hint(f"kiln verify {args.artifact}")
    return 0


def _inspect_lines(manifest) -> list[str]:
    lines = [
        f"family     {manifest.family} ({manifest.task}), kind {manifest.kind}, "
        f"precision {manifest.precision}, opset {manifest.opset}, target {manifest.target}",
        f"source     {manifest.source.model} (weights sha256 {manifest.source.weights_sha256[:16]}...)",
        f"tools      {', '.join(f'{k} {v}' for k, v in manifest.tools.items())}",
    ]
    if manifest.parent is not None:
        lines.append(
            f"parent     {manifest.parent['path']} ({manifest.parent.get('precision', '?')}, "
            f"artifact sha256 {manifest.parent['artifact_sha256'][:16]}...)"
        )
    lines += _quantization_lines(manifest.quantization)
    for name, spec in manifest.components.items():
        extra = f" + {spec.external_data}" if spec.external_data else ""
        lines.append(f"component  {name}: {spec.file}{extra} ({spec.precision})")
        for kind, values in (("in ", spec.inputs), ("out", spec.outputs)):
            lines += [f"    {kind} {value.name} {value.dtype} {value.shape}" for value in values[:6]]
            if len(values) > 6:
                lines.append(f"    {kind} ... {len(values) - 6} more")
    validation = manifest.validation
    verdict = "none yet" if validation is None else ("passed" if validation["passed"] else "FAILED")
    return [*lines, f"validation {verdict}"]


def _quantization_lines(quantization: dict | None) -> list[str]:
    """Scheme, options, quality figures and gate result of a quantized variant."""
    if not quantization:
        return []
    options = ", ".join(f"{k}={v}" for k, v in quantization.get("options", {}).items()) or "defaults"
    quality = quantization.get("quality", {})
    figures = ", ".join(f"{k} {v:g}" for k, v in quality.items() if isinstance(v, (int, float)))
    gate = quantization.get("gate") or []
    return [
        f"scheme     {quantization['scheme']} ({options})",
        f"quality    vs parent: {figures or 'not measured'}",
        f"gates      {'passed' if not gate else 'FAILED: ' + '; '.join(gate)}",
    ]
