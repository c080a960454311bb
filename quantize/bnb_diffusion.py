"""bitsandbytes variants of the diffusion families: the diffusers pipeline quantized as it loads, saved
with ``save_pretrained`` as an artifact of kind ``torch`` that ``modelkiln.runtime.load`` runs.

    from modelkiln.quantize.bnb import make_bnb_artifact
    from modelkiln.quantize.quantize import QuantizeConfig
    make_bnb_artifact("out/sd35", "out/sd35-nf4", "bnb-nf4")          # the denoiser only (the default)
    config = QuantizeConfig("bnb-nf4", components=("transformer", "text_encoder_3"))  # and the T5
    make_bnb_artifact("out/sd35", "out/sd35-nf4-t5", "bnb-nf4", config)

``make_bnb_artifact`` comes here once the family's task is text-to-image. The denoiser (transformer
or UNet) is quantized, and the text encoders named with ``components`` (the T5, the biggest one);
the VAE stays fp32. The family's declared fp32 patterns (``Family.quantize_exclude``, as for ONNX schemes)
and ``exclude`` keep matching ``nn.Linear`` module paths unquantized. Quality is PSNR/SSIM against
the ONNX parent from identical latents, else against the fp32 source run by diffusers.
"""

from __future__ import annotations

import importlib
import json
import os
from collections import Counter
from collections.abc import Callable
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from modelkiln.artifact import finish, staged_artifact
from modelkiln.errors import KilnError, SourceModelError
from modelkiln.manifest import Manifest, SourceSpec
from modelkiln.registry import Family

from .bnb_common import (
    QUANTIZED_MODULES,
    BnbSource,
    bnb_version,
    module_counts,
    parent_record,
    torch_bnb_kwargs,
    unpackable_for_4bit,
)
from .schemes import get_scheme
from .variant import measure_quality, record_quality


def _present(source, name: str) -> bool:
    entry = source.config.get(name)
    return isinstance(entry, list) and entry[0] is not None and (source.path / name).is_dir()


def chosen_components(family: Family, config, runtime_config: dict, source) -> tuple[str, ...]:
    """The pipeline components to quantize: ``config.components``, else the denoiser alone."""
    from modelkiln.runtime.torch_diffusion import torch_diffusion_family

    rules = torch_diffusion_family(family.name)
    chosen = tuple(config.components or (rules.denoiser,))
    left_out = set(runtime_config.get("without", ()))
    valid = [name for name in (rules.denoiser, *rules.text_encoders) if _present(source, name)]
    valid = [name for name in valid if name not in left_out]
    for name in chosen:
        if name in left_out:
            raise KilnError(
                f"--components {name}: the parent artifact was exported without {name}, so the variant "
                f"runs without it too. Pick from {', '.join(valid)}."
            )
        if name not in valid:
            raise KilnError(
                f"--components {name}: scheme {config.scheme} quantizes the nn.Linear layers of "
                f"{', '.join(valid)} in this {family.name} pipeline; the VAE stays fp32 (mostly "
                "convolutions, which bitsandbytes leaves alone). Pick from those."
            )
    return chosen


def _meta_model(folder: Path, library: str, class_name: str):
    """A weightless (meta) instance of a component: its module names and shapes."""
    import torch

    model_class = getattr(importlib.import_module(library), class_name)
    with torch.device("meta"):
        if library == "diffusers":
            return model_class.from_config(model_class.load_config(folder))
        return model_class(model_class.config_class.from_pretrained(folder))


def skip_modules(source, family: Family, name: str, exclude: tuple[str, ...], four_bit: bool) -> list[str]:
    """Linear layers of component ``name`` kept fp32: the family recipe's patterns and ``exclude``, and
    for 4-bit schemes the layers bitsandbytes' CPU path cannot pack (``unpackable_for_4bit``)."""
    import torch

    recipe = family.quantize_exclude.get(name, ())
    patterns = (*recipe, *exclude)
    if not patterns and not four_bit:
        return []
    library, class_name = source.config[name]
    model = _meta_model(source.path / name, library, class_name)
    names = [path for path, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    # Exact module paths: bitsandbytes' skip list also matches any path that merely starts with one.
    chosen = {path for path in names if any(fnmatchcase(path, pattern) for pattern in patterns)}
    return sorted(chosen | set(unpackable_for_4bit(model) if four_bit else ()))


def pipeline_quantization(source, components: tuple[str, ...], scheme: str, options: dict, skips: dict):
    """A diffusers PipelineQuantizationConfig with one BitsAndBytesConfig per component, of its library."""
    import diffusers
    import transformers

    config_classes = {
        "diffusers": diffusers.BitsAndBytesConfig,
        "transformers": transformers.BitsAndBytesConfig,
    }
    settings = torch_bnb_kwargs(scheme, options)
    mapping = {}
    for name in components:
        library = source.config[name][0]
        # None keeps each library's default skips (e.g. T5's fp32 "wo"); a list would replace them.
        mapping[name] = config_classes[library](**settings, llm_int8_skip_modules=skips[name] or None)
    return diffusers.PipelineQuantizationConfig(quant_mapping=mapping)


def load_quantized_pipeline(source, family: str, runtime_config: dict, quantization):
    """The source pipeline loaded on CPU with ``quantization`` (see pipeline_quantization)."""
    from modelkiln.runtime.torch_diffusion import load_diffusers

    return load_diffusers(source.path, family, runtime_config, quantization, not source.uses_pickle)


def _runtime_config(given: BnbSource, source, family: Family) -> dict:
    """The parent's runtime settings (T5 length, left-out encoders), else the exporter's defaults."""
    if given.parent is not None:
        return dict(given.parent.runtime)
    exporter = family.load_exporter()
    return exporter.runtime_config(exporter.load_model(source))


def _check_source(given: BnbSource, source, components: tuple[str, ...]) -> None:
    """Refuse what would quantize other weights than the parent's, or weights quantized already."""
    if given.parent is not None and given.parent.source.lora:
        # The variant would silently lose the LoRA, and its quality figures would measure that loss.
        raise KilnError(
            f"{given.parent_dir} has LoRAs fused into its weights; bitsandbytes quantizes the source "
            "weights as they load, without them. Fuse the LoRA into the pipeline (pipe.fuse_lora(); "
            "pipe.unload_lora_weights(); pipe.save_pretrained(DIR)), export DIR and quantize that artifact."
        )
    for name in components:
        config = json.loads((source.path / name / "config.json").read_text())
        if config.get("quantization_config"):
            raise SourceModelError(
                f"{source.path / name} is already quantized ({config['quantization_config'].get('quant_method')}). "
                "Pass the original float pipeline to quantize it."
            )


def _component_record(module, skips: list[str]) -> dict[str, Any]:
    return {
        # JSON round trip: dtypes and enum members become the strings a manifest holds.
        "bitsandbytes_config": json.loads(
            module.hf_quantizer.quantization_config.to_json_string(use_diff=False)
        ),
        "skip_modules": skips,
        "modules": module_counts(module),
    }


def _quantization(scheme: str, options: dict, pipe, components: tuple[str, ...], skips: dict) -> dict:
    records = {name: _component_record(getattr(pipe, name), skips[name]) for name in components}
    totals = sum((Counter(record["modules"]) for record in records.values()), Counter())
    if not any(totals[name] for name in QUANTIZED_MODULES):
        raise KilnError(
            f"scheme {scheme} quantized no layer of {', '.join(components)}: no nn.Linear was left."
        )
    return {
        "scheme": scheme,
        "options": options,
        "components": list(components),
        "modules": dict(totals),  # over all quantized components, as the CLI prints them
        "component_records": records,
    }


def _describe(
    source, family: Family, given: BnbSource, runtime_config: dict, quantization: dict, out
) -> Manifest:
    from modelkiln.exporters.export import tool_versions

    return Manifest(
        family=family.name,
        task=family.task,
        source=SourceSpec(given.model, source.weights_sha256, list(source.weight_files)),
        opset=0,  # no ONNX graphs in a torch artifact
        precision=get_scheme(quantization["scheme"]).precision,
        components={},  # a diffusers save_pretrained folder; quantization["components"] says what changed
        runtime=runtime_config,
        tools={**tool_versions(), **bnb_version()},
        parent=parent_record(given, out),
        quantization=quantization,
        kind="torch",
    )


def _reference_pipeline(given: BnbSource, source, variant: Manifest):
    """What quality is measured against: the ONNX parent, else the fp32 source run by diffusers."""
    from modelkiln import runtime

    if given.parent_dir is not None:
        return runtime.load(given.parent_dir)
    # The source folder holds the scheduler the reference's initial_latents() reads, as an export does.
    pipeline_class = runtime.torch_pipeline_class(variant.family)
    return pipeline_class(source.path, variant, runtime.RuntimeOptions())


def make_diffusion_variant(
    given: BnbSource,
    source,
    family: Family,
    out: str | os.PathLike,
    options: dict,
    config,
    log: Callable[[str], None] = lambda message: None,
) -> Manifest:
    """Quantize the pipeline behind ``given`` into the torch artifact ``out`` (see make_bnb_artifact)."""
    from modelkiln import runtime

    # 1. Decide what to quantize and which layers stay fp32, before loading any weights.
    runtime_config = _runtime_config(given, source, family)
    components = chosen_components(family, config, runtime_config, source)
    _check_source(given, source, components)
    four_bit = bool(torch_bnb_kwargs(config.scheme, options).get("load_in_4bit"))
    skips = {name: skip_modules(source, family, name, tuple(config.exclude), four_bit) for name in components}
    quantization = pipeline_quantization(source, components, config.scheme, options, skips)
    with staged_artifact(out, overwrite=config.overwrite) as staging:
        # 2. Quantize while loading, then save the whole pipeline (tokenizers, scheduler, fp32 VAE).
        log(f"loading {given.model} with {config.scheme} on {', '.join(components)}")
        pipe = load_quantized_pipeline(source, family.name, runtime_config, quantization)
        pipe.save_pretrained(staging)
        record = _quantization(config.scheme, options, pipe, components, skips)
        del pipe
        variant = finish(staging, _describe(source, family, given, runtime_config, record, out))
        # 3. Measure the saved variant (reloaded, as users will run it) against the reference.
        log("measuring quality against the parent")
        reference = _reference_pipeline(given, source, variant)
        quality = measure_quality(reference, runtime.load(staging), variant, config)
        return record_quality(staging, variant, quality, config)
