"""The family registry: one declaration per model family, read by everything that handles a family.

``FAMILIES`` is a plain dict from family name to ``Family``, which declares how a family is detected,
exported, run (ONNX and torch), quantized and benchmarked. This module is the base layer: code of the
layers above (exporters, runtimes, benchmarks) is named by "module:attr" import path and loaded lazily,
so running an artifact never imports the exporters (and with them, torch)::

    family = get_family("vit-gpt2")
    family = detect_family(config_dict)            # from a model's config.json
    exporter = family.load_exporter()              # an exporters.protocol.FamilyExporter module
    family.quantize_recipes["int8-dynamic"]        # the graphs a scheme quantizes by default

Adding a family is one ``Family`` entry below plus the files it names (exporter, runtime pipeline).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from modelkiln.errors import KilnError, UnsupportedModelError


def load_attr(path: str) -> Any:
    """The object a "module:attr" import path names, imported now (the registry itself imports nothing)."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


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
class TorchCaptioner:
    """How a captioner's save_pretrained checkpoint runs in transformers (bitsandbytes variants)."""

    model_class: str  # transformers class that loads the checkpoint (bnb quantizes while loading)
    # "module:function" (ids, mask, manifest) -> generate's prompt arguments: each family's generate
    # takes the prompt ids under its own names and framing.
    prompt_inputs: str
    # generate arguments the family's own generate sets itself: passing them again is an error there.
    set_by_model: tuple[str, ...] = ()
    # "module:function" family name -> the torch pipeline class; imports torch, so only torch artifacts call it.
    runtime: str = "modelkiln.runtime.torch_captioning:torch_pipeline_class"


@dataclass(frozen=True)
class TorchDiffusion:
    """How a diffusion family's pipeline directory loads and runs in diffusers (bitsandbytes variants)."""

    pipeline_class: str  # diffusers pipeline class, as the directory's model_index.json names it
    denoiser: str  # component holding the denoising network (the default to quantize)
    text_encoders: tuple[str, ...]  # text encoder components, which may be quantized as well
    # Components loaded as None: the ONNX runtime runs without them too (IP-Adapter image encoders,
    # SD 1.x's safety checker), so both runtimes make the same image from the same latents.
    dropped: tuple[str, ...] = ()
    # "module:function" family name -> the torch pipeline class; imports torch, so only torch artifacts call it.
    runtime: str = "modelkiln.runtime.torch_diffusion:torch_pipeline_class"


@dataclass(frozen=True)
class BenchSupport:
    """How `kiln bench` benchmarks a family; a family without one is refused by name."""

    task: str  # key of benchmarks.tasks.BENCH_TASKS: the benchmark that runs this family's sources
    presets: tuple[str, ...] = ()  # --preset names that build a random-weight source of this family
    # "module:attr" of the dict preset name -> preset (a frozen dataclass whose save(directory) writes the
    # source); its keys are ``presets``. "" when the family has none.
    preset_table: str = ""
    # "module:function" counting the FLOPs of one denoiser call, for the roofline row; "" gives no row.
    step_flops: str = ""
    # Denoiser batch when guidance_scale > 1: 2 for classifier-free guidance (negative and positive
    # prompt); 1 where guidance is an embedding input (FLUX.1-dev's distilled guidance).
    guided_batch: int = 2
    # CLIP tokens the denoiser attends to beside T5's: 77 (SD3, SD 1.x); 0 for Flux, whose CLIP gives
    # only the pooled vector.
    clip_tokens: int = 77
    # Torch modules of the eager captioner timed as each stage (stage -> attribute names on the model);
    # the decoder's module is called once per token by generate.
    eager_stages: tuple[tuple[str, tuple[str, ...]], ...] = (
        ("encoder", ("encoder",)),
        ("decoder", ("decoder",)),
    )


@dataclass(frozen=True)
class Family:
    """One exportable model family: everything the other layers need to know about it."""

    name: str  # registry key, also written into the manifest
    description: str  # one line for `kiln families` and error messages
    task: str  # runtime task the artifact serves
    matches: Callable[[dict[str, Any]], bool]  # True when a config.json dict belongs to this family
    exporter: str  # module path of the exporter, an exporters.protocol.FamilyExporter (imports torch)
    pipeline: str  # "module:Class" of the runtime pipeline (no torch)
    models: str = ""  # the checkpoints it covers, for the README's family table (markdown)
    components: str = ""  # the graphs its artifact holds, for the README's family table (markdown)
    # ExportConfig fields beyond the common ones that this family's load_model accepts; any other set
    # option is an error at export, never silently ignored.
    export_options: tuple[str, ...] = ()
    # Scheme -> the graphs it quantizes by default (`kiln quantize --components` overrides); a scheme
    # without an entry quantizes every graph of the artifact.
    quantize_recipes: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # Graph (or torch component) -> fnmatch patterns of node/module names kept fp32 when it is quantized.
    quantize_exclude: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # The PyTorch side of torch (bitsandbytes) artifacts; None: only ONNX schemes apply to this family.
    torch_runtime: TorchCaptioner | TorchDiffusion | None = None
    bench: BenchSupport | None = None  # None: `kiln bench` refuses this family
    # TensorRT optimization-profile ranges (engines and the TensorRT execution provider): a dynamic axis
    # as the manifest's shapes name it, or "component:axis" for one graph, -> (min, opt, max). A size is
    # an int or an expression over the manifest's runtime config ("77 + max_sequence_length").
    profile_ranges: dict[str, tuple[int | str, int | str, int | str]] = field(default_factory=dict)

    def load_exporter(self):
        return importlib.import_module(self.exporter)

    def load_pipeline_class(self):
        return load_attr(self.pipeline)


# Default recipe of the encoder + cached-decoder captioners: every ONNX scheme takes both graphs.
# ViT-GPT2 and BLIP: both graphs are mostly weight matmuls; the encoder is compute-bound (int8 GEMM is
# ~2x fp32 here) and the decoder bandwidth-bound per token (fewer weight bytes per step), so both gain
# from every scheme; int4 on the encoder saves bytes (the size target) rather than time. BLIP-2: the OPT
# decoder holds most of the weights and is bandwidth-bound per token; the vision graph (ViT-g,
# Q-Former) is compute-bound; int4 on it saves bytes.
_CAPTIONER_RECIPE: dict[str, tuple[str, ...]] = {
    scheme: ("encoder", "decoder") for scheme in ("int8-dynamic", "int8-static", "int4-weight", "fp16")
}
_CAPTION_PRESETS = "modelkiln.benchmarks.captioning"  # where the captioners' preset tables live
_IMAGE_PRESETS = "modelkiln.benchmarks.text_to_image"  # where the diffusion families' preset tables live
_TORCH_CAPTIONING = "modelkiln.runtime.torch_captioning"  # where the captioners' prompt_inputs live
# Captioner profiles: up to 4 images x 4 beams, prompts up to 32 tokens on the first step, then one
# token a step over a cache that grows to the decoder's positions (total = past + new tokens).
_CAPTIONER_PROFILES: dict[str, tuple[int | str, int | str, int | str]] = {
    "batch": (1, 1, 16),
    "sequence": (1, 1, 32),
    "past_sequence": (0, "max_positions // 2", "max_positions"),
    "total_sequence": (1, "max_positions // 2 + 1", "max_positions + 32"),
}
# Denoiser and VAE latents from half to one and a half times the model's default side (SD3.5 and Flux:
# 512 to 1536 px, SD 1.x: 256 to 768 px); classifier-free guidance doubles the batch.
_LATENT_PROFILES: dict[str, tuple[int | str, int | str, int | str]] = {
    "batch": (1, 2, 8),
    "latent_height": ("default_sample_size // 2", "default_sample_size", "default_sample_size * 3 // 2"),
    "latent_width": ("default_sample_size // 2", "default_sample_size", "default_sample_size * 3 // 2"),
}


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
        quantize_recipes=_CAPTIONER_RECIPE,
        torch_runtime=TorchCaptioner("VisionEncoderDecoderModel", f"{_TORCH_CAPTIONING}:decoder_inputs"),
        bench=BenchSupport(
            task="image-to-text", presets=("tiny", "full"), preset_table=f"{_CAPTION_PRESETS}.presets:PRESETS"
        ),
        profile_ranges=_CAPTIONER_PROFILES,
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
        quantize_recipes=_CAPTIONER_RECIPE,
        # BLIP's generate passes [SEP] as EOS and its own pad id.
        torch_runtime=TorchCaptioner(
            "BlipForConditionalGeneration",
            f"{_TORCH_CAPTIONING}:blip_inputs",
            set_by_model=("eos_token_id", "pad_token_id"),
        ),
        bench=BenchSupport(
            task="image-to-text",
            presets=("tiny", "full"),
            preset_table=f"{_CAPTION_PRESETS}.blip_presets:BLIP_PRESETS",
            eager_stages=(("encoder", ("vision_model",)), ("decoder", ("text_decoder",))),
        ),
        profile_ranges=_CAPTIONER_PROFILES,
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
        quantize_recipes=_CAPTIONER_RECIPE,
        torch_runtime=TorchCaptioner("Blip2ForConditionalGeneration", f"{_TORCH_CAPTIONING}:text_inputs"),
        bench=BenchSupport(
            task="image-to-text",
            presets=("tiny", "full"),
            preset_table=f"{_CAPTION_PRESETS}.blip_presets:BLIP_2_PRESETS",
            # The encoder graph is vision model, Q-Former and projection; OPT runs once per token.
            eager_stages=(
                ("encoder", ("vision_model", "qformer", "language_projection")),
                ("decoder", ("language_model",)),
            ),
        ),
        # The query embeddings are a prefix on the first step only.
        profile_ranges={
            **_CAPTIONER_PROFILES,
            "prefix_sequence": (0, 0, "num_query_tokens"),
            "total_sequence": (1, "max_positions // 2 + 1", "max_positions + num_query_tokens + 32"),
        },
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
        export_options=("lora", "max_sequence_length", "without"),
        # The transformer is where the time goes; text encoders take weight-only schemes; the VAE decoder
        # stays fp32 (its convolutions are sensitive and a small share of the time).
        quantize_recipes={
            "int8-dynamic": ("transformer",),
            "int8-static": ("transformer",),
            "int4-weight": ("text_encoder", "text_encoder_2", "text_encoder_3", "transformer"),
            "fp16": ("text_encoder", "text_encoder_2", "text_encoder_3", "transformer"),
        },
        # The timestep/text embedders and the context embedder set the conditioning every block reads,
        # and the final norm and projection write the output directly: under 3% of SD3.5-Medium's weights.
        quantize_exclude={
            "transformer": (
                "*time_text_embed*",
                "*context_embedder*",
                "*pos_embed*",
                "*norm_out*",
                "*proj_out*",
            ),
        },
        torch_runtime=TorchDiffusion(
            "StableDiffusion3Pipeline",
            "transformer",
            ("text_encoder", "text_encoder_2", "text_encoder_3"),
            dropped=("image_encoder", "feature_extractor"),
        ),
        bench=BenchSupport(
            task="text-to-image",
            presets=("tiny", "full"),
            preset_table=f"{_IMAGE_PRESETS}.presets:DIFFUSION_PRESETS",
            step_flops=f"{_IMAGE_PRESETS}.roofline:sd3_step_flops",
        ),
        # CLIP prompts are padded to 77 tokens, T5's to the artifact's length; the transformer reads both.
        profile_ranges={
            **_LATENT_PROFILES,
            "text_encoder:sequence": (77, 77, 77),
            "text_encoder_2:sequence": (77, 77, 77),
            "text_encoder_3:sequence": ("max_sequence_length",) * 3,
            "text_sequence": ("77 + max_sequence_length",) * 3,
        },
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
        export_options=("lora", "max_sequence_length"),
        # As for SD3: the transformer for int8, the text encoders too for weight-only schemes.
        quantize_recipes={
            "int8-dynamic": ("transformer",),
            "int8-static": ("transformer",),
            "int4-weight": ("text_encoder", "text_encoder_2", "transformer"),
            "fp16": ("text_encoder", "text_encoder_2", "transformer"),
        },
        # The embedders of latents, text, timestep and guidance set what every block reads, and the
        # final norm and projection write the output directly. Only the final projection: each single
        # block has a proj_out too (its attention + MLP output, ~40% of the block's linear FLOPs).
        quantize_exclude={
            "transformer": (
                "*x_embedder*",
                "*context_embedder*",
                "*time_text_embed*",
                "*norm_out*",
                "*transformer.proj_out",
                "proj_out",
            ),
        },
        torch_runtime=TorchDiffusion(
            "FluxPipeline",
            "transformer",
            ("text_encoder", "text_encoder_2"),
            dropped=("image_encoder", "feature_extractor"),
        ),
        # full/tiny: FLUX.1-dev (guidance embedding); the -schnell ones: FLUX.1-schnell (none).
        bench=BenchSupport(
            task="text-to-image",
            presets=("tiny", "tiny-schnell", "full", "full-schnell"),
            preset_table=f"{_IMAGE_PRESETS}.flux_presets:FLUX_PRESETS",
            step_flops=f"{_IMAGE_PRESETS}.roofline:flux_step_flops",
            guided_batch=1,
            clip_tokens=0,
        ),
        # Guidance is an input, not a second batch; the transformer sees 2x2 latent patches as one token.
        profile_ranges={
            **_LATENT_PROFILES,
            "batch": (1, 1, 4),
            "image_sequence": (
                "default_sample_size * default_sample_size // 16",
                "default_sample_size * default_sample_size // 4",
                "default_sample_size * default_sample_size * 9 // 16",
            ),
            "text_encoder:sequence": (77, 77, 77),
            "text_encoder_2:sequence": ("max_sequence_length",) * 3,
            "text_sequence": ("max_sequence_length",) * 3,
        },
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
        export_options=("lora",),
        # The UNet is where the time goes; the text encoder takes weight-only schemes; the VAE decoder
        # stays fp32.
        quantize_recipes={
            "int8-dynamic": ("unet",),
            "int8-static": ("unet",),
            "int4-weight": ("text_encoder",),
            "fp16": ("text_encoder", "unet"),
        },
        # The timestep embedding MLP conditions every ResNet block; the first and last convolutions read
        # and write the latents directly (4 channels: a tiny share of the FLOPs).
        quantize_exclude={"unet": ("*time_embedding*", "*conv_in", "*conv_out")},
        torch_runtime=TorchDiffusion(
            "StableDiffusionPipeline",
            "unet",
            ("text_encoder",),
            dropped=("safety_checker", "feature_extractor"),
        ),
        bench=BenchSupport(
            task="text-to-image",
            presets=("tiny", "full"),
            preset_table=f"{_IMAGE_PRESETS}.sd1_presets:SD1_PRESETS",
            step_flops=f"{_IMAGE_PRESETS}.roofline:unet_step_flops",
        ),
        profile_ranges={**_LATENT_PROFILES, "sequence": (77, 77, 77), "text_sequence": (77, 77, 77)},
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


def declared_torch_runtime(family: str, kind: type, what: str, instead: str) -> Any:
    """The family's torch runtime declaration of this kind (TorchCaptioner, TorchDiffusion), or an error
    naming the families that have one and the ONNX schemes to use ``instead``."""
    declared = get_family(family).torch_runtime
    if not isinstance(declared, kind):
        supported = [name for name, f in FAMILIES.items() if isinstance(f.torch_runtime, kind)]
        raise KilnError(
            f"family {family} has no PyTorch (bitsandbytes) {what}; supported: {', '.join(supported)}. "
            f"Use an ONNX scheme ({instead}) instead."
        )
    return declared


def bench_families(task: str) -> tuple[str, ...]:
    """The families `kiln bench` runs with its ``task`` benchmark (BenchSupport.task)."""
    return tuple(name for name, family in FAMILIES.items() if family.bench and family.bench.task == task)


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
