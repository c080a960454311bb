"""Image captioning of ``torch`` artifacts: a save_pretrained model (bitsandbytes) run with transformers.

    pipe = modelkiln.runtime.load("out/vit-gpt2-nf4")   # manifest kind "torch" lands here
    pipe("cat.jpg", num_beams=4)                         # [{"generated_text": "..."}]

Same public API as :class:`~modelkiln.runtime.captioning.CaptioningPipeline` (the ONNX runtime), and
the same image preprocessing, tokenizer decoding and generation-setting checks, so quality code and
validation treat both alike; only the token loop is transformers ``generate``. Imports torch, so
``runtime.load`` imports this module only for torch artifacts.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from modelkiln.errors import KilnError
from modelkiln.manifest import Manifest
from modelkiln.registry import TorchCaptioner, declared_torch_runtime, get_family, load_attr

from .captioning import CaptioningPipeline
from .generation import GenerationSettings
from .images import ImagePreprocessor
from .session import RuntimeOptions
from .text import TextCodec


# How each family's generate takes the prompt ids (its registry entry's TorchCaptioner.prompt_inputs
# names one). Prompt ids and caption texts come from the family's ONNX pipeline class, shared with this one.
def decoder_inputs(ids, mask, manifest: Manifest) -> dict[str, Any]:
    # VisionEncoderDecoderModel: the prompt is the decoder's own input.
    return {"decoder_input_ids": ids, "decoder_attention_mask": mask}


def blip_inputs(ids, mask, manifest: Manifest) -> dict[str, Any]:
    # BLIP's generate swaps the first token for [DEC] and drops the last ([SEP]), so hand it the
    # prompt as its processor writes it: [DEC] + words + [SEP].
    sep = np.full((ids.shape[0], 1), manifest.runtime["sep_token_id"], dtype=ids.dtype)
    return {
        "input_ids": np.concatenate([ids, sep], axis=1),
        "attention_mask": np.concatenate([mask, mask[:, :1]], 1),
    }


def text_inputs(ids, mask, manifest: Manifest) -> dict[str, Any]:
    # BLIP-2: the family's prompt ids are exactly the processor's (image tokens, BOS, words).
    return {"input_ids": ids, "attention_mask": mask}


# Token ids generate needs to start decoding; every other setting comes from settings().
_START_TOKEN_KEYS = ("decoder_start_token_id", "bos_token_id")


def torch_captioner(family: str) -> TorchCaptioner:
    """The family's transformers declaration, or an error naming the families that have one."""
    return declared_torch_runtime(family, TorchCaptioner, "runtime yet", "int8-dynamic, int4-weight")


def model_class(family: str):
    """The transformers class that loads this family's checkpoint, or an error naming the supported ones."""
    return load_attr(f"transformers:{torch_captioner(family).model_class}")


def _generate_kwargs(settings: GenerationSettings) -> dict[str, Any]:
    """transformers ``generate`` arguments that decode exactly as ``settings`` says."""
    kwargs: dict[str, Any] = {
        "max_new_tokens": settings.max_new_tokens,
        "min_new_tokens": settings.min_new_tokens,
        "num_beams": settings.num_beams,
        "length_penalty": settings.length_penalty,
        "early_stopping": settings.early_stopping,
        "do_sample": settings.do_sample,
        "repetition_penalty": settings.repetition_penalty,
        "no_repeat_ngram_size": settings.no_repeat_ngram_size,
        "eos_token_id": list(settings.eos_token_ids) or None,
        "pad_token_id": settings.pad_token_id,
    }
    if settings.do_sample:
        # Passed only when sampling: transformers warns about sampling settings on greedy runs.
        kwargs.update(temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p)
    return kwargs


def _trim(row: list[int], eos_ids: tuple[int, ...]) -> list[int]:
    """Generated tokens up to and including the first EOS: what the ONNX runtime returns (no padding)."""
    for index, token in enumerate(row):
        if token in eos_ids:
            return row[: index + 1]
    return row


class TorchCaptioningPipeline(CaptioningPipeline):
    """``pipe(images, **generation_options)`` -> captions, from a bitsandbytes save_pretrained model."""

    def __init__(self, directory: Path, manifest: Manifest, options: RuntimeOptions):
        import torch
        from transformers import GenerationConfig

        if options.backend != "cpu":
            raise KilnError(
                f"torch artifacts run on the cpu backend here, not {options.backend!r}. Pass backend='cpu' "
                "(--backend cpu), or use an ONNX variant for GPU backends."
            )
        if options.threads is not None:
            torch.set_num_threads(options.threads)  # process-wide in torch: there is no per-model setting
        self.directory = directory
        self.manifest = manifest
        self.options = options
        # The checkpoint's config.json carries its quantization_config, so this reloads the bnb layers.
        loader = model_class(manifest.family)
        self.model = loader.from_pretrained(directory, use_safetensors=True, dtype=torch.float32).eval()
        self.preprocess = ImagePreprocessor.from_config(self._json("preprocessor_config.json"))
        self.codec = TextCodec.from_dir(directory)
        self.generation_config = self._json("generation_config.json")
        # settings() resolves generation_config.json and generate gets every value explicitly, so only the
        # start-token ids stay: the checkpoint's defaults (max_length) must not be merged in a second time.
        self.model.generation_config = GenerationConfig(
            **{key: self.generation_config.get(key) for key in _START_TOKEN_KEYS}
        )

    def _generate_kwargs(self, settings: GenerationSettings) -> dict[str, Any]:
        fixed = torch_captioner(self.manifest.family).set_by_model
        return {key: value for key, value in _generate_kwargs(settings).items() if key not in fixed}

    def generate_tokens(
        self, pixel_values: np.ndarray, prompt: str | None = None, **generation: Any
    ) -> tuple[np.ndarray, list[list[int]]]:
        """Prompt ids and generated tokens (without the prompt) for one batch of preprocessed images."""
        import torch

        ids, mask = self.prompt_ids(prompt, pixel_values.shape[0])
        settings = self.settings(prompt_length=ids.shape[1], **generation)
        if settings.do_sample and settings.seed is not None:
            # Seeded like the ONNX runtime, but torch's generator draws other samples than numpy's.
            torch.manual_seed(settings.seed)
        with torch.no_grad(), warnings.catch_warnings():
            # bitsandbytes' CPU int8 kernel says on every call that it casts inputs to fp16: expected here.
            warnings.filterwarnings(
                "ignore", message="MatMul8bitLt: inputs will be cast", category=UserWarning
            )
            inputs = load_attr(torch_captioner(self.manifest.family).prompt_inputs)
            prompt_inputs = inputs(ids, mask, self.manifest)
            sequences = self.model.generate(
                pixel_values=torch.from_numpy(np.ascontiguousarray(pixel_values)),
                **{name: torch.from_numpy(value) for name, value in prompt_inputs.items()},
                **self._generate_kwargs(settings),
            )
        # Every family's generate returns the prompt (as passed, less BLIP's [SEP]) before the new tokens.
        rows = [[int(t) for t in row[ids.shape[1] :]] for row in sequences]
        return ids, [_trim(row, settings.eos_token_ids) for row in rows]


def torch_pipeline_class(family: str) -> type:
    """TorchCaptioningPipeline with the family's prompt handling (its ONNX pipeline's prompt_ids, texts)."""
    torch_captioner(family)  # a clear error for families without a torch runtime
    family_class = get_family(family).load_pipeline_class()
    if family_class is CaptioningPipeline:
        return TorchCaptioningPipeline
    return type(f"Torch{family_class.__name__}", (TorchCaptioningPipeline, family_class), {})
