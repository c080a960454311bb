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
from collections.abc import Callable
from typing import Any

from modelkiln.artifact import finish, staged_artifact
from modelkiln.errors import KilnError, SourceModelError
from modelkiln.manifest import (
    Manifest,
    SourceSpec,
)
from modelkiln.registry import Family, detect_family, get_family

from .bnb_common import (
    QUANTIZED_MODULES,
    BnbSource,
    bnb_version,
    module_counts,
    parent_record,
    resolve_bnb_source,
    torch_bnb_kwargs,
    unpackable_for_4bit,
)
from .bnb_diffusion import make_diffusion_variant
from .schemes import get_scheme, resolve_options
from .variant import QuantizeConfig, measure_quality, record_quality


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


def four_bit_skips(source, loader, trust_remote_code: bool = False) -> list[str]:
    """Modules a 4-bit scheme keeps in full precision: transformers' own choice (tied and output
    embeddings), plus every Linear bitsandbytes' AVX512-BF16 CPU path cannot pack (``unpackable_for_4bit``).
    Listed in the manifest's bitsandbytes_config."""
    import torch
    from transformers.quantizers.base import get_keys_to_not_convert

    config = loader.config_class.from_pretrained(source.path, trust_remote_code=trust_remote_code)
    # Weightless, as bnb_diffusion's component models: names and shapes are all the skip list needs.
    with torch.device("meta"):
        model = loader._from_config(config)
    return sorted({*get_keys_to_not_convert(model), *unpackable_for_4bit(model)})


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


def _describe(source, family: Family, given: BnbSource, scheme: str, options: dict, model, out) -> Manifest:
    from modelkiln.exporters.export import tool_versions

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
        return make_diffusion_variant(given, source, family, out, options, config, log)
    _refuse_onnx_only(config)
    _check_not_quantized(source)
    return _make_captioner_variant(given, source, family, out, options, config, trust_remote_code, log)


def _make_captioner_variant(
    given: BnbSource, source, family: Family, out, options: dict, config, trust_remote_code: bool, log
) -> Manifest:
    from modelkiln import runtime

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
