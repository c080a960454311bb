"""bitsandbytes variants: a PyTorch model quantized by ``BitsAndBytesConfig`` as it loads, saved as a
modelkiln artifact of kind ``torch`` that ``modelkiln.runtime.load`` runs with transformers ``generate``
(captioners) or the diffusers pipeline (text-to-image, see ``quantize.bnb_diffusion``).

    from modelkiln.quantize.bnb import make_bnb_artifact
    manifest = make_bnb_artifact("out/vit-gpt2", "out/vit-gpt2-nf4", "bnb-nf4")   # from an ONNX artifact
    manifest = make_bnb_artifact("path/to/model", "out/vit-gpt2-nf4", "bnb-nf4")  # from the model itself
    manifest = make_bnb_artifact("out/sd35", "out/sd35-int8", "bnb-int8")         # a diffusion artifact

bitsandbytes quantizes at load time, so the source is always the original model: an ONNX artifact names
it in ``manifest.source.model``. Quality is measured against the ONNX parent when there is one, else
against the fp32 source run by transformers or diffusers. Nothing here imports torch until a variant
is made.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelkiln.artifact import finish, staged_artifact
from modelkiln.errors import KilnError, SourceModelError
from modelkiln.manifest import (
    MANIFEST_NAME,
    Manifest,
    SourceSpec,
    artifact_hash,
    read_manifest,
    require_intact,
)
from modelkiln.registry import Family, detect_family, get_family

# Module classes bitsandbytes puts in place of nn.Linear; counted into the manifest.
QUANTIZED_MODULES = ("Linear8bitLt", "Linear4bit")


def int8_config(options: dict) -> dict[str, Any]:
    """BitsAndBytesConfig arguments of bnb-int8 (LLM.int8: int8 weights, fp outliers above threshold)."""
    return {"load_in_8bit": True, "llm_int8_threshold": float(options["llm_int8_threshold"])}


def _four_bit(quant_type: str) -> Callable[[dict], dict[str, Any]]:
    def config(options: dict) -> dict[str, Any]:
        # CPU kernels compute in float32; the fp16 default is meant for GPUs.
        return {
            "load_in_4bit": True,
            "bnb_4bit_quant_type": quant_type,
            "bnb_4bit_use_double_quant": bool(options["double_quant"]),
            "bnb_4bit_compute_dtype": "float32",
        }

    return config


nf4_config = _four_bit("nf4")
fp4_config = _four_bit("fp4")


@dataclass(frozen=True)
class BnbSource:
    """What a bitsandbytes variant is made from."""

    model: str  # source model (hub id or save_pretrained directory) the weights are loaded from
    parent_dir: Path | None  # ONNX artifact it was given as, None when the model was given directly
    parent: Manifest | None  # that artifact's manifest


def resolve_bnb_source(given: str | os.PathLike) -> BnbSource:
    """An ONNX artifact (its manifest names the source model) or a source model given directly."""
    path = Path(given)
    if not (path / MANIFEST_NAME).is_file():
        return BnbSource(str(given), None, None)
    parent_dir = path.absolute()
    manifest = read_manifest(parent_dir)
    if manifest.kind != "onnx":
        raise KilnError(
            f"{parent_dir} is already a {manifest.kind} variant ({manifest.precision}). Pass its ONNX "
            f"parent or the original model ({manifest.source.model})."
        )
    require_intact(parent_dir, manifest)
    return BnbSource(manifest.source.model, parent_dir, manifest)


def _check_same_weights(source, given: BnbSource) -> None:
    # A variant compared with a parent exported from other weights would report meaningless quality.
    if given.parent is not None and source.weights_sha256 != given.parent.source.weights_sha256:
        raise SourceModelError(
            f"the weights of {given.model} changed since {given.parent_dir} was exported from them. "
            "Re-export the ONNX artifact, or pass the model directory itself instead of the artifact."
        )


def _check_not_quantized(source) -> None:
    if source.config.get("quantization_config"):
        method = source.config["quantization_config"].get("quant_method", "unknown")
        raise SourceModelError(
            f"{source.path} is already quantized ({method}). Pass the original float model to quantize it."
        )


def bnb_config_dict(scheme: str, options: dict) -> dict[str, Any]:
    from .schemes import get_scheme

    return get_scheme(scheme).load_apply()(options)


def torch_bnb_kwargs(scheme: str, options: dict) -> dict[str, Any]:
    """The scheme's BitsAndBytesConfig arguments, the compute dtype as the torch dtype the configs take."""
    import torch

    settings = bnb_config_dict(scheme, options)
    if "bnb_4bit_compute_dtype" in settings:
        settings = {**settings, "bnb_4bit_compute_dtype": getattr(torch, settings["bnb_4bit_compute_dtype"])}
    return settings


def load_quantized(source, family: Family, scheme: str, options: dict, trust_remote_code: bool = False):
    """The source model loaded with the scheme's BitsAndBytesConfig on CPU, with the exporter's rules."""
    from transformers import BitsAndBytesConfig

    from modelkiln.exporters.source import load_pretrained
    from modelkiln.runtime.torch_captioning import model_class

    _require_bitsandbytes()
    settings = torch_bnb_kwargs(scheme, options)
    if settings.get("load_in_4bit"):
        settings["llm_int8_skip_modules"] = four_bit_skips(
            source, model_class(family.name), trust_remote_code
        )
    # The exporters' loading rule: fp32, safetensors only unless the source was resolved with allow_pickle.
    return load_pretrained(
        source,
        model_class(family.name),
        trust_remote_code,
        quantization_config=BitsAndBytesConfig(**settings),
    )


BNB_4BIT_BLOCK = 64  # weights per bitsandbytes 4-bit quantization block (its blocksize default)


def four_bit_skips(source, loader, trust_remote_code: bool = False) -> list[str]:
    """Modules a 4-bit scheme keeps in full precision: transformers' own choice (tied and output
    embeddings), plus every Linear whose input width is not a whole number of 4-bit blocks.

    On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights block by block on the first forward
    and fails on such a layer (``shape '[96, 0]' is invalid``); a checkpoint quantized elsewhere would
    then crash there. Real checkpoints have no such layer; small models do. Listed in the manifest's
    bitsandbytes_config.
    """
    import torch
    from accelerate import init_empty_weights
    from transformers.quantizers.base import get_keys_to_not_convert

    config = loader.config_class.from_pretrained(source.path, trust_remote_code=trust_remote_code)
    with init_empty_weights():
        model = loader._from_config(config)  # on the meta device: names and shapes, no weights
    narrow = [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module.in_features % BNB_4BIT_BLOCK
    ]
    return sorted({*get_keys_to_not_convert(model), *narrow})


def _require_bitsandbytes() -> None:
    try:
        # transformers' bitsandbytes loader also needs accelerate, even on CPU.
        import accelerate  # noqa: F401
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise KilnError(
            f"bitsandbytes schemes need the bitsandbytes and accelerate packages ({exc}). Install them: "
            "pip install 'modelkiln[bnb]'."
        ) from exc


def module_counts(model) -> dict[str, int]:
    """How many modules of each quantized class (and plain Linear) the model holds."""
    counts = Counter(type(module).__name__ for module in model.modules())
    return {name: counts[name] for name in (*QUANTIZED_MODULES, "Linear") if counts[name]}


def _quantization(scheme: str, options: dict, model) -> dict[str, Any]:
    modules = module_counts(model)
    if not any(modules.get(name) for name in QUANTIZED_MODULES):
        raise KilnError(f"scheme {scheme} quantized no layer of this model: it has no nn.Linear to replace.")
    return {
        "scheme": scheme,
        "options": options,
        # JSON round trip: to_dict keeps enum members (quant_method) that a manifest should not hold.
        "bitsandbytes_config": json.loads(model.config.quantization_config.to_json_string(use_diff=False)),
        "modules": modules,
    }


def parent_record(given: BnbSource, out: str | os.PathLike) -> dict[str, Any] | None:
    from .quantize import relative_parent

    if given.parent is None:
        return None
    return {
        "path": relative_parent(given.parent_dir, out),
        "artifact_sha256": artifact_hash(given.parent),
        "precision": given.parent.precision,
        "kind": given.parent.kind,
    }


def _describe(source, family: Family, given: BnbSource, scheme: str, options: dict, model, out) -> Manifest:
    from modelkiln.exporters.export import tool_versions

    from .schemes import get_scheme

    return Manifest(
        family=family.name,
        task=family.task,
        source=SourceSpec(given.model, source.weights_sha256, list(source.weight_files)),
        opset=0,  # no ONNX graphs in a torch artifact
        precision=get_scheme(scheme).precision,
        components={},  # the whole model is one save_pretrained checkpoint; see quantization["modules"]
        runtime=family.load_exporter().runtime_config(model),
        tools={**tool_versions(), **bnb_version()},
        parent=parent_record(given, out),
        quantization=_quantization(scheme, options, model),
        kind="torch",
    )


def bnb_version() -> dict[str, str]:
    from importlib import metadata

    return {"bitsandbytes": metadata.version("bitsandbytes")}


def _reference_pipeline(given: BnbSource, source, variant: Manifest):
    """What quality is measured against: the ONNX parent, else the fp32 source run by transformers."""
    from modelkiln import runtime

    if given.parent_dir is not None:
        return runtime.load(given.parent_dir)
    # The source folder holds the tokenizer and processor files the pipeline reads, as export requires.
    return runtime.torch_pipeline_class(variant.family)(source.path, variant, runtime.RuntimeOptions())


def make_bnb_artifact(
    source_model: str | os.PathLike,
    out: str | os.PathLike,
    scheme: str,
    config=None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    log: Callable[[str], None] = lambda message: None,
) -> Manifest:
    """Quantize the model behind ``source_model`` with a bnb scheme into the torch artifact ``out``.

    ``config`` is a ``QuantizeConfig`` (options, gate, image or prompt count, overwrite); its scheme must
    match. Raises ValidationFailedError, leaving nothing at ``out``, when the quality gate fails.
    """
    from modelkiln.exporters.source import resolve_source

    from .quantize import QuantizeConfig
    from .schemes import get_scheme, resolve_options

    config = config or QuantizeConfig(scheme)
    # 1. Check the request, the source and its family before loading any weights.
    if config.scheme != scheme:
        raise KilnError(
            f"scheme {scheme} was asked with a QuantizeConfig for {config.scheme}; pass one scheme."
        )
    _require_bitsandbytes()
    options = resolve_options(get_scheme(scheme), config.options)
    given = resolve_bnb_source(source_model)
    source = resolve_source(given.model, allow_pickle=allow_pickle)
    _check_same_weights(source, given)
    family = get_family(given.parent.family) if given.parent else detect_family(source.config, given.model)
    # 2. Quantize, save and measure: a diffusers pipeline, or a transformers captioner.
    if family.task == "text-to-image":
        from .bnb_diffusion import make_diffusion_variant

        return make_diffusion_variant(given, source, family, out, options, config, log)
    _refuse_onnx_only(config)
    _check_not_quantized(source)
    return _make_captioner_variant(given, source, family, out, options, config, trust_remote_code, log)


def _make_captioner_variant(
    given: BnbSource, source, family: Family, out, options: dict, config, trust_remote_code: bool, log
) -> Manifest:
    from modelkiln import runtime

    from .quantize import measure_quality, record_quality

    scheme = config.scheme
    with staged_artifact(out, overwrite=config.overwrite) as staging:
        # 1. Quantize while loading, then save the model and the files the runtime reads.
        log(f"loading {given.model} with {scheme}")
        model = load_quantized(source, family, scheme, options, trust_remote_code)
        model.save_pretrained(staging)
        family.load_exporter().save_runtime_files(source, model, staging)
        variant = finish(staging, _describe(source, family, given, scheme, options, model, out))
        del model
        # 2. Measure the saved variant (reloaded, as users will run it) against the reference.
        log("measuring quality against the parent")
        reference = _reference_pipeline(given, source, variant)
        quality = measure_quality(reference, runtime.load(staging), variant, config)
        return record_quality(staging, variant, quality, config)


def _refuse_onnx_only(config) -> None:
    # bitsandbytes replaces every nn.Linear of a captioner; it has no components to pick.
    if config.components or config.exclude:
        raise KilnError(
            f"scheme {config.scheme} quantizes the whole PyTorch captioner: --components and --exclude apply "
            "to ONNX schemes (and to bitsandbytes on diffusion pipelines) only. Leave them out."
        )
