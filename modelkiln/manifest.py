"""The artifact manifest: what an exported artifact is, where it came from, and how to check it.

An artifact is a directory holding ONNX graphs, the files the runtime needs (tokenizer, image
processor, generation config) and ``manifest.json``. The manifest is written last, so a directory
without one is never a finished artifact::

    manifest = read_manifest("out/vit-gpt2")        # ArtifactError if it is not an artifact
    problems = verify_files("out/vit-gpt2", manifest)  # [] when every file matches its sha256
    extra_files("out/vit-gpt2", manifest)              # files it does not list: never opened

Every path the manifest and its graphs name is confined to the artifact (modelkiln.confine) and
every file the runtime opens is listed here with its sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from modelkiln.confine import FIX, config_references, confined_name, graph_external_files
from modelkiln.errors import ArtifactError

MANIFEST_NAME = "manifest.json"
# A text-to-image source folder's own calibration prompts, one a line: the export carries the file into
# the artifact and static quantization calibrates on it by default (the prompts that model knows).
CALIBRATION_PROMPTS_NAME = "calibration_prompts.txt"
FORMAT_NAME = "modelkiln-artifact"
FORMAT_VERSION = 1
# Dynamic axis of a decoder self-attention cache that is a preallocated buffer written in place (the
# onnxruntime target); a cache that grows step by step names its axis after the sequence instead.
CAPACITY_AXIS = "capacity"


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output."""

    name: str  # ONNX value name, the key the runtime feeds or reads
    dtype: str  # numpy dtype name ("float32", "int64")
    shape: list[int | str]  # ints are fixed sizes, strings name dynamic axes ("batch", "past_sequence")


@dataclass(frozen=True)
class ComponentSpec:
    """One ONNX graph of the artifact."""

    file: str  # graph file, relative to the artifact directory
    external_data: str | None  # weights file beside the graph, or None when they are inside it
    inputs: list[TensorSpec]  # in graph order
    outputs: list[TensorSpec]  # in graph order
    precision: str = "fp32"  # weight precision of this graph: fp32, fp16, int8, int4
    fused: dict[str, int] = field(default_factory=dict)  # onnxruntime contrib ops made at export -> count


@dataclass(frozen=True)
class SourceSpec:
    """The model the artifact was exported from."""

    model: str  # hub id or local path as the user gave it
    weights_sha256: str  # sha256 over the weight files (name and content, sorted by name)
    weight_files: list[str]  # the weight files that hash covers
    lora: list[dict[str, Any]] = field(default_factory=list)  # LoRAs fused before export: path, scale, sha256


@dataclass(frozen=True)
class Manifest:
    """Everything an artifact says about itself; serialised as manifest.json."""

    family: str  # key in modelkiln.registry.FAMILIES
    task: str  # what the runtime pipeline does, e.g. "image-to-text"
    source: SourceSpec  # what was exported
    opset: int  # ONNX default-domain opset of every graph
    precision: str  # overall precision of the artifact: fp32 for a plain export
    components: dict[str, ComponentSpec]  # graph name -> graph description
    runtime: dict[str, Any]  # family settings the runtime needs (layer counts, token ids)
    files: dict[str, str] = field(default_factory=dict)  # every file but the manifest -> sha256
    tools: dict[str, str] = field(default_factory=dict)  # library versions that made the artifact
    parent: dict[str, Any] | None = None  # artifact it was derived from: path relative to this one, hash
    quantization: dict[str, Any] | None = None  # scheme and recipe that made it, if any
    validation: dict[str, Any] | None = None  # latest `kiln validate` results, if any
    # "onnx": graphs run by onnxruntime; "torch": a save_pretrained model (bitsandbytes); "tensorrt":
    # serialized TensorRT engines built from an ONNX parent (see ``engine``)
    kind: str = "onnx"
    # Runtime the graphs were exported for (exporters.targets): "onnxruntime" (contrib ops allowed; the
    # value of manifests written before targets existed), "portable" or "tensorrt" (standard ops only)
    target: str = "onnxruntime"
    # kind "tensorrt" only: TensorRT version, GPU name and compute capability the engines were built on,
    # precision, optimization profiles, refittable, timing cache file; None for other kinds
    engine: dict[str, Any] | None = None
    format: str = FORMAT_NAME  # marks the directory as a modelkiln artifact
    format_version: int = FORMAT_VERSION  # bumped on incompatible changes

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"

    def with_validation(self, report: dict[str, Any]) -> Manifest:
        return replace(self, validation=report)


def _tensor_specs(items: list[dict]) -> list[TensorSpec]:
    return [TensorSpec(**item) for item in items]


def manifest_from_dict(data: dict[str, Any]) -> Manifest:
    components = {
        name: ComponentSpec(
            **{**spec, "inputs": _tensor_specs(spec["inputs"]), "outputs": _tensor_specs(spec["outputs"])}
        )
        for name, spec in data["components"].items()
    }
    return Manifest(**{**data, "components": components, "source": SourceSpec(**data["source"])})


def read_manifest(artifact_dir: str | os.PathLike) -> Manifest:
    """Read and check the manifest of an artifact directory."""
    directory = Path(artifact_dir)
    path = directory / MANIFEST_NAME
    if not directory.is_dir():
        raise ArtifactError(f"{directory} is not a directory. Pass the folder `kiln export` wrote.")
    if not path.is_file():
        raise ArtifactError(
            f"{directory} is not a modelkiln artifact: it has no {MANIFEST_NAME}. "
            "Pass a folder written by `kiln export`, or re-export it (an interrupted export leaves none)."
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path} is unreadable ({exc}). Re-export the artifact.") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise ArtifactError(f"{path} is not a modelkiln manifest. Pass a folder written by `kiln export`.")
    if data.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{path} has format version {data.get('format_version')}, this modelkiln reads version "
            f"{FORMAT_VERSION}. Re-export the artifact with this modelkiln version."
        )
    try:
        return manifest_from_dict(data)
    except (KeyError, TypeError) as exc:
        raise ArtifactError(f"{path} is incomplete or malformed ({exc}). Re-export the artifact.") from exc


def write_manifest(artifact_dir: str | os.PathLike, manifest: Manifest) -> None:
    """Write manifest.json atomically, so a reader never sees half a manifest."""
    path = Path(artifact_dir) / MANIFEST_NAME
    tmp = path.with_name(f".{MANIFEST_NAME}.tmp")
    tmp.write_text(manifest.to_json())
    os.replace(tmp, path)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def folder_sha256(folder: str | os.PathLike | None) -> str | None:
    """Content hash of a folder (names and bytes of every file below it), so edited inputs are noticed."""
    if folder is None:
        return None
    root = Path(folder)
    files = {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def _disk_files(root: Path) -> list[str]:
    """Relative POSIX names of the files under ``root`` (symlinks to files included), without entering
    symlinked folders, so a link to ``/`` inside an artifact is never walked."""
    names = []
    for folder, subfolders, files in os.walk(root):
        subfolders.sort()
        base = Path(folder)
        names += [(base / f).relative_to(root).as_posix() for f in files if (base / f).is_file()]
    return sorted(names)


def hash_files(directory: str | os.PathLike) -> dict[str, str]:
    """sha256 of every file in the directory tree except the manifest, keyed by relative POSIX path."""
    root = Path(directory)
    return {name: sha256_file(root / name) for name in _disk_files(root) if name != MANIFEST_NAME}


def extra_files(artifact_dir: str | os.PathLike, manifest: Manifest) -> list[str]:
    """Files in the directory that the manifest does not list: the runtime never opens them."""
    return [
        name
        for name in _disk_files(Path(artifact_dir))
        if name != MANIFEST_NAME and name not in manifest.files
    ]


def _require_listed(manifest: Manifest, name: str, what: str, where: Path) -> None:
    if name not in manifest.files:
        raise ArtifactError(
            f"{where}: {what} names {name!r}, which the manifest's files list does not hash, so it "
            f"cannot be checked. {FIX}."
        )


def check_names(artifact_dir: str | os.PathLike, manifest: Manifest) -> None:
    """Refuse, before any file is opened, a manifest naming a path outside the artifact or a graph
    file its files list does not hash (see modelkiln.confine)."""
    where = Path(artifact_dir) / MANIFEST_NAME
    for component, spec in manifest.components.items():
        for key, name in (("file", spec.file), ("external_data", spec.external_data)):
            if key == "file" or name is not None:
                what = f"component {component!r} {key}"
                _require_listed(manifest, confined_name(name, what, where), what, where)
    for name in manifest.files:
        confined_name(name, "the files list", where)


def check_references(artifact_dir: str | os.PathLike, manifest: Manifest) -> None:
    """Refuse a graph whose external data, or a config whose shards, components or tokenizer files,
    are outside the artifact or (files) not hashed by the manifest. Graphs are read as protobuf
    structure only, before onnxruntime opens them; absent files are skipped (reported as missing)."""
    directory = Path(artifact_dir)
    graphs = manifest.components.values() if manifest.kind != "tensorrt" else ()  # engines are not ONNX
    for spec in graphs:
        if (directory / spec.file).is_file():
            for name in graph_external_files(spec.file, directory / spec.file):
                _require_listed(manifest, name, "its external data", directory / spec.file)
    for config in manifest.files:
        if (directory / config).is_file():
            for what, name, is_file in config_references(config, directory / config):
                if is_file:
                    _require_listed(manifest, name, what, directory / config)


def verify_files(artifact_dir: str | os.PathLike, manifest: Manifest) -> list[str]:
    """Every difference between the files the manifest lists (all the runtime may open) and the
    directory, as readable lines; ArtifactError if the manifest or a graph names a path it must not.
    Files the manifest does not list are not differences: see ``extra_files``."""
    directory = Path(artifact_dir)
    check_names(directory, manifest)
    problems = _missing(directory, manifest)
    for name, digest in manifest.files.items():
        if (directory / name).is_file() and (actual := sha256_file(directory / name)) != digest:
            problems.append(f"changed: {name} (sha256 {actual[:12]}..., manifest says {digest[:12]}...)")
    if not problems:
        check_references(directory, manifest)
    return problems


def _missing(directory: Path, manifest: Manifest) -> list[str]:
    return [f"missing: {name}" for name in manifest.files if not (directory / name).is_file()]


def require_intact(artifact_dir: str | os.PathLike, manifest: Manifest, hashes: bool = True) -> None:
    """Raise ArtifactError unless every path named is confined and every manifest file is there (and,
    with ``hashes``, unchanged). What ``kiln verify`` checks is what this checks, with ``hashes``."""
    directory = Path(artifact_dir)
    if hashes:
        problems = verify_files(directory, manifest)
    else:
        check_names(directory, manifest)
        problems = _missing(directory, manifest)
        if not problems:
            check_references(directory, manifest)
    if problems:
        raise ArtifactError(
            f"{directory} does not match its manifest: {'; '.join(problems)}. "
            "Re-export or re-copy the artifact (`kiln verify` lists every difference)."
        )


def artifact_hash(manifest: Manifest) -> str:
    """One sha256 naming the artifact's content: a hash over its file hashes."""
    digest = hashlib.sha256()
    for name, file_hash in sorted(manifest.files.items()):
        digest.update(f"{name}\0{file_hash}\n".encode())
    return digest.hexdigest()
