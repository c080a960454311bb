"""What the diffusion families share: per-component loading, LoRA fusing, text-encoder and VAE graphs.

A diffusers pipeline directory holds one folder per component. ``PipelineModels`` loads them one at
a time, so an export's peak memory stays near its largest component rather than the whole pipeline;
only with ``--lora`` are the components a LoRA changes loaded together, to fuse it. Family files
(``sd3.py``, ``flux.py``, ``stable_diffusion.py``) declare a ``PipelineSpec`` and their denoiser::

    models = PipelineModels(source, sd3.PIPELINE, loras=[Lora.parse("style-lora:0.8")])
    encoder = models.module("text_encoder")      # fp32, eval, LoRA fused
    models.release("text_encoder")
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modelkiln.errors import SourceModelError
from modelkiln.exporters.onnx_export import Component
from modelkiln.exporters.source import Source
from modelkiln.manifest import CALIBRATION_PROMPTS_NAME, sha256_file

CLIP_LENGTH = 77  # CLIP's context length; every diffusers pipeline pads CLIP prompts to it
LORA_FILE = "pytorch_lora_weights.safetensors"  # the file save_lora_weights writes


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """transformers and diffusers draw a progress bar per loaded component, which buries the CLI's own
    lines; hide them for one block and restore whatever the caller had."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    modules = (diffusers_logging, transformers_logging)
    enabled = [module.is_progress_bar_enabled() for module in modules]
    for module in modules:
        module.disable_progress_bar()
    try:
        yield
    finally:
        for module, was_enabled in zip(modules, enabled, strict=True):
            if was_enabled:
                module.enable_progress_bar()


@dataclass(frozen=True)
class Lora:
    """One LoRA to fuse before export (``--lora PATH[:SCALE]``)."""

    path: Path  # a .safetensors file or a folder holding pytorch_lora_weights.safetensors
    scale: float = 1.0  # multiplier of the LoRA delta, as diffusers' fuse_lora(lora_scale=...)

    @classmethod
    def parse(cls, text: str) -> Lora:
        path, sep, scale = text.rpartition(":")
        if sep and path:
            try:
                return cls(Path(path), float(scale))
            except ValueError:
                pass  # a colon inside the path itself, not a scale
        return cls(Path(text))

    def weights_file(self) -> Path:
        file = self.path / LORA_FILE if self.path.is_dir() else self.path
        if not file.is_file() or file.suffix != ".safetensors":
            raise SourceModelError(
                f"--lora {self.path}: no LoRA weights there. Pass a .safetensors file or a folder with "
                f"{LORA_FILE} (what diffusers' save_lora_weights writes), optionally with :SCALE."
            )
        return file

    def describe(self) -> dict[str, Any]:
        file = self.weights_file()
        return {"path": str(self.path), "scale": self.scale, "sha256": sha256_file(file)}


@dataclass(frozen=True)
class PipelineSpec:
    """What a diffusion family's pipeline directory holds and how a LoRA applies to it."""

    pipeline_class: str  # diffusers pipeline class, as in model_index.json's _class_name
    denoiser: str  # folder of the denoising network: "transformer" or "unet"
    lora_targets: tuple[str, ...]  # components diffusers' load_lora_weights can change
    optional: tuple[
        str, ...
    ] = ()  # folders the pipeline runs without, dropped together (SD3's T5 + tokenizer)


def _check_without(without: tuple[str, ...], spec: PipelineSpec) -> tuple[str, ...]:
    for name in without:
        if name not in spec.optional:
            valid = ", ".join(spec.optional) or "none"
            raise SourceModelError(
                f"--without {name}: {spec.pipeline_class} cannot run without it. Optional components: {valid}."
            )
    # The optional folders go together: an encoder is never kept without its tokenizer, or the reverse.
    return spec.optional if without else ()


class PipelineModels:
    """The components of a diffusers pipeline directory, loaded in fp32 one at a time on request."""

    def __init__(
        self,
        source: Source,
        spec: PipelineSpec,
        loras: tuple[Lora, ...] = (),
        without: tuple[str, ...] = (),
        **options: Any,
    ):
        self.source = source
        self.spec = spec
        self.loras = tuple(loras)
        self.without = _check_without(without, spec)
        self.options = options  # family export options (e.g. max_sequence_length)
        self.index = source.config
        self._loaded: dict[str, nn.Module] = {}
        if self.index.get("_class_name") != spec.pipeline_class:
            raise SourceModelError(
                f"{source.path} holds a {self.index.get('_class_name')}, not a {spec.pipeline_class}. "
                "Pass that pipeline's directory, or force the matching family with --family."
            )
        if self.loras:
            self._fuse_loras()

    def has(self, name: str) -> bool:
        """Whether the source has this component and the export keeps it."""
        entry = self.index.get(name)
        present = isinstance(entry, list) and entry[0] is not None and (self.source.path / name).is_dir()
        return present and name not in self.without

    def config(self, name: str) -> dict[str, Any]:
        """A component's config.json, read without loading its weights."""
        return json.loads((self.source.path / name / "config.json").read_text())

    def module(self, name: str) -> nn.Module:
        if name not in self._loaded:
            self._loaded[name] = self._load(name)
        return self._loaded[name]

    def release(self, name: str) -> None:
        self._loaded.pop(name, None)
        gc.collect()

    def _load(self, name: str) -> nn.Module:
        if not self.has(name):
            raise SourceModelError(f"{self.source.path} has no {name} component, which this export needs.")
        library, class_name = self.index[name]
        model_class = getattr(importlib.import_module(library), class_name)
        with quiet_loading():
            model = model_class.from_pretrained(
                self.source.path / name, use_safetensors=not self.source.uses_pickle, dtype=torch.float32
            )
        return model.eval()

    def _fuse_loras(self) -> None:
        """Load the LoRA targets as one partial pipeline, fuse every LoRA at its scale, keep the modules."""
        import diffusers

        pipeline_class = getattr(diffusers, self.spec.pipeline_class)
        targets = [name for name in self.spec.lora_targets if self.has(name)]
        skipped = {name: None for name in self.index if not name.startswith("_") and name not in targets}
        skipped = {name: None for name in skipped if not name.startswith("tokenizer")}
        with quiet_loading():
            pipe = pipeline_class.from_pretrained(self.source.path, dtype=torch.float32, **skipped)
        names = [f"lora{i}" for i in range(len(self.loras))]
        for name, lora in zip(names, self.loras, strict=True):
            pipe.load_lora_weights(str(lora.weights_file()), adapter_name=name)
        # All at once: loading a LoRA into a model with one already fused unfuses that one first.
        pipe.set_adapters(names, adapter_weights=[lora.scale for lora in self.loras])
        pipe.fuse_lora(adapter_names=names, components=targets)
        # After fusing, the adapters' own layers are dead weight; the fused base weights remain.
        pipe.unload_lora_weights()
        self._loaded = {name: getattr(pipe, name).eval() for name in targets}

    def lora_record(self) -> list[dict[str, Any]]:
        return [lora.describe() for lora in self.loras]


class DenoiserCall(nn.Module):
    """One denoiser (SD3/Flux transformer) call: the graph's inputs, in order, passed by name; the
    predicted noise (the first output) returned.

    One wrapper for every family rather than one per signature: torch.export takes ``*inputs``
    positionally (onnx_export groups their dims to match) and ``names`` are the component's
    example-input names, which become the graph's input names. The attribute stays ``transformer``:
    parameter and node names, which the quantization recipes' patterns match, come from it.
    """

    def __init__(self, transformer: nn.Module, names: tuple[str, ...]):
        super().__init__()
        self.transformer = transformer
        self.names = names

    def forward(self, *inputs):
        return self.transformer(**dict(zip(self.names, inputs, strict=True)), return_dict=False)[0]


class ClipPooledAndPenultimate(nn.Module):
    """CLIP with projection (SD3): token ids -> projected pooled embedding and penultimate hidden states."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.encoder(input_ids, output_hidden_states=True)
        # SD3 conditions on the layer before the last (diffusers' clip_skip=None).
        return out.text_embeds, out.hidden_states[-2]


class ClipPooled(nn.Module):
    """CLIP text model (Flux): token ids -> pooled output at the end-of-text token."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids, output_hidden_states=False).pooler_output


class TextHiddenStates(nn.Module):
    """CLIP (SD 1.x) or T5 encoder: token ids -> last hidden states."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids)[0]


class VaeDecoder(nn.Module):
    """Scaled latents -> image in [-1, 1]; the family's scaling and shift are applied by the runtime."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents, return_dict=False)[0]


def _text_component(name: str, module: nn.Module, outputs: tuple[str, ...], length: int) -> Component:
    ids = torch.zeros(2, length, dtype=torch.int64)
    axes = {"input_ids": {0: "batch", 1: "sequence"}}
    axes.update({out: {0: "batch"} if "pooled" in out else {0: "batch", 1: "sequence"} for out in outputs})
    return Component(name, module, {"input_ids": ids}, outputs, axes)


def clip_component(name: str, encoder: nn.Module, kind: str) -> Component:
    """A CLIP text encoder graph: kind "pooled+penultimate" (SD3), "pooled" (Flux) or "hidden" (SD 1.x)."""
    wrappers = {
        "pooled+penultimate": (ClipPooledAndPenultimate, ("pooled_embeds", "hidden_states")),
        "pooled": (ClipPooled, ("pooled_embeds",)),
        "hidden": (TextHiddenStates, ("hidden_states",)),
    }
    wrapper, outputs = wrappers[kind]
    # Traced at the longest prompt it takes: CLIP's 77, or fewer for an encoder trained with a shorter
    # context (the shipped shapes pipeline: 12), which refuses a longer example.
    length = min(CLIP_LENGTH, encoder.config.max_position_embeddings)
    return _text_component(name, wrapper(encoder), outputs, length)


def t5_component(name: str, encoder: nn.Module, max_sequence_length: int) -> Component:
    return _text_component(name, TextHiddenStates(encoder), ("hidden_states",), max_sequence_length)


def vae_decoder_component(vae: nn.Module) -> Component:
    channels = vae.config.latent_channels
    axes = {
        "latents": {0: "batch", 2: "latent_height", 3: "latent_width"},
        "images": {0: "batch", 2: "height", 3: "width"},
    }
    # Unequal example sides keep the exporter from assuming square images.
    latents = torch.randn(1, channels, 8, 12)
    return Component("vae_decoder", VaeDecoder(vae), {"latents": latents}, ("images",), axes)


def vae_runtime_config(models: PipelineModels) -> dict[str, Any]:
    vae = models.config("vae")
    return {
        "vae_scale_factor": 2 ** (len(vae["block_out_channels"]) - 1),
        "latent_channels": vae["latent_channels"],
        "scaling_factor": vae["scaling_factor"],
        "shift_factor": vae.get("shift_factor") or 0.0,
    }


def save_pipeline_files(source: Source, directory: Path, without: tuple[str, ...] = ()) -> None:
    """Scheduler config, tokenizers and model_index.json: what makes the artifact self-contained."""
    shutil.copyfile(source.path / "model_index.json", directory / "model_index.json")
    for folder in sorted(p for p in source.path.iterdir() if p.is_dir()):
        wanted = folder.name == "scheduler" or folder.name.startswith("tokenizer")
        if wanted and folder.name not in without:
            shutil.copytree(folder, directory / folder.name)
    if not (directory / "scheduler").is_dir():
        raise SourceModelError(f"{source.path} has no scheduler folder; save the whole pipeline.")
    prompts = source.path / CALIBRATION_PROMPTS_NAME  # static quantization's default prompts, if any
    if prompts.is_file():
        shutil.copyfile(prompts, directory / CALIBRATION_PROMPTS_NAME)
