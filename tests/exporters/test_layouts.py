"""Checkpoint-layout conformance: every captioning family exports and runs from a checkpoint whose processor
was saved the legacy way (preprocessor_config.json) or the transformers 5 way (processor_config.json with the
image processor nested), token-exact with PyTorch either way."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import TINY_CAPTIONERS, vit_gpt2_export
from PIL import Image
from tiny_models import LAYOUTS, save_tiny_captioner
from transformers import AutoImageProcessor

from modelkiln import runtime
from modelkiln.errors import SourceModelError
from modelkiln.exporters.export import export_model
from modelkiln.exporters.source import resolve_source, save_image_processor_config
from modelkiln.registry import get_family
from modelkiln.validation import ValidateConfig, validate_artifact

# A prompt each family's tiny tokenizer knows: BLIP's conditional captioning and BLIP-2's VQA.
PROMPTS = {"vit-gpt2": None, "blip": "a photography of", "blip-2": "Question: what is it? Answer:"}


def mixed_images():
    """Three images of different sizes and modes: what users feed, not what the model was trained on."""
    rng = np.random.default_rng(7)
    rgb = Image.fromarray(rng.integers(0, 255, (37, 61, 3), dtype=np.uint8))
    rgba = Image.fromarray(rng.integers(0, 255, (80, 40, 4), dtype=np.uint8), mode="RGBA")
    gray = Image.fromarray(rng.integers(0, 255, (50, 50), dtype=np.uint8), mode="L")
    return [rgb, rgba, gray]


@pytest.fixture(scope="module", params=PROMPTS)
def artifact(request, tmp_path_factory, captioner_export):
    """(family, artifact dir): each family's tiny config "a", the run's shared export of it. The layouts
    differ only in processor files, which test_both_layouts_write_the_same_runtime_files checks end in
    identical artifact files, so this export stands for either layout."""
    family = request.param
    if family in TINY_CAPTIONERS:
        return family, captioner_export(family, "a")[1]
    return family, vit_gpt2_export(tmp_path_factory, "a")[1]


@pytest.fixture(scope="module", params=LAYOUTS)
def exported(request, artifact, tmp_path_factory):
    """(family, layout, source dir, artifact dir) for each family and layout."""
    family, out = artifact
    layout = request.param
    source = save_tiny_captioner(tmp_path_factory.mktemp(f"{family}-{layout}"), family, layout)
    return family, layout, source, out


def test_source_is_saved_in_the_layout_it_claims(exported):
    _, layout, source, _ = exported
    names = {path.name for path in source.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json"} <= names
    processor_file = source / "processor_config.json"
    nested = processor_file.is_file() and "image_processor" in json.loads(processor_file.read_text())
    legacy = "preprocessor_config.json" in names
    assert (nested, legacy) == ((True, False) if layout == "transformers-5" else (False, True))


def test_both_layouts_write_the_same_runtime_files(exported, tmp_path):
    """Export's steps 1, 2 and 4 (resolve, load, copy the runtime files) from this layout's checkpoint give
    the artifact's files byte for byte; step 3 traces the weights, the same in both layouts."""
    family, _, source, artifact = exported
    resolved = resolve_source(str(source))
    exporter = get_family(family).load_exporter()
    exporter.save_runtime_files(resolved, exporter.load_model(resolved), tmp_path)
    written = sorted(path.name for path in tmp_path.iterdir())
    assert "preprocessor_config.json" in written
    for name in written:
        ours, theirs = (tmp_path / name).read_bytes(), (artifact / name).read_bytes()
        if name == "tokenizer_config.json":
            # A processor save tags its tokenizer with the processor's class, which no runtime reads.
            ours, theirs = (_without_processor_class(text) for text in (ours, theirs))
        assert ours == theirs, name


def _without_processor_class(text: bytes) -> dict:
    return {k: v for k, v in json.loads(text).items() if k != "processor_class"}


def test_artifact_preprocesses_like_the_checkpoints_own_processor(exported):
    _, _, source, artifact = exported
    assert json.loads((artifact / "preprocessor_config.json").read_text())["size"]  # one file, either layout
    images = mixed_images()
    theirs = AutoImageProcessor.from_pretrained(source)(images=images, return_tensors="np")["pixel_values"]
    np.testing.assert_array_equal(runtime.load(artifact).preprocess(images), theirs)


def test_artifact_captions_token_exactly_like_pytorch(exported):
    family, _, source, artifact = exported
    config = ValidateConfig(num_images=3, max_new_tokens=8, prompts=(None, PROMPTS[family]))
    report = validate_artifact(artifact, str(source), config)
    assert report["passed"], report
    assert all(row["matches"] == row["total"] for row in report["captions"].values())
    assert all(row["max_abs_diff"] < 1e-4 for row in report["components"].values())


def test_nested_image_processor_wins_over_a_stale_legacy_file_as_in_transformers(tmp_path):
    source = save_tiny_captioner(tmp_path / "source", "blip", "transformers-5")
    # A legacy file left over from an older save, with other settings: transformers reads the nested one.
    stale = {**json.loads((source / "processor_config.json").read_text())["image_processor"]}
    (source / "preprocessor_config.json").write_text(json.dumps({**stale, "size": {"height": 9, "width": 9}}))
    out = tmp_path / "out"
    out.mkdir()
    save_image_processor_config(resolve_source(str(source)), out)
    assert json.loads((out / "preprocessor_config.json").read_text()) == stale
    assert AutoImageProcessor.from_pretrained(source).size == stale["size"]


def test_checkpoint_without_image_processor_settings_is_refused(tmp_path):
    source = save_tiny_captioner(tmp_path / "source", "blip-2", "legacy")
    (source / "preprocessor_config.json").unlink()  # left: a transformers 4 processor_config.json
    with pytest.raises(SourceModelError, match=r"has no preprocessor_config\.json \(nor an image_processor"):
        export_model(source, tmp_path / "artifact")
    assert not (tmp_path / "artifact").exists()
