"""Image captioning on ONNX Runtime: encoder once per image, then a cached decoder one token per step.

    pipe = modelkiln.runtime.load("out/vit-gpt2")
    pipe("cat.jpg", num_beams=4, max_new_tokens=16)   # [{"generated_text": "..."}]

Families with cross-attention decoders (ViT-GPT2) share this pipeline: the encoder graph returns one
tensor per decoder cross-attention input (same names on both graphs), and the decoder graph takes
``input_ids``, ``attention_mask``, ``position_ids`` and ``past_key_values.*`` and returns ``logits`` and
``present.*``. The KV cache stays in onnxruntime ``OrtValue``s between steps.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from modelkiln.errors import GenerationConfigError
from modelkiln.manifest import Manifest, TensorSpec

from .generation import GenerationSettings, generate
from .images import ImagePreprocessor, load_images
from .session import RuntimeOptions, create_session
from .text import TextCodec

PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."


def _ortvalue(array: np.ndarray) -> ort.OrtValue:
    # ortvalue_from_numpy shares memory with the array; contiguity is required for that.
    return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))


def position_ids(attention_mask: np.ndarray, new_tokens: int) -> np.ndarray:
    """Positions of the new tokens, counting only attended tokens (left padding gets no position)."""
    positions = np.cumsum(attention_mask, axis=1) - 1
    positions = np.where(attention_mask == 0, 1, positions)
    return positions[:, -new_tokens:].astype(np.int64)


class OrtCachedDecoder:
    """A ``StepDecoder`` over a decoder graph with a self-attention KV cache.

    ``static`` holds per-row inputs that never change during generation (cross-attention K/V).
    """

    def __init__(
        self, session: ort.InferenceSession, static: dict[str, np.ndarray], past_specs: list[TensorSpec]
    ):
        self.session = session
        self.output_names = [value.name for value in session.get_outputs()]
        # The exporter drops inputs a graph does not use (BLIP's text decoder derives positions itself).
        self.input_names = {value.name for value in session.get_inputs()}
        self._static_arrays = static
        self._past_specs = past_specs
        self.batch = next(iter(static.values())).shape[0]
        self._reset_cache()

    def _reset_cache(self) -> None:
        self.static = {name: _ortvalue(array) for name, array in self._static_arrays.items()}
        self.past = {spec.name: _ortvalue(self._empty_past(spec)) for spec in self._past_specs}

    def _empty_past(self, spec: TensorSpec) -> np.ndarray:
        # [batch, heads, 0, head_dim]: the first step attends to no past at all.
        shape = [
            self.batch if axis == 0 else (0 if isinstance(size, str) else size)
            for axis, size in enumerate(spec.shape)
        ]
        return np.zeros(shape, dtype=np.float32)

    def expand(self, n: int) -> None:
        self._static_arrays = {
            name: np.repeat(array, n, axis=0) for name, array in self._static_arrays.items()
        }
        self.batch *= n
        self._reset_cache()

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        feeds = {
            "input_ids": _ortvalue(input_ids.astype(np.int64)),
            "attention_mask": _ortvalue(attention_mask.astype(np.int64)),
            "position_ids": _ortvalue(position_ids(attention_mask, input_ids.shape[1])),
            **self.past,
            **self.static,
        }
        feeds = {name: value for name, value in feeds.items() if name in self.input_names}
        outputs = dict(
            zip(self.output_names, self.session.run_with_ort_values(self.output_names, feeds), strict=True)
        )
        self.past = {
            PAST_PREFIX + name[len(PRESENT_PREFIX) :]: value
            for name, value in outputs.items()
            if name.startswith(PRESENT_PREFIX)
        }
        return outputs["logits"].numpy()

    def reorder(self, beam_idx: np.ndarray) -> None:
        if np.array_equal(beam_idx, np.arange(self.batch)):
            return
        self.past = {
            name: _ortvalue(np.take(value.numpy(), beam_idx, axis=0)) for name, value in self.past.items()
        }


class CaptioningPipeline:
    """``pipe(images, **generation_options)`` -> captions, like transformers' image-to-text pipeline."""

    task = "image-to-text"

    def __init__(self, directory: Path, manifest: Manifest, options: RuntimeOptions):
        self.directory = directory
        self.manifest = manifest
        self.options = options
        # The encoder runs once per image, right before the decoder's first step: left spinning, its
        # idle threads took the cores that step needed (ViT-GPT2 on 2 cores: first step 69 -> 36 ms).
        self.sessions = {
            name: create_session(directory / spec.file, options, spinning=name != "encoder")
            for name, spec in manifest.components.items()
        }
        self.encoder = self.sessions["encoder"]
        self.decoder_session = self.sessions["decoder"]
        self.preprocess = ImagePreprocessor.from_config(self._json("preprocessor_config.json"))
        self.codec = TextCodec.from_dir(directory)
        self.generation_config = self._json("generation_config.json")
        decoder_inputs = manifest.components["decoder"].inputs
        self.past_specs = [spec for spec in decoder_inputs if spec.name.startswith(PAST_PREFIX)]
        self.encoder_outputs = [value.name for value in self.encoder.get_outputs()]

    def _json(self, name: str) -> dict[str, Any]:
        return json.loads((self.directory / name).read_text())

    def settings(self, prompt_length: int = 1, **overrides: Any) -> GenerationSettings:
        """Generation settings: the artifact's generation_config.json, then the caller's overrides."""
        config = self.generation_config
        settings = GenerationSettings.from_generation_config(config, prompt_length=prompt_length, **overrides)
        limit = self.manifest.runtime.get("max_positions")
        if limit is not None and prompt_length + settings.max_new_tokens > limit:
            raise GenerationConfigError(
                f"{prompt_length} prompt tokens plus max_new_tokens={settings.max_new_tokens} exceed the "
                f"decoder's {limit} positions. Ask for at most {limit - prompt_length} new tokens."
            )
        return settings

    def encode(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        """Run the encoder: per-image tensors the decoder reads at every step."""
        outputs = self.encoder.run(self.encoder_outputs, {"pixel_values": pixel_values})
        return dict(zip(self.encoder_outputs, outputs, strict=True))

    def make_decoder(self, pixel_values: np.ndarray):
        """The ``StepDecoder`` generation runs on: encoder outputs as its static inputs."""
        return OrtCachedDecoder(self.decoder_session, self.encode(pixel_values), self.past_specs)

    def prompt_ids(self, prompt: str | None, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """Decoder prompt ids and mask [batch, T]. Families that take a text prompt override this."""
        if prompt is not None:
            raise GenerationConfigError(
                f"family {self.manifest.family} does not take a text prompt; call the pipeline without "
                "prompt=."
            )
        start = self.manifest.runtime["decoder_start_token_id"]
        ids = np.full((batch, 1), start, dtype=np.int64)
        return ids, np.ones_like(ids)

    def texts(self, prompt_ids: np.ndarray, tokens: list[list[int]]) -> list[str]:
        """Captions from generated tokens; families whose transformers output includes the prompt override."""
        return self.codec.batch_decode(tokens)

    def generate_tokens(
        self, pixel_values: np.ndarray, prompt: str | None = None, **generation: Any
    ) -> tuple[np.ndarray, list[list[int]]]:
        """Prompt ids and generated tokens (without the prompt) for one batch of preprocessed images."""
        ids, mask = self.prompt_ids(prompt, pixel_values.shape[0])
        settings = self.settings(prompt_length=ids.shape[1], **generation)
        return ids, generate(self.make_decoder(pixel_values), ids, mask, settings)

    def __call__(
        self, images: Any, prompt: str | None = None, batch_size: int | None = None, **generation: Any
    ) -> list:
        """Caption one image or a list of them (paths, PIL images or numpy arrays).

        ``prompt`` conditions the caption on a text prefix (families that support it). Generation
        options (max_new_tokens, num_beams, do_sample, top_k, top_p, temperature, seed, length_penalty,
        early_stopping, ...) override the artifact's generation_config.json.
        """
        single = not isinstance(images, (list, tuple))
        pil_images = load_images(images)
        step = batch_size or len(pil_images)
        texts: list[str] = []
        for start in range(0, len(pil_images), step):
            pixel_values = self.preprocess(pil_images[start : start + step])
            ids, tokens = self.generate_tokens(pixel_values, prompt, **generation)
            texts += self.texts(ids, tokens)
        results = [[{"generated_text": text}] for text in texts]
        return results[0] if single else results
