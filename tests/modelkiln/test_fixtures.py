"""The shipped fixtures: the shapes data set is deterministic and varied, the captioner loads and is right."""

from __future__ import annotations

import pytest
from PIL import ImageChops

from modelkiln.fixtures import CAPTIONER_DIR, shapes

# Far above the training stream (below 10_000_000) and the training script's own evaluation range.
TEST_SEED_START = 20_000_000
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}


def test_draw_is_deterministic():
    first_image, first_caption = shapes.draw(1234)
    second_image, second_caption = shapes.draw(1234)
    assert first_caption == second_caption
    assert first_image.size == second_image.size
    assert ImageChops.difference(first_image, second_image).getbbox() is None


def test_draw_is_varied():
    samples = shapes.dataset(300, seed=0)
    sizes = {image.size for image, _ in samples}
    assert {image.mode for image, _ in samples} == {"RGB"}
    assert len(sizes) > 100
    assert any(width != height for width, height in sizes)
    assert all(48 <= side <= 96 for size in sizes for side in size)
    assert all(max(size) / min(size) <= shapes.MAX_ASPECT for size in sizes)
    words = {word for _, text in samples for word in text.split()}
    assert set(shapes.SHAPES) | set(shapes.SIZES) | set(shapes.FOREGROUNDS) <= words
    assert set(shapes.BACKGROUNDS) <= words


def test_captions_have_one_form():
    for _, text in shapes.dataset(300, seed=100):
        article, size, colour, shape, on, article_2, background, last = text.split(" ")
        assert (article, on, article_2, last) == ("a", "on", "a", "background")
        assert size in shapes.SIZES and shape in shapes.SHAPES
        assert colour in shapes.FOREGROUNDS and background in shapes.BACKGROUNDS
        assert colour != background


def test_dataset_uses_consecutive_seeds():
    pairs = shapes.dataset(3, seed=50)
    assert [text for _, text in pairs] == [shapes.draw(seed)[1] for seed in (50, 51, 52)]


def test_fixture_is_small_flat_and_pickle_free():
    files = list(CAPTIONER_DIR.iterdir())
    assert all(path.is_file() for path in files)
    assert sum(path.stat().st_size for path in files) <= 10 * 1024 * 1024
    assert not {path.suffix for path in files} & PICKLE_SUFFIXES
    names = {path.name for path in files}
    assert {"config.json", "model.safetensors", "generation_config.json"} <= names
    assert {"tokenizer.json", "preprocessor_config.json", "training.json"} <= names


@pytest.fixture(scope="module")
def captioner():
    transformers = pytest.importorskip("transformers")
    model = transformers.VisionEncoderDecoderModel.from_pretrained(CAPTIONER_DIR).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(CAPTIONER_DIR)
    processor = transformers.ViTImageProcessorPil.from_pretrained(CAPTIONER_DIR)
    return model, tokenizer, processor


def test_every_caption_word_is_in_the_vocabulary_and_the_tokenizer(captioner):
    _, tokenizer, _ = captioner
    vocab = tokenizer.get_vocab()
    for _, text in shapes.dataset(300, seed=200):
        assert set(text.split()) <= set(shapes.VOCABULARY)
    assert set(shapes.VOCABULARY) <= set(vocab)


def test_tokenizer_round_trips_captions(captioner):
    _, tokenizer, _ = captioner
    text = shapes.draw(7)[1]
    ids = [tokenizer.bos_token_id, *tokenizer(text)["input_ids"], tokenizer.eos_token_id]
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_captioner_is_accurate_on_held_out_images(captioner):
    torch = pytest.importorskip("torch")
    model, tokenizer, processor = captioner
    samples = shapes.dataset(60, seed=TEST_SEED_START)
    pixels = processor([image for image, _ in samples], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        generated = model.generate(pixel_values=pixels)
    predicted = tokenizer.batch_decode(generated, skip_special_tokens=True)
    correct = sum(guess == text for (_, text), guess in zip(samples, predicted, strict=True))
    assert correct / len(samples) >= 0.9, list(zip(predicted, [text for _, text in samples], strict=True))
