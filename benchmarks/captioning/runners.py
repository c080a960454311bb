"""One captioning job (preprocess, encode, decode, detokenize) per image, timed stage by stage.

    runner = OrtRunner(Path("out/vit-gpt2-int8"), threads=2, max_new_tokens=16)
    runner = EagerRunner("nlpconnect/vit-gpt2-image-captioning", threads=2, max_new_tokens=16)
    job = runner.run(image)   # Job(tokens, text, total_s, stages={"preprocess": s, "encoder": s, ...})

Both decode greedily with ``min_new_tokens = max_new_tokens``, so every variant decodes exactly the
same number of tokens. ONNX stages come from wrapping the run calls of ``pipe.sessions``; PyTorch
stages from forward hooks on the modules the family declares (``BenchSupport.eager_stages``: ViT-GPT2's
``encoder`` and ``decoder``, BLIP's ``vision_model`` and ``text_decoder``, ...; one decoder call per token).
Nothing here imports torch unless an ``EagerRunner`` is made.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelkiln import runtime
from modelkiln.exporters.source import resolve_source
from modelkiln.registry import detect_family
from modelkiln.runtime.text import TextCodec

from ..core.timing import hook_calls, timed_calls


@dataclass(frozen=True)
class Job:
    """What one image's captioning produced and how long each part took."""

    tokens: list[int]  # generated tokens, without the start token
    text: str  # decoded caption
    total_s: float  # wall time of the whole job, preprocessing included
    stages: dict[str, float] = field(
        default_factory=dict
    )  # preprocess, encoder, first_token, decode_per_token


def stage_times(preprocess_s: float, calls: list[tuple[str, float]]) -> dict[str, float]:
    """Per-stage seconds from (component, seconds) calls: everything before the decoder is the encoder
    side; the decoder's first call is the first token, the mean of the others the per-token decode."""
    decoder = [seconds for name, seconds in calls if name == "decoder"]
    stages = {"preprocess": preprocess_s, "encoder": sum(s for n, s in calls if n != "decoder")}
    if decoder:
        stages["first_token"] = decoder[0]
    if len(decoder) > 1:
        stages["decode_per_token"] = sum(decoder[1:]) / (len(decoder) - 1)
    return stages


def _greedy(max_new_tokens: int) -> dict[str, Any]:
    return {
        "max_new_tokens": max_new_tokens,
        "min_new_tokens": max_new_tokens,
        "num_beams": 1,
        "do_sample": False,
    }


class OrtRunner:
    """An artifact loaded through ``modelkiln.runtime`` with its session calls timed."""

    def __init__(self, directory: Path, threads: int, max_new_tokens: int):
        self.pipe = runtime.load(directory, threads=threads)
        self.generation = _greedy(max_new_tokens)
        self.calls: list[tuple[str, float]] = []
        # Instance attributes shadow the class methods, so every caller inside the pipeline is timed.
        for name, session in getattr(self.pipe, "sessions", {}).items():
            session.run = timed_calls(session.run, name, self.calls)
            session.run_with_ort_values = timed_calls(session.run_with_ort_values, name, self.calls)

    def run(self, image) -> Job:
        self.calls.clear()
        start = time.perf_counter()
        pixel_values = self.pipe.preprocess([image])
        preprocessed = time.perf_counter()
        ids, tokens = self.pipe.generate_tokens(pixel_values, **self.generation)
        text = self.pipe.texts(ids, tokens)[0]
        total = time.perf_counter() - start
        return Job(tokens[0], text, total, stage_times(preprocessed - start, self.calls))


class EagerRunner:
    """The PyTorch fp32 source model: the model's own processor, then ``model.generate``."""

    def __init__(self, model: str, threads: int, max_new_tokens: int):
        import torch  # here, not at the top: the ONNX memory probe runs these runners without torch

        torch.set_num_threads(threads)
        source = resolve_source(model)
        family = detect_family(source.config, model)
        exporter = family.load_exporter()
        self.exporter = exporter
        self.model = exporter.load_model(source)
        self.processor = exporter.reference_processor(source)
        self.codec = TextCodec.from_dir(source.path)
        self.generation = _greedy(max_new_tokens)
        self.calls: list[tuple[str, float]] = []
        # The family declares which modules make each stage (BLIP-2's encoder side is three of them).
        stages = family.bench.eager_stages if family.bench else ()
        for stage, attributes in stages:
            for attribute in attributes:
                hook_calls(getattr(self.model, attribute), stage, self.calls)
        # What one decode step runs: its weights are the eager per-token bound's bytes.
        self.decoder_modules = [
            getattr(self.model, attribute) for attribute in dict(stages).get("decoder", ())
        ]

    def run(self, image) -> Job:
        import torch  # here, not at the top: the ONNX memory probe runs these runners without torch

        self.calls.clear()
        start = time.perf_counter()
        pixels = self.processor(images=[image], return_tensors="pt")["pixel_values"].to(torch.float32)
        preprocessed = time.perf_counter()
        # The family's own reference call: the new tokens only, whatever prompt generate echoes back
        # (BLIP-2 returns its image tokens and BOS before them).
        (tokens,) = self.exporter.torch_captions(self.model, pixels, None, **self.generation)
        text = self.codec.batch_decode([tokens])[0]
        total = time.perf_counter() - start
        return Job(tokens, text, total, stage_times(preprocessed - start, self.calls))
