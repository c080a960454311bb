"""Prompt accuracy: scoring, prompt sampling, latents, and the shipped captioner as the reader."""

from __future__ import annotations

import numpy as np
import pytest

from modelkiln.fixtures import shapes
from modelkiln.validation.prompt_accuracy import (
    PromptAccuracyConfig,
    flat_figures,
    prompt_accuracy,
    prompt_sample,
    score,
    seeded_latents,
    shipped_reader,
)


def test_every_prompt_parses_back_to_its_attributes():
    every = shapes.every_caption()
    assert (
        len(every) == len(set(every)) == 138
    )  # 2 sizes x 6 colours x 3 shapes x 4 backgrounds, minus blue on blue
    assert all(shapes.parse(a.caption) == a for a in every)
    for broken in (
        "",
        "a small red circle",
        "a huge red circle on a white background",
        "a small red circle on a red",
    ):
        assert shapes.parse(broken) is None


def test_sample_is_fixed_and_covers_every_value():
    sample = prompt_sample(24)
    assert sample == prompt_sample(24) and len(set(sample)) == 24
    for name, values in (("size", shapes.SIZES), ("colour", shapes.FOREGROUNDS), ("shape", shapes.SHAPES)):
        assert {getattr(a, name) for a in sample} == set(values)
    assert prompt_sample(None) == shapes.every_caption() == prompt_sample(500)
    with pytest.raises(ValueError, match="at least 1"):
        prompt_sample(0)


def test_latents_are_seeded_standard_normal():
    first, again = seeded_latents(5, (4, 12, 12)), seeded_latents(5, (4, 12, 12))
    assert first.dtype == np.float32 and np.array_equal(first, again)
    assert not np.array_equal(first, seeded_latents(6, (4, 12, 12)))


def test_score_counts_exact_and_each_attribute():
    prompts = shapes.every_caption()[:4]
    captions = [
        prompts[0].caption,  # right
        prompts[1].caption.replace(prompts[1].colour, "purple" if prompts[1].colour != "purple" else "red"),
        "",  # nothing read back: every attribute wrong
        prompts[3].caption,
    ]
    report = score(prompts, captions)
    assert report["exact"] == 0.5
    assert report["attributes"] == {"size": 0.75, "colour": 0.5, "shape": 0.75, "background": 0.75}
    assert report["weakest"] == "colour"
    assert [miss["caption"] for miss in report["misses"]] == captions[1:3]
    assert flat_figures(report)["prompt_accuracy_colour"] == 0.5


@pytest.fixture(scope="module")
def reader():
    pytest.importorskip("transformers")
    return shipped_reader()


def _painter(colour_of=lambda attributes: attributes.colour):
    """A perfect "text-to-image model": it draws each prompt with the shapes renderer itself, seeded
    by its latents, painting the colour ``colour_of`` picks."""

    def generate(prompts: list[str], latents: np.ndarray):
        images = []
        for prompt, latent in zip(prompts, latents, strict=True):
            wanted = shapes.parse(prompt)
            painted = shapes.Attributes(wanted.size, colour_of(wanted), wanted.shape, wanted.background)
            rng = np.random.default_rng(int(abs(latent).sum() * 1000))
            images.append(shapes.render(painted, (48, 48), rng))
        return images

    return generate


def test_drawn_prompts_read_back_almost_always(reader):
    # The shapes drawn exactly as asked: the captioner is the only source of error (98% on held-out drawings).
    report = prompt_accuracy(_painter(), reader, (4, 12, 12), PromptAccuracyConfig(prompts=36, batch=12))
    assert report["exact"] >= 0.9, report["misses"]
    assert report["prompts"] == 36 and report["images"] == 36


def test_a_model_that_gets_colours_wrong_is_caught(reader):
    def swap(attributes):
        return "orange" if attributes.colour == "red" else "red"

    config = PromptAccuracyConfig(prompts=24, batch=12)
    report = prompt_accuracy(_painter(swap), reader, (4, 12, 12), config)
    assert report["attributes"]["colour"] <= 0.1
    assert report["weakest"] == "colour" and report["exact"] <= 0.1
    assert report["attributes"]["shape"] >= 0.8
