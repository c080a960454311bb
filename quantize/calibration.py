"""Calibration data for static quantization: the inputs each graph really sees, recorded from runs.

The parent artifact captions the calibration images while every session's feeds are recorded, so the
decoder is calibrated on real decoding steps (growing KV cache, real cross-attention states), not on
one synthetic input. ::

    feeds, record = record_calibration(parent_dir, images_folder=None, count=8)
    feeds["decoder"]   # list of {input name: array}
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

CALIBRATION_SEEDS = 60_000  # drawn calibration images, away from training, quality and demo seeds
MAX_FEEDS = 64  # per graph: enough for stable min/max ranges, few enough to keep calibration fast


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
    from modelkiln.validate import ValidateConfig, validation_images

    files, description = validation_images(ValidateConfig(images=folder))
    return files[:count], description


def _subsample(feeds: list[dict], limit: int) -> list[dict]:
    if len(feeds) <= limit:
        return feeds
    keep = np.linspace(0, len(feeds) - 1, limit).round().astype(int)  # spread over all decode steps
    return [feeds[i] for i in keep]


def record_calibration(
    parent: Path, folder: str | None, count: int
) -> tuple[dict[str, list[dict]], dict[str, Any]]:
    """Per-graph recorded feeds, and a description of the calibration set for the manifest."""
    from modelkiln import runtime
    from modelkiln.runtime.images import load_images

    pipe = runtime.load(parent)
    images, description = _images(folder, count)
    sinks: dict[str, list[dict]] = {name: [] for name in pipe.sessions}
    proxies = {name: _RecordingSession(s, sinks[name]) for name, s in pipe.sessions.items()}
    for attribute, value in list(vars(pipe).items()):  # the pipeline keeps sessions under other names too
        for name, session in pipe.sessions.items():
            if value is session:
                setattr(pipe, attribute, proxies[name])
    pipe.sessions = proxies
    pipe(list(images), num_beams=1, do_sample=False)
    digest = hashlib.sha256(pipe.preprocess(load_images(images)).tobytes()).hexdigest()
    feeds = {name: _subsample(recorded, MAX_FEEDS) for name, recorded in sinks.items()}
    record = {
        "description": description,
        "images": len(images),
        "pixels_sha256": digest,
        "feeds": {name: len(recorded) for name, recorded in feeds.items()},
    }
    return feeds, record
