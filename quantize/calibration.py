"""Calibration data for static quantization: the inputs each graph really sees, recorded from runs.

Captioners: the parent artifact captions the calibration images while every session's feeds are
recorded, so the decoder is calibrated on real decoding steps (growing KV cache, real cross-attention
states), not on one synthetic input. Diffusion: the parent runs whole multi-step generations over a
prompt list, so the denoiser is calibrated across timesteps (early steps see near-pure noise, late
steps nearly clean latents; one timestep would miss most of the activation range). ::

    feeds, record = record_calibration(parent_dir, images_folder=None, count=8)
    feeds, record = record_calibration(parent_dir, None, 4, prompts_file="prompts.txt", steps=8)
    feeds["decoder"]   # list of {input name: array}
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from modelkiln.errors import KilnError
from modelkiln.manifest import CALIBRATION_PROMPTS_NAME

CALIBRATION_SEEDS = 60_000  # drawn calibration images, away from training, quality and demo seeds
MAX_FEEDS = 64  # per graph: enough for stable min/max ranges, few enough to keep calibration fast
# Default diffusion calibration prompts: varied subjects, styles and compositions.
CALIBRATION_PROMPTS = (
    "a photo of a red fox in the snow",
    "an oil painting of a harbour at sunset",
    "a close-up of a bowl of ramen, studio lighting",
    "a futuristic city skyline at night, neon lights",
    "a watercolor sketch of mountains and a lake",
    "a portrait of an old man with a beard, black and white",
    "a cartoon robot holding a balloon",
    "an aerial view of green fields and a river",
)


class _RecordingSession:
    """Stands in for an onnxruntime session and keeps a copy of every feed."""

    def __init__(self, session, sink: list[dict[str, np.ndarray]]):
        self._session = session
        self._sink = sink

    def run(self, output_names, feeds, *args):
        self._sink.append({name: np.array(value) for name, value in feeds.items()})
        return self._session.run(output_names, feeds, *args)

    def run_with_ort_values(self, output_names, feeds, *args):
        self._sink.append({name: np.array(value.numpy()) for name, value in feeds.items()})
        return self._session.run_with_ort_values(output_names, feeds, *args)

    def __getattr__(self, name: str):
        return getattr(self._session, name)


def _images(folder: str | None, count: int) -> tuple[list, str]:
    if folder is None:
        from modelkiln.fixtures import shapes

        return [shapes.draw(CALIBRATION_SEEDS + i)[0] for i in range(count)], (
            f"{count} drawn fixture images (seeds {CALIBRATION_SEEDS}+)"
        )
    from modelkiln.validation import ValidateConfig, validation_images

    files, description = validation_images(ValidateConfig(images=folder))
    return files[:count], description


def _subsample(feeds: list[dict], limit: int) -> list[dict]:
    if len(feeds) <= limit:
        return feeds
    keep = np.linspace(0, len(feeds) - 1, limit).round().astype(int)  # spread over all decode steps
    return [feeds[i] for i in keep]


def _record_sessions(pipe) -> dict[str, list[dict]]:
    """Swap every session of ``pipe`` for a recording proxy; return the per-graph feed lists."""
    sinks: dict[str, list[dict]] = {name: [] for name in pipe.sessions}
    proxies = {name: _RecordingSession(s, sinks[name]) for name, s in pipe.sessions.items()}
    for attribute, value in list(vars(pipe).items()):  # the pipeline keeps sessions under other names too
        for name, session in pipe.sessions.items():
            if value is session:
                setattr(pipe, attribute, proxies[name])
    pipe.sessions = proxies
    return sinks


def _caption_run(pipe, folder: str | None, count: int, **_) -> dict[str, Any]:
    from modelkiln.runtime.images import load_images

    images, description = _images(folder, count)
    pipe(list(images), num_beams=1, do_sample=False)
    digest = hashlib.sha256(pipe.preprocess(load_images(images)).tobytes()).hexdigest()
    return {"description": description, "images": len(images), "pixels_sha256": digest}


def calibration_prompts(
    prompts_file: str | None, count: int, artifact: Path | None = None
) -> tuple[list[str], str]:
    """The first ``count`` prompts of ``prompts_file``; without one, of the artifact's own
    ``calibration_prompts.txt`` (a source pipeline folder may ship one: the prompts its model knows,
    e.g. the shapes fixture's, whose words the built-in scenes lack), else of the built-in prompts."""
    if prompts_file is not None:
        return _prompt_lines(Path(prompts_file), count, f"--calibration-prompts {prompts_file}")
    if artifact is not None and (artifact / CALIBRATION_PROMPTS_NAME).is_file():
        return _prompt_lines(
            artifact / CALIBRATION_PROMPTS_NAME, count, f"the artifact's {CALIBRATION_PROMPTS_NAME}"
        )
    return list(CALIBRATION_PROMPTS[:count]), f"{min(count, len(CALIBRATION_PROMPTS))} built-in prompts"


def _prompt_lines(path: Path, count: int, label: str) -> tuple[list[str], str]:
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise KilnError(f"{label} has no prompts; write one prompt per line.")
    return lines[:count], f"{min(count, len(lines))} prompts from {label}"


def _diffusion_run(
    pipe, folder: str | None, count: int, prompts_file=None, steps: int = 8, size=None, artifact=None
) -> dict:
    prompts, description = calibration_prompts(prompts_file, count, artifact)
    for i, prompt in enumerate(prompts):
        seed = CALIBRATION_SEEDS + i
        pipe(prompt, num_inference_steps=steps, height=size, width=size, seed=seed, output_type="np")
    digest = hashlib.sha256("\n".join(prompts).encode()).hexdigest()
    return {
        "description": f"{description}, {steps} steps each at {size or 'the default'} px",
        "prompts": len(prompts),
        "prompts_sha256": digest,
    }


# Task -> how a calibration run drives the parent pipeline.
CALIBRATION_RUNS = {"image-to-text": _caption_run, "text-to-image": _diffusion_run}


def record_calibration(
    parent: Path,
    folder: str | None,
    count: int,
    prompts_file: str | None = None,
    steps: int = 8,
    size: int | None = None,
) -> tuple[dict[str, list[dict]], dict[str, Any]]:
    """Per-graph recorded feeds, and a description of the calibration set for the manifest."""
    from modelkiln import runtime

    pipe = runtime.load(parent)
    sinks = _record_sessions(pipe)
    record = CALIBRATION_RUNS[pipe.task](
        pipe, folder, count, prompts_file=prompts_file, steps=steps, size=size, artifact=Path(parent)
    )
    feeds = {name: _subsample(recorded, MAX_FEEDS) for name, recorded in sinks.items()}
    return feeds, {**record, "feeds": {name: len(recorded) for name, recorded in feeds.items()}}
