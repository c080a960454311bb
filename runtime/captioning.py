"""Image captioning on ONNX Runtime: encoder once per image, then a cached decoder one token per step.

    pipe = modelkiln.runtime.load("out/vit-gpt2")
    pipe("cat.jpg", num_beams=4, max_new_tokens=16)   # [{"generated_text": "..."}]

Families with cross-attention decoders (ViT-GPT2) share this pipeline: the encoder graph returns one
tensor per decoder cross-attention input (same names on both graphs), and the decoder graph takes
``input_ids``, ``attention_mask``, ``position_ids`` and ``past_key_values.*`` and returns ``logits`` and
``present.*``. The KV cache is a buffer per layer allocated once per request and written in place by
the graph (onnxruntime target), or a past the graph lengthens every step (portable target).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from modelkiln.errors import GenerationConfigError
from modelkiln.manifest import CAPACITY_AXIS, Manifest, TensorSpec

from .generation import GenerationSettings, generate
from .images import ImagePreprocessor, load_images
from .session import RuntimeOptions, create_session
from .text import TextCodec

PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."
CAPACITY_ROUNDING = 16  # cache buffers hold a multiple of this many positions


def _ortvalue(array: np.ndarray) -> ort.OrtValue:
    # ortvalue_from_numpy shares memory with the array; contiguity is required for that.
    return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))


def position_ids(attention_mask: np.ndarray, new_tokens: int) -> np.ndarray:
    """Positions of the new tokens, counting only attended tokens (left padding gets no position)."""
    positions = np.cumsum(attention_mask, axis=1) - 1
    positions = np.where(attention_mask == 0, 1, positions)
    return positions[:, -new_tokens:].astype(np.int64)


class GrowingCache:
    """A past that grows: each step's ``present.*`` outputs are the next step's ``past_key_values.*``
    inputs, one position longer (graphs of the portable and tensorrt targets)."""

    def __init__(self, specs: list[TensorSpec]):
        self.specs = specs  # the decoder's past inputs [batch, heads, past, head_dim]

    def reset(self, batch: int) -> None:
        # [batch, heads, 0, head_dim]: the first step attends to no past at all.
        self.past = {
            spec.name: _ortvalue(np.zeros(_cache_shape(spec, batch, 0), np.float32)) for spec in self.specs
        }

    def inputs(self, total: int) -> dict[str, ort.OrtValue]:
        return self.past

    def bound(self) -> dict[str, ort.OrtValue] | None:
        return None

    def update(self, outputs: dict[str, ort.OrtValue], total: int) -> None:
        self.past = {
            PAST_PREFIX + name[len(PRESENT_PREFIX) :]: value
            for name, value in outputs.items()
            if name.startswith(PRESENT_PREFIX)
        }

    def reorder(self, beam_idx: np.ndarray) -> None:
        self.past = {
            name: _ortvalue(np.take(value.numpy(), beam_idx, axis=0)) for name, value in self.past.items()
        }


class BufferCache:
    """Buffers of ``capacity`` positions allocated once per request and bound as both the past input and
    the present output (onnxruntime-target graphs): the graph writes each step's keys and values in place
    and attends to the filled positions, so nothing is concatenated or copied between steps."""

    def __init__(self, specs: list[TensorSpec], capacity: int, device: str):
        self.specs = specs  # the decoder's past inputs [batch, heads, capacity, head_dim]
        self.capacity = capacity  # positions per buffer: the prompt plus every token generation may add
        self.device = device  # where the buffers live: "cpu", or "cuda" for the CUDA backend

    def reset(self, batch: int) -> None:
        arrays = [np.zeros(_cache_shape(spec, batch, self.capacity), np.float32) for spec in self.specs]
        # On the CPU, ortvalue_from_numpy shares the array's memory; on CUDA it copies it to the device.
        self.values = {
            spec.name: ort.OrtValue.ortvalue_from_numpy(array, self.device, 0)
            for spec, array in zip(self.specs, arrays, strict=True)
        }
        self.arrays = dict(zip(self.values, arrays, strict=True)) if self.device == "cpu" else {}
        # The same values again, under the output names the graph writes them to.
        self.outputs = {
            PRESENT_PREFIX + name[len(PAST_PREFIX) :]: value for name, value in self.values.items()
        }
        self.filled = 0

    def inputs(self, total: int) -> dict[str, ort.OrtValue]:
        if total > self.capacity:
            raise ValueError(
                f"the step needs {total} cache positions but the buffers hold {self.capacity}: make the "
                "decoder with a capacity of at least the prompt length plus max_new_tokens."
            )
        return self.values

    def bound(self) -> dict[str, ort.OrtValue]:
        return self.outputs

    def update(self, outputs: dict[str, ort.OrtValue], total: int) -> None:
        self.filled = total

    def reorder(self, beam_idx: np.ndarray) -> None:
        # Only rows whose beam changed are rewritten, and only their filled positions.
        moved = np.flatnonzero(beam_idx != np.arange(len(beam_idx)))
        for name, value in self.values.items():
            if self.device == "cpu":
                _copy_rows(self.arrays[name], beam_idx, moved, self.filled)
            else:  # a round trip through the host, on beam reorders only
                host = value.numpy()
                _copy_rows(host, beam_idx, moved, self.filled)
                value.update_inplace(host)


def _copy_rows(array: np.ndarray, beam_idx: np.ndarray, moved: np.ndarray, filled: int) -> None:
    # The fancy index on the right copies the source rows first, so a row may feed another and be
    # overwritten in the same call.
    array[moved, :, :filled] = array[beam_idx[moved], :, :filled]


def _cache_shape(spec: TensorSpec, batch: int, length: int) -> list[int]:
    """[batch, heads, length, head_dim] for a past input whose batch and length axes are symbolic."""
    return [batch if axis == 0 else (length if axis == 2 else size) for axis, size in enumerate(spec.shape)]


def is_buffered(past_specs: list[TensorSpec]) -> bool:
    """Whether the decoder keeps its cache in a buffer (the axis its exporter names ``capacity``)."""
    return bool(past_specs) and past_specs[0].shape[2] == CAPACITY_AXIS


class OrtCachedDecoder:
    """A ``StepDecoder`` over a decoder graph with a self-attention KV cache (a ``BufferCache`` or a
    ``GrowingCache``, whichever form the graph was exported in).

    ``static`` holds per-row inputs that never change during generation (cross-attention K/V).
    """

    def __init__(self, session, static: dict[str, np.ndarray], cache: BufferCache | GrowingCache):
        self.session = session
        self.output_names = [value.name for value in session.get_outputs()]
        # The exporter drops inputs a graph does not use (BLIP's text decoder derives positions itself).
        self.input_names = {value.name for value in session.get_inputs()}
        self._static_arrays = static
        self.cache = cache
        self.batch = next(iter(static.values())).shape[0]
        self._reset_cache()

    def _reset_cache(self) -> None:
        self.static = {name: _ortvalue(array) for name, array in self._static_arrays.items()}
        self.cache.reset(self.batch)

    def expand(self, n: int) -> None:
        self._static_arrays = {
            name: np.repeat(array, n, axis=0) for name, array in self._static_arrays.items()
        }
        self.batch *= n
        self._reset_cache()

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        total = attention_mask.shape[1]
        feeds = {
            "input_ids": _ortvalue(input_ids.astype(np.int64)),
            "attention_mask": _ortvalue(attention_mask.astype(np.int64)),
            "position_ids": _ortvalue(position_ids(attention_mask, input_ids.shape[1])),
            **self.cache.inputs(total),
            **self.static,
        }
        feeds = {name: value for name, value in feeds.items() if name in self.input_names}
        values = self.session.run_with_ort_values(self.output_names, feeds, self.cache.bound())
        outputs = dict(zip(self.output_names, values, strict=True))
        self.cache.update(outputs, total)
        return outputs["logits"].numpy()

    def reorder(self, beam_idx: np.ndarray) -> None:
        if not np.array_equal(beam_idx, np.arange(self.batch)):
            self.cache.reorder(beam_idx)


def cache_for(past_specs: list[TensorSpec], capacity: int, device: str) -> BufferCache | GrowingCache:
    """The cache a decoder graph takes: buffers of ``capacity`` positions on ``device``, or a growing past."""
    return BufferCache(past_specs, capacity, device) if is_buffered(past_specs) else GrowingCache(past_specs)


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

    def make_decoder(self, pixel_values: np.ndarray, capacity: int):
        """The ``StepDecoder`` generation runs on: encoder outputs as its static inputs, a cache with room
        for ``capacity`` positions (prompt plus new tokens)."""
        return OrtCachedDecoder(self.decoder_session, self.encode(pixel_values), self.cache(capacity))

    def cache(self, capacity: int) -> BufferCache | GrowingCache:
        # Rounded up, so requests of nearby lengths allocate buffers of one size.
        rounded = -(-capacity // CAPACITY_ROUNDING) * CAPACITY_ROUNDING
        return cache_for(self.past_specs, rounded, "cuda" if self.options.backend == "cuda" else "cpu")

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
        decoder = self.make_decoder(pixel_values, ids.shape[1] + settings.max_new_tokens)
        return ids, generate(decoder, ids, mask, settings)

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
