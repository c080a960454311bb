"""The family registry: which model families modelkiln exports, and how each is detected and run.

``FAMILIES`` is a plain dict from family name to ``Family``. Exporter and runtime are named by import
path and loaded lazily, so running an artifact never imports the exporters (and with them, torch)::

    family = get_family("vit-gpt2")
    family = detect_family(config_dict)            # from a model's config.json
    exporter = family.load_exporter()              # module with COMPONENTS, build_components(), ...
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from modelkiln.errors import UnsupportedModelError


def _sub_type(config: dict[str, Any], key: str) -> str | None:
    sub = config.get(key)
    return sub.get("model_type") if isinstance(sub, dict) else None


def _is_vit_gpt2(config: dict[str, Any]) -> bool:
    return (
        config.get("model_type") == "vision-encoder-decoder"
        and _sub_type(config, "encoder") in {"vit", "deit"}
        and _sub_type(config, "decoder") == "gpt2"
    )


def _is_blip(config: dict[str, Any]) -> bool:
    # model_type "blip" also covers the VQA and retrieval heads, which have no captioning decoder to export.
    architectures = config.get("architectures") or ["BlipForConditionalGeneration"]
    return config.get("model_type") == "blip" and "BlipForConditionalGeneration" in architectures


def _is_blip_2(config: dict[str, Any]) -> bool:
    # model_type "blip-2" also covers retrieval and feature heads, which have no language model to export.
    architectures = config.get("architectures") or ["Blip2ForConditionalGeneration"]
    return (
        config.get("model_type") == "blip-2"
        and "Blip2ForConditionalGeneration" in architectures
        and _sub_type(config, "text_config") == "opt"
    )


def _is_pipeline(class_name: str) -> Callable[[dict[str, Any]], bool]:
    """Detector for a diffusers pipeline directory, whose model_index.json names the pipeline class."""
    return lambda config: config.get("_class_name") == class_name


@dataclass(frozen=True)
class Family:
    """One exportable model family."""

    name: str  # registry key, also written into the manifest
    description: str  # one line for `kiln families` and error messages
    task: str  # runtime task the artifact serves
    matches: Callable[[dict[str, Any]], bool]  # True when a config.json dict belongs to this family
    exporter: str  # module path of the exporter (imports torch)
    pipeline: str  # "module:Class" of the runtime pipeline (no torch)
    models: str = ""  # the checkpoints it covers, for the README's family table (markdown)
    components: str = ""  # the graphs its artifact holds, for the README's family table (markdown)

    def load_exporter(self):
        return importlib.import_module(self.exporter)

    def load_pipeline_class(self):
        module, _, name = self.pipeline.partition(":")
        return getattr(importlib.import_module(module), name)


FAMILIES: dict[str, Family] = {
    "vit-gpt2": Family(
        name="vit-gpt2",
        description="VisionEncoderDecoderModel with a ViT encoder and a GPT-2 decoder (image captioning)",
        task="image-to-text",
        matches=_is_vit_gpt2,
        exporter="modelkiln.exporters.vit_gpt2",
        pipeline="modelkiln.runtime.captioning:CaptioningPipeline",
        models="`VisionEncoderDecoderModel` with ViT + GPT-2 (`nlpconnect/vit-gpt2-image-captioning`)",
        components="encoder (image → cross-attention K/V), decoder (one step with KV cache)",
    ),
    "blip": Family(
        name="blip",
        description="BlipForConditionalGeneration: ViT vision model, BERT-style text decoder (captioning)",
        task="image-to-text",
        matches=_is_blip,
        exporter="modelkiln.exporters.blip",
        pipeline="modelkiln.runtime.blip:BlipCaptioningPipeline",
        models="`BlipForConditionalGeneration` (`Salesforce/blip-image-captioning-base`), optional text prompt",
        components="encoder (image → cross-attention K/V), decoder (BERT-style text decoder, one step with KV cache)",
    ),
    "blip-2": Family(
        name="blip-2",
        description="Blip2ForConditionalGeneration with an OPT language model (captioning and VQA)",
        task="image-to-text",
        matches=_is_blip_2,
        exporter="modelkiln.exporters.blip_2",
        pipeline="modelkiln.runtime.blip_2:Blip2CaptioningPipeline",
        models="`Blip2ForConditionalGeneration` with an OPT language model (`Salesforce/blip2-opt-2.7b`); captioning and VQA prompts",
        components="encoder (image → vision model, Q-Former, projection → query embeddings), decoder (OPT step with KV cache; query embeddings as prefix on the first step, tied embedding stored once)",
    ),
    "sd3": Family(
        name="sd3",
        description="StableDiffusion3Pipeline (SD3, SD3.5 large/medium/turbo): CLIP-L, CLIP-G, T5, MMDiT, VAE",
        task="text-to-image",
        matches=_is_pipeline("StableDiffusion3Pipeline"),
        exporter="modelkiln.exporters.sd3",
        pipeline="modelkiln.runtime.sd3:SD3Pipeline",
        models="`StableDiffusion3Pipeline` (SD3, SD3.5 large / large-turbo / medium with dual attention and qk-norm)",
        components="text_encoder, text_encoder_2 (CLIP-L/G: pooled + penultimate states), text_encoder_3 (T5, optional), transformer (MMDiT step), vae_decoder",
    ),
    "flux": Family(
        name="flux",
        description="FluxPipeline (FLUX.1-dev with guidance embedding, FLUX.1-schnell): CLIP-L, T5, DiT, VAE",
        task="text-to-image",
        matches=_is_pipeline("FluxPipeline"),
        exporter="modelkiln.exporters.flux",
        pipeline="modelkiln.runtime.flux:FluxPipeline",
        models="`FluxPipeline` (FLUX.1-dev with guidance embedding, FLUX.1-schnell)",
        components="text_encoder (CLIP-L pooled), text_encoder_2 (T5), transformer (packed latents, image/text ids, guidance), vae_decoder",
    ),
    "stable-diffusion": Family(
        name="stable-diffusion",
        description="StableDiffusionPipeline (SD 1.x, DreamBooth fine-tunes, LoRA fused): CLIP, UNet, VAE",
        task="text-to-image",
        matches=_is_pipeline("StableDiffusionPipeline"),
        exporter="modelkiln.exporters.stable_diffusion",
        pipeline="modelkiln.runtime.stable_diffusion:StableDiffusionPipeline",
        models="`StableDiffusionPipeline` (SD 1.x, DreamBooth fine-tunes; `--lora` fuses LoRAs)",
        components="text_encoder (CLIP), unet, vae_decoder",
    ),
}


def family_names() -> str:
    return ", ".join(sorted(FAMILIES))


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise UnsupportedModelError(
            f"unknown family {name!r}. Supported families: {family_names()}."
        ) from None


def detect_family(config: dict[str, Any], source: str = "the model") -> Family:
    """The family whose detector accepts this config.json dict."""
    found = [family for family in FAMILIES.values() if family.matches(config)]
    if not found:
        kind = config.get("model_type", "unknown")
        archs = ", ".join(config.get("architectures") or []) or "none listed"
        raise UnsupportedModelError(
            f"{source} (model_type {kind!r}, architectures: {archs}) is not a supported family. "
            f"Supported families: {family_names()}. If it is one of them under another name, "
            "force it with --family."
        )
    return found[0]
