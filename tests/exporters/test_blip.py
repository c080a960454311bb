"""BLIP: export -> runtime -> PyTorch parity with and without a prompt, cached decoding, validation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import TINY_BLIP
from torch_free import caption_without_torch, fixed_image
from transformers import AutoProcessor, BlipForConditionalGeneration

from modelkiln import runtime
from modelkiln.manifest import read_manifest
from modelkiln.registry import detect_family
from modelkiln.runtime.captioning import CAPACITY_ROUNDING, is_buffered
from modelkiln.validation import ValidateConfig, validate_artifact

SEP = 3  # the tiny tokenizer's [SEP]: BLIP's generate stops on it
PROMPT = "a photography of"


def mixed_images():
    """Three images of different sizes and modes: what users feed, not what the model was trained on."""
    rng = np.random.default_rng(7)
    rgb = Image.fromarray(rng.integers(0, 255, (37, 61, 3), dtype=np.uint8))
    rgba = Image.fromarray(rng.integers(0, 255, (80, 40, 4), dtype=np.uint8), mode="RGBA")
    gray = Image.fromarray(rng.integers(0, 255, (50, 50), dtype=np.uint8), mode="L")
    return [rgb, rgba, gray]


@pytest.fixture(scope="module", params=sorted(TINY_BLIP))
def blip(request, captioner_export):
    """(source dir, artifact dir, PyTorch model, processor) for each tiny config (shared exports)."""
    source, artifact = captioner_export("blip", request.param)
    model = BlipForConditionalGeneration.from_pretrained(source).eval()
    return source, artifact, model, AutoProcessor.from_pretrained(source)


def _until_eos(tokens):
    return tokens[: tokens.index(SEP) + 1] if SEP in tokens else tokens


def pytorch_reference(model, processor, images, prompt, **options):
    """Tokens after the prompt and decoded texts, the way a transformers user gets them."""
    text = None if prompt is None else [prompt] * len(images)
    inputs = processor(images=images, text=text, return_tensors="pt")
    prompt_length = inputs["input_ids"].shape[1] - 1 if prompt is not None else 1  # [SEP] is dropped
    with torch.no_grad():
        sequences = model.generate(**inputs, **options)
    tokens = [_until_eos(row[prompt_length:].tolist()) for row in sequences]
    return tokens, [processor.decode(row, skip_special_tokens=True) for row in sequences]


@pytest.mark.parametrize("prompt", [None, PROMPT])
@pytest.mark.parametrize("num_beams", [1, 4])
def test_captions_match_pytorch_token_for_token(blip, num_beams, prompt):
    _, artifact, model, processor = blip
    images = mixed_images()
    pipe = runtime.load(artifact)
    options = {"max_new_tokens": 12, "num_beams": num_beams, "do_sample": False}
    _, tokens = pipe.generate_tokens(pipe.preprocess(images), prompt, **options)
    ours = [_until_eos(t) for t in tokens]
    theirs, texts = pytorch_reference(model, processor, images, prompt, **options)
    assert ours == theirs
    assert all(ours) and len({tuple(t) for t in ours}) > 1, "captions should differ between images"
    results = pipe(images, prompt=prompt, **options)
    assert [r[0]["generated_text"] for r in results] == texts
    if prompt is not None:
        assert all(text.startswith(PROMPT + " ") for text in texts)  # transformers keeps the prompt words


def test_prompt_ids_are_what_generate_feeds_the_text_decoder(blip):
    _, artifact, model, processor = blip
    pipe = runtime.load(artifact)
    ids, mask = pipe.prompt_ids(PROMPT, 2)
    encoded = processor(text=[PROMPT] * 2, return_tensors="pt")["input_ids"]  # [CLS] words [SEP]
    bos = model.config.text_config.bos_token_id
    assert ids.tolist() == [[bos, *row[1:-1]] for row in encoded.tolist()] and mask.all()
    assert pipe.prompt_ids(None, 2)[0].tolist() == [[bos], [bos]]


def test_decoder_is_fed_the_prompt_once_then_one_token_per_step(blip):
    _, artifact, _, _ = blip
    pipe = runtime.load(artifact)
    fed, encoder_calls = [], []
    run_decoder, run_encoder = pipe.decoder_session.run_with_ort_values, pipe.encoder.run

    def spy_decoder(names, feeds, *args):
        fed.append((feeds["input_ids"].shape(), feeds["past_key_values.0.key"].shape()[2]))
        return run_decoder(names, feeds, *args)

    def spy_encoder(names, feeds, *args):
        encoder_calls.append(feeds["pixel_values"].shape[0])
        return run_encoder(names, feeds, *args)

    pipe.decoder_session.run_with_ort_values = spy_decoder
    pipe.encoder.run = spy_encoder
    pipe(mixed_images(), prompt=PROMPT, max_new_tokens=5, num_beams=2, min_new_tokens=5)
    prompt_length = pipe.prompt_ids(PROMPT, 1)[0].shape[1]  # [DEC] + 3 words
    assert encoder_calls == [3] and prompt_length == 4
    # A buffer (config b) keeps one capacity, prompt + 5 new tokens rounded up; a growing past (config a)
    # starts empty and grows by exactly one token per step.
    buffered = is_buffered(pipe.past_specs)
    assert fed[0][0] == [6, prompt_length] and fed[0][1] == (CAPACITY_ROUNDING if buffered else 0)
    for step, (ids_shape, past) in enumerate(fed[1:]):
        assert ids_shape == [6, 1]
        assert past == (CAPACITY_ROUNDING if buffered else prompt_length + step)
    assert len(fed) == 5


def test_artifact_layout(blip):
    source, artifact, _, _ = blip
    manifest = read_manifest(artifact)
    assert (
        manifest.family == "blip"
        and detect_family(json.loads((source / "config.json").read_text())).name == "blip"
    )
    assert (
        artifact / "preprocessor_config.json"
    ).is_file()  # also when the source nests it in processor_config
    decoder_inputs = [spec.name for spec in manifest.components["decoder"].inputs]
    assert decoder_inputs[:2] == ["input_ids", "attention_mask"] and "position_ids" not in decoder_inputs
    cross = [spec.name for spec in manifest.components["encoder"].outputs]
    assert cross and set(cross) <= set(decoder_inputs)  # identical names on both graphs
    assert json.loads((artifact / "generation_config.json").read_text())["eos_token_id"] == SEP


def test_prompted_captioning_runs_with_torch_and_transformers_blocked(blip, tmp_path):
    _, artifact, _, _ = blip
    options = {"prompt": PROMPT, "max_new_tokens": 5, "num_beams": 2}
    report = caption_without_torch(artifact, tmp_path, **options)
    assert report["loaded"] == []
    image = fixed_image()
    assert report["captions"] == runtime.load(artifact)([image, image], **options)


def test_validate_reports_parity_with_and_without_prompt(blip):
    source, artifact, _, _ = blip
    config = ValidateConfig(num_images=3, max_new_tokens=8, prompts=(None, PROMPT))
    report = validate_artifact(artifact, str(source), config)
    assert report["passed"], report
    assert set(report["captions"]) == {
        "greedy",
        "beam4",
        f"greedy, prompt {PROMPT!r}",
        f"beam4, prompt {PROMPT!r}",
    }
    assert all(row["max_abs_diff"] < 1e-4 for row in report["components"].values())
    print({case: row["max_abs_diff"] for case, row in report["components"].items()})
    print({mode: f"{row['matches']}/{row['total']}" for mode, row in report["captions"].items()})


def test_cli_caption_and_validate_with_a_prompt(blip, tmp_path, capsys):
    from modelkiln.cli import main

    source, artifact, _, _ = blip
    image = tmp_path / "image.png"
    mixed_images()[0].convert("RGB").save(image)
    assert main(["caption", str(artifact), str(image), "--prompt", "a photography of", "--json"]) == 0
    caption = json.loads(capsys.readouterr().out)[0]["generated_text"]
    assert caption.startswith("a photography of")
    argv = [
        "validate",
        str(artifact),
        "--model",
        str(source),
        "--num-images",
        "2",
        "--prompt",
        "a photography of",
    ]
    assert main(argv) == 0
    assert "prompt 'a photography of'" in capsys.readouterr().err
