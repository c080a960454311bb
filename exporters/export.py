"""Export a Hugging Face model to a modelkiln artifact directory.

    from modelkiln.exporters.export import ExportConfig, export_model
    manifest = export_model("nlpconnect/vit-gpt2-image-captioning", "out/vit-gpt2", ExportConfig(opset=18))

The family is detected from the model's config (or forced with ``ExportConfig.family``); the family
file in this package declares the graphs. The artifact appears only when complete.
"""

from __future__ import annotations

import gc
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata

from modelkiln.artifact import finish, staged_artifact
from modelkiln.errors import KilnError, UnsupportedModelError
from modelkiln.manifest import Manifest, SourceSpec
from modelkiln.registry import FAMILIES, Family, detect_family, get_family

from .diffusion import Lora, PipelineModels
from .onnx_export import export_component
from .protocol import FamilyExporter
from .source import Source, refuse_bitsandbytes, resolve_source
from .target_graphs import finish_for_target
from .targets import DEFAULT_TARGET, Target, get_target


@dataclass(frozen=True)
class ExportConfig:
    """Options of one export."""

    family: str | None = None  # force a registry family instead of detecting it from config.json
    opset: int = 18  # ONNX opset; 18 runs on onnxruntime >= 1.14 and TensorRT 10
    allow_pickle: bool = False  # load .bin/.pt checkpoints (unpickling runs arbitrary code)
    trust_remote_code: bool = False  # run model code shipped with the checkpoint
    overwrite: bool = False  # replace an existing output directory
    external_data: bool | None = None  # weights beside the graph: None decides by size (>2 GB), True forces
    lora: tuple[str, ...] = ()  # diffusion only: "PATH[:SCALE]" LoRAs fused into the weights before export
    max_sequence_length: int | None = None  # diffusion only: T5 prompt length (None: the family default)
    without: tuple[str, ...] = ()  # diffusion only: optional components left out (SD3: text_encoder_3)
    # Rewrite attention into onnxruntime's MultiHeadAttention in the components that declare it (the
    # SD3/Flux transformers and ViT, where it was measured faster; only the onnxruntime target declares
    # any). A captioning decoder's cache form is the target's: --target portable for standard ops only.
    fuse_attention: bool = True
    target: str = DEFAULT_TARGET  # key of exporters.targets.TARGETS: onnxruntime, portable, tensorrt

    def family_options(self) -> dict:
        """The family-specific options that were set, as keyword arguments of the exporter's load_model."""
        options = {
            "lora": tuple(Lora.parse(text) for text in self.lora),
            "max_sequence_length": self.max_sequence_length,
            "without": tuple(self.without),
        }
        return {name: value for name, value in options.items() if value}


def tool_versions() -> dict[str, str]:
    names = [
        "modelkiln",
        "torch",
        "transformers",
        "diffusers",
        "peft",
        "onnx",
        "onnxruntime",
        "onnxscript",
        "tokenizers",
        "numpy",
    ]
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _check_options(config: ExportConfig, family: Family) -> dict:
    """Family options the user set; an option the family does not declare is an error, never ignored."""
    options = config.family_options()
    for name in options:
        if name not in family.export_options:
            flag = "--" + name.replace("_", "-")
            raise KilnError(
                f"{flag} does not apply to family {family.name!r}; it applies to the diffusion families "
                f"({', '.join(f.name for f in FAMILIES.values() if f.task == 'text-to-image')}). Drop {flag}."
            )
    if "lora" in options:
        for lora in options["lora"]:
            lora.weights_file()  # fails now, before any loading, on a missing LoRA
    return options


def _check_target(config: ExportConfig) -> Target:
    """The export's target, refused up front when the opset is too old for it."""
    target = get_target(config.target)
    if config.opset < target.min_opset:
        raise KilnError(
            f"--opset {config.opset} is too old for target {target.name}: it needs opset {target.min_opset} "
            "or later (LayerNormalization as one node). Pass --opset 18, the default."
        )
    return target


def _resolve_family(config: ExportConfig, source: Source, model: str) -> Family:
    """The detected family, or the forced one when the config does not belong to another family.

    Forcing is for a supported architecture under a name the detectors do not know; forcing a family onto
    a checkpoint that another family's detector claims would only fail deep inside transformers.
    """
    if not config.family:
        return detect_family(source.config, model)
    forced = get_family(config.family)
    claimed = [family for family in FAMILIES.values() if family.matches(source.config)]
    if claimed and forced not in claimed:
        raise UnsupportedModelError(
            f"--family {forced.name} does not fit {model}: its config is a {claimed[0].name} checkpoint "
            f"({claimed[0].description}). Drop --family to export it as {claimed[0].name}, or pass a "
            f"{forced.name} checkpoint."
        )
    return forced


def _lora_record(torch_model) -> list:
    """The fused LoRAs, for the manifest: only diffusion pipelines take LoRAs (--lora is refused elsewhere)."""
    return torch_model.lora_record() if isinstance(torch_model, PipelineModels) else []


def export_model(
    model: str | os.PathLike,
    out: str | os.PathLike,
    config: ExportConfig = ExportConfig(),
    log: Callable[[str], None] = lambda message: None,
) -> Manifest:
    """Export ``model`` (hub id or local directory) into the artifact directory ``out``."""
    # 1. Resolve the source and its family before any heavy work, so mistakes fail fast.
    source = resolve_source(str(model), allow_pickle=config.allow_pickle)
    refuse_bitsandbytes(source)
    family = _resolve_family(config, source, str(model))
    exporter: FamilyExporter = family.load_exporter()
    options = _check_options(config, family)
    target = _check_target(config)
    with staged_artifact(out, overwrite=config.overwrite) as staging:
        # 2. Load the PyTorch model once; every component wraps the same weights.
        log(f"loading {model} as family {family.name}")
        torch_model = exporter.load_model(source, trust_remote_code=config.trust_remote_code, **options)
        # 3. Export component by component, freeing each trace before the next; each graph is made to
        # fit the target and checked against it (a node the target cannot take fails the export).
        components = {}
        for component in exporter.build_components(torch_model, target):
            log(f"exporting {component.name}")
            spec = export_component(
                component, staging, config.opset, config.external_data, config.fuse_attention
            )
            finish_for_target(staging / spec.file, target, f"component {component.name}")
            components[component.name] = spec
            del component
            gc.collect()
        # 4. Copy what the runtime needs, then write the manifest last.
        exporter.save_runtime_files(source, torch_model, staging)
        manifest = Manifest(
            family=family.name,
            task=family.task,
            source=SourceSpec(
                str(model), source.weights_sha256, list(source.weight_files), _lora_record(torch_model)
            ),
            opset=config.opset,
            precision="fp32",
            components=components,
            runtime=exporter.runtime_config(torch_model),
            tools=tool_versions(),
            target=target.name,
        )
        return finish(staging, manifest)
