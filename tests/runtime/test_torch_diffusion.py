"""Loading diffusers source pipelines: folders saved without an optional-in-practice component."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("diffusers")

from modelkiln.fixtures.tiny_diffusion import build_pipeline
from modelkiln.runtime.torch_diffusion import absent_components


def test_sd3_saved_without_t5_loads_with_its_absent_components(tmp_path):
    import diffusers

    pipe = build_pipeline("sd3")
    pipe.text_encoder_3, pipe.tokenizer_3 = None, None
    pipe.register_modules(text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(tmp_path)
    assert absent_components(tmp_path) == {
        "text_encoder_3": None,
        "tokenizer_3": None,
        "feature_extractor": None,
        "image_encoder": None,
    }
    with pytest.raises(ValueError, match="expected"):  # what every loader would hit without them
        diffusers.StableDiffusion3Pipeline.from_pretrained(tmp_path)
    loaded = diffusers.StableDiffusion3Pipeline.from_pretrained(tmp_path, **absent_components(tmp_path))
    assert loaded.text_encoder_3 is None and loaded.transformer is not None


def test_complete_folder_has_nothing_absent(tmp_path):
    (tmp_path / "model_index.json").write_text(
        json.dumps({"_class_name": "X", "vae": ["diffusers", "AutoencoderKL"]})
    )
    assert absent_components(tmp_path) == {}
