"""An artifact runs on an edge box without PyTorch: prove it with torch and transformers unimportable."""

from __future__ import annotations

from torch_free import caption_without_torch


def test_captioning_runs_with_torch_and_transformers_blocked(small_artifact, tmp_path):
    report = caption_without_torch(small_artifact, tmp_path, max_new_tokens=5, num_beams=2)
    assert report["loaded"] == []
    assert len(report["captions"]) == 2
