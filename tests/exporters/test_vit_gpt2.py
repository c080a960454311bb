"""ViT-GPT2: export -> runtime -> PyTorch parity, incremental decoding, external data, manifest."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, VisionEncoderDecoderModel

from modelkiln import runtime
from modelkiln.exporters.decoding import BUFFER_HEAD_MULTIPLE
from modelkiln.manifest import read_manifest, verify_files
from modelkiln.validation import ValidateConfig, validate_artifact


def mixed_images():
    """Three images of different sizes and modes: what users feed, not what the model was trained on."""
    rng = np.random.default_rng(7)
    rgb = Image.fromarray(rng.integers(0, 255, (37, 61, 3), dtype=np.uint8))
    rgba = Image.fromarray(rng.integers(0, 255, (80, 40, 4), dtype=np.uint8), mode="RGBA")
    gray = Image.fromarray(rng.integers(0, 255, (50, 50), dtype=np.uint8), mode="L")
    return [rgb, rgba, gray]


def torch_tokens(source, images, **options):
    model = VisionEncoderDecoderModel.from_pretrained(source).eval()
    pixels = AutoImageProcessor.from_pretrained(source)(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        sequences = model.generate(pixel_values=pixels, **options)
    eos = model.generation_config.eos_token_id
    return [_until_eos([int(t) for t in row[1:]], eos) for row in sequences]


def _until_eos(tokens, eos):
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


@pytest.mark.parametrize("num_beams", [1, 4])
def test_captions_match_pytorch_token_for_token(vit_gpt2_artifact, num_beams):
    source, artifact = vit_gpt2_artifact
    images = mixed_images()
    pipe = runtime.load(artifact)
    _, tokens = pipe.generate_tokens(
        pipe.preprocess(images), max_new_tokens=10, num_beams=num_beams, do_sample=False
    )
    ours = [_until_eos(t, 2) for t in tokens]
    theirs = torch_tokens(source, images, max_new_tokens=10, num_beams=num_beams, do_sample=False)
    assert ours == theirs
    assert len({tuple(t) for t in ours}) > 1, "captions should differ between images"
    texts = pipe(images, max_new_tokens=10, num_beams=num_beams)
    assert [r[0]["generated_text"] for r in texts] == pipe.codec.batch_decode(ours)


def test_pipeline_call_shapes_follow_transformers(vit_gpt2_artifact):
    _, artifact = vit_gpt2_artifact
    pipe = runtime.load(artifact)
    image = mixed_images()[0]
    single = pipe(image, max_new_tokens=4)
    assert isinstance(single, list) and set(single[0]) == {"generated_text"}
    batched = pipe([image, image], max_new_tokens=4)
    assert len(batched) == 2 and batched[0] == single


def test_generation_defaults_come_from_the_shipped_generation_config(vit_gpt2_artifact):
    source, artifact = vit_gpt2_artifact
    pipe = runtime.load(artifact)
    model = VisionEncoderDecoderModel.from_pretrained(source)
    assert pipe.settings().num_beams == model.generation_config.num_beams
    assert pipe.settings().max_new_tokens == model.generation_config.max_length - 1


def test_decoder_is_fed_one_token_per_step_and_encoder_runs_once(small_artifact):
    pipe = runtime.load(small_artifact)
    fed, encoder_calls = [], []
    run_decoder, run_encoder = pipe.decoder_session.run_with_ort_values, pipe.encoder.run

    def spy_decoder(names, feeds, *args):
        fed.append((feeds["input_ids"].shape(), feeds["past_key_values.0.key"].shape()))
        return run_decoder(names, feeds, *args)

    def spy_encoder(names, feeds, *args):
        encoder_calls.append(feeds["pixel_values"].shape)
        return run_encoder(names, feeds, *args)

    pipe.decoder_session.run_with_ort_values = spy_decoder
    pipe.encoder.run = spy_encoder
    pipe(mixed_images(), max_new_tokens=6, num_beams=2, min_new_tokens=6)
    assert encoder_calls == [(3, 3, 32, 32)]
    assert fed[0] == ([6, 1], [6, 4, 0, 12])  # 3 images x 2 beams, start token, empty past
    for step, (ids_shape, past_shape) in enumerate(fed[1:], start=1):
        assert ids_shape == [6, 1]
        assert past_shape[2] == step  # the past grows by exactly one token per step


def test_external_data_artifact_loads_after_move_from_another_cwd(small_artifact, tmp_path, monkeypatch):
    manifest = read_manifest(small_artifact)
    assert manifest.components["decoder"].external_data == "decoder.onnx.data"
    graph = onnx.load(str(small_artifact / "decoder.onnx"), load_external_data=False)
    locations = {
        entry.value
        for init in graph.graph.initializer
        for entry in init.external_data
        if entry.key == "location"
    }
    assert locations == {"decoder.onnx.data"}  # relative, so the folder can move
    moved = tmp_path / "moved" / "artifact"
    shutil.copytree(small_artifact, moved)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    before = runtime.load(small_artifact)(mixed_images(), max_new_tokens=5)
    after = runtime.load(os.path.relpath(moved, elsewhere))(mixed_images(), max_new_tokens=5)
    assert before == after


def test_manifest_describes_the_artifact(vit_gpt2_artifact):
    _, artifact = vit_gpt2_artifact
    manifest = read_manifest(artifact)
    assert manifest.family == "vit-gpt2" and manifest.format_version == 1 and manifest.precision == "fp32"
    assert {"torch", "transformers", "onnx", "onnxruntime"} <= set(manifest.tools)
    assert len(manifest.source.weights_sha256) == 64
    assert {
        "encoder.onnx",
        "decoder.onnx",
        "tokenizer.json",
        "preprocessor_config.json",
        "generation_config.json",
    } <= set(manifest.files)
    assert verify_files(artifact, manifest) == []
    decoder = {spec.name: spec for spec in manifest.components["decoder"].inputs}
    assert decoder["input_ids"].shape == ["batch", "sequence"]
    # onnxruntime target: an in-place buffer where GroupQueryAttention takes the head size (config b's
    # 8), a growing past elsewhere (config a's 12).
    buffered = manifest.runtime["head_dim"] % BUFFER_HEAD_MULTIPLE == 0
    past, present = ("capacity", "capacity") if buffered else ("past_sequence", "total_sequence")
    assert decoder["past_key_values.0.key"].shape[0::2] == ["batch", past]
    outputs = {spec.name: spec for spec in manifest.components["decoder"].outputs}
    assert outputs["present.0.key"].shape[2] == present
    graph = onnx.load(str(artifact / "decoder.onnx"), load_external_data=False)
    fused = {node.op_type for node in graph.graph.node} & {"GroupQueryAttention", "MultiHeadAttention"}
    assert fused == ({"GroupQueryAttention", "MultiHeadAttention"} if buffered else set())
    for spec in manifest.components.values():
        onnx.checker.check_model(str(artifact / spec.file))


def test_validate_reports_parity_and_records_it(vit_gpt2_artifact):
    source, artifact = vit_gpt2_artifact
    report = validate_artifact(artifact, str(source), ValidateConfig(num_images=3, max_new_tokens=8))
    assert report["passed"], report
    assert report["source_matches_manifest"]
    assert set(report["captions"]) == {"greedy", "beam4"}
    assert all(row["max_abs_diff"] < 1e-4 for row in report["components"].values())
    assert read_manifest(artifact).validation["passed"] is True


def test_validate_fails_when_the_artifact_differs_from_its_source(small_artifact, tmp_path):
    from tiny_models import TINY_VIT_GPT2, save_tiny_vit_gpt2

    # The same architecture with other weights: saving it is cheap, exporting it is not needed.
    other = save_tiny_vit_gpt2(
        tmp_path / "other", TINY_VIT_GPT2["a"].__class__(**{**TINY_VIT_GPT2["a"].__dict__, "seed": 5})
    )
    report = validate_artifact(small_artifact, str(other), ValidateConfig(num_images=2, max_new_tokens=4))
    assert not report["passed"]
    assert not report["source_matches_manifest"]


def test_validation_fails_on_empty_captions(small_artifact, small_source, monkeypatch):
    from modelkiln.runtime.text import TextCodec

    # Every caption decodes to nothing, as a broken quantized BLIP-2 does (transformers#30383): even
    # with token-exact parity the report must fail and count them.
    monkeypatch.setattr(TextCodec, "decode", lambda self, ids: "")
    report = validate_artifact(
        small_artifact,
        str(small_source),
        ValidateConfig(num_images=2, max_new_tokens=3, update_manifest=False),
    )
    assert not report["passed"]
    assert report["captions"]["greedy"]["empty_captions"] == 2
    assert report["captions"]["greedy"]["mismatches"] == []


def test_forcing_another_family_fails_up_front_naming_the_detected_one(small_source, tmp_path, capsys):
    from modelkiln.cli import main

    out = tmp_path / "artifact"
    assert main(["export", "--model", str(small_source), "--out", str(out), "--family", "blip"]) == 2
    message = capsys.readouterr().err.strip()
    assert re.fullmatch(
        r"error: --family blip does not fit .*: its config is a vit-gpt2 checkpoint \(.*\)\. "
        r"Drop --family to export it as vit-gpt2, or pass a blip checkpoint\.",
        message,
    ), message
    assert "\n" not in message and not out.exists()


def test_forcing_the_detected_family_or_an_undetected_config_is_allowed(small_source):
    from modelkiln.exporters.export import ExportConfig, _resolve_family
    from modelkiln.exporters.source import resolve_source

    source = resolve_source(str(small_source))
    assert _resolve_family(ExportConfig(family="vit-gpt2"), source, "m").name == "vit-gpt2"
    # A supported architecture under a model_type no detector knows: forcing is what the detector's error
    # tells the user to do, so it must stay possible.
    renamed = dataclasses.replace(source, config={**source.config, "model_type": "my-vit-gpt2"})
    assert _resolve_family(ExportConfig(family="vit-gpt2"), renamed, "m").name == "vit-gpt2"


def test_forcing_a_family_onto_another_architecture_is_refused_before_loading(small_source, tmp_path):
    from transformers import BertConfig, BertModel

    from modelkiln.errors import SourceModelError
    from modelkiln.exporters.export import ExportConfig, export_model

    # No detector claims a BERT, so --family is allowed through; from_pretrained would then only warn and
    # build a BLIP from random weights, and the export used to "succeed".
    bert = tmp_path / "bert"
    BertModel(
        BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    ).save_pretrained(bert)
    shutil.copyfile(small_source / "preprocessor_config.json", bert / "preprocessor_config.json")
    for family, model_type in (("blip", "blip"), ("vit-gpt2", "vision-encoder-decoder")):
        match = rf"holds a 'bert' model .* loads '{model_type}' checkpoints .* Drop --family"
        with pytest.raises(SourceModelError, match=match):
            export_model(bert, tmp_path / "out", ExportConfig(family=family))
    assert not (tmp_path / "out").exists()
