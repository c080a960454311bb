"""BLIP-2 (OPT): export -> runtime -> PyTorch parity for captioning and VQA prompts, external data, validation."""

from __future__ import annotations

import os
import shutil

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from tiny_models import TINY_BLIP2
from transformers import AutoProcessor, Blip2ForConditionalGeneration

from modelkiln import runtime
from modelkiln.errors import UnsupportedModelError
from modelkiln.manifest import read_manifest
from modelkiln.registry import detect_family
from modelkiln.runtime.captioning import CAPACITY_ROUNDING, is_buffered
from modelkiln.validation import ValidateConfig, validate_artifact

VQA_PROMPT = "Question: what is it? Answer:"
EOS = 2


def mixed_images():
    """Three images of different sizes and modes: what users feed, not what the model was trained on."""
    rng = np.random.default_rng(7)
    rgb = Image.fromarray(rng.integers(0, 255, (37, 61, 3), dtype=np.uint8))
    rgba = Image.fromarray(rng.integers(0, 255, (80, 40, 4), dtype=np.uint8), mode="RGBA")
    gray = Image.fromarray(rng.integers(0, 255, (50, 50), dtype=np.uint8), mode="L")
    return [rgb, rgba, gray]


@pytest.fixture(params=sorted(TINY_BLIP2))
def blip2(request, captioner_export):
    """(config name, source dir, artifact dir) for each tiny config; "b" is exported with external data."""
    return (request.param, *captioner_export("blip-2", request.param))


def torch_generate(source, images, prompt, **options):
    """What a transformers user runs: Blip2Processor, generate, batch_decode."""
    model = Blip2ForConditionalGeneration.from_pretrained(source).eval()
    processor = AutoProcessor.from_pretrained(source)
    text = None if prompt is None else [prompt] * len(images)
    inputs = processor(images=images, text=text, return_tensors="pt")
    with torch.no_grad():
        sequences = model.generate(**inputs, **options)
    prompt_length = inputs["input_ids"].shape[1] if prompt is not None else model.config.num_query_tokens + 1
    tokens = [_until_eos([int(t) for t in row[prompt_length:]]) for row in sequences]
    return tokens, processor.batch_decode(sequences, skip_special_tokens=True)


def _until_eos(tokens):
    return tokens[: tokens.index(EOS) + 1] if EOS in tokens else tokens


@pytest.mark.parametrize("prompt", [None, VQA_PROMPT])
def test_captions_and_texts_match_pytorch(blip2, prompt):
    _, source, artifact = blip2
    images = mixed_images()
    pipe = runtime.load(artifact)
    for num_beams in (1, 4):
        options = {"max_new_tokens": 8, "num_beams": num_beams, "do_sample": False}
        _, tokens = pipe.generate_tokens(pipe.preprocess(images), prompt, **options)
        theirs, their_texts = torch_generate(source, images, prompt, **options)
        assert [_until_eos(t) for t in tokens] == theirs, num_beams
        assert [r[0]["generated_text"] for r in pipe(images, prompt=prompt, **options)] == their_texts
    assert len({tuple(t) for t in tokens}) > 1, "captions should differ between images"
    assert all(pipe.codec.decode(t).strip() for t in tokens), "random weights should give non-empty captions"


def test_prompt_is_tokenized_like_the_blip2_processor(blip2):
    _, source, artifact = blip2
    pipe = runtime.load(artifact)
    processor = AutoProcessor.from_pretrained(source)
    ids, mask = pipe.prompt_ids(VQA_PROMPT, batch=2)
    expected = processor(images=mixed_images()[:2], text=[VQA_PROMPT] * 2)["input_ids"]
    assert ids.tolist() == expected and mask.tolist() == np.ones_like(ids).tolist()


def test_first_step_feeds_the_queries_and_later_steps_one_token(blip2):
    name, _, artifact = blip2
    pipe = runtime.load(artifact)
    queries = TINY_BLIP2[name].num_query_tokens
    fed = []
    run = pipe.decoder_session.run_with_ort_values

    def spy(names, feeds, *args):
        shapes = (feeds["input_ids"].shape(), feeds["prefix_embeds"].shape(), feeds["attention_mask"].shape())
        fed.append((*shapes, feeds["past_key_values.0.key"].shape()[2]))
        return run(names, feeds, *args)

    pipe.decoder_session.run_with_ort_values = spy
    pipe(mixed_images(), max_new_tokens=5, min_new_tokens=5, num_beams=2)
    (ids, prefix, mask, past), *later = fed
    # A buffer (config b) keeps one capacity, queries + BOS + 5 new tokens rounded up; a growing past
    # (config a) starts empty and holds exactly the tokens before each step.
    capacity = (
        -(-(queries + 6) // CAPACITY_ROUNDING) * CAPACITY_ROUNDING if is_buffered(pipe.past_specs) else None
    )
    assert ids == [6, 1] and prefix[:2] == [6, queries] and mask == [6, queries + 1]  # the queries and BOS
    assert past == (capacity or 0)
    for step, (ids, prefix, mask, past) in enumerate(later, start=1):
        assert ids == [6, 1] and prefix[1] == 0 and mask[1] == queries + step + 1
        assert past == (capacity or queries + step)


def test_validate_passes_with_and_without_prompt(blip2):
    _, source, artifact = blip2
    config = ValidateConfig(num_images=3, max_new_tokens=8, prompts=(None, VQA_PROMPT))
    report = validate_artifact(artifact, str(source), config)
    assert report["passed"], report
    assert set(report["captions"]) == {
        "greedy",
        "beam4",
        f"greedy, prompt {VQA_PROMPT!r}",
        f"beam4, prompt {VQA_PROMPT!r}",
    }
    assert all(row["max_abs_diff"] < 1e-4 for row in report["components"].values())


def test_tied_embedding_is_stored_once(blip2):
    _, source, artifact = blip2
    vocab = len(AutoProcessor.from_pretrained(source).tokenizer)
    graph = onnx.load(str(artifact / "decoder.onnx"), load_external_data=False)
    matrices = [init.name for init in graph.graph.initializer if list(init.dims)[:1] == [vocab]]
    assert len(matrices) == 1, matrices


def test_external_data_artifact_loads_after_move_from_another_cwd(captioner_export, tmp_path, monkeypatch):
    _, artifact = captioner_export("blip-2", "b")
    manifest = read_manifest(artifact)
    for component in ("encoder", "decoder"):
        assert manifest.components[component].external_data == f"{component}.onnx.data"
        graph = onnx.load(str(artifact / f"{component}.onnx"), load_external_data=False)
        locations = {e.value for i in graph.graph.initializer for e in i.external_data if e.key == "location"}
        assert locations == {f"{component}.onnx.data"}  # relative, so the folder can move
    moved = tmp_path / "moved" / "artifact"
    shutil.copytree(artifact, moved)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    before = runtime.load(artifact)(mixed_images(), prompt=VQA_PROMPT, max_new_tokens=5)
    after = runtime.load(os.path.relpath(moved, elsewhere))(
        mixed_images(), prompt=VQA_PROMPT, max_new_tokens=5
    )
    assert before == after


def test_family_is_detected_from_config():
    opt = {"model_type": "blip-2", "text_config": {"model_type": "opt"}}
    assert detect_family(opt).name == "blip-2"
    assert detect_family({**opt, "architectures": ["Blip2ForConditionalGeneration"]}).name == "blip-2"
    flan = {"model_type": "blip-2", "text_config": {"model_type": "t5"}}
    retrieval = {**opt, "architectures": ["Blip2ForImageTextRetrieval"]}
    for config in (flan, retrieval):
        with pytest.raises(UnsupportedModelError, match="not a supported family"):
            detect_family(config)
