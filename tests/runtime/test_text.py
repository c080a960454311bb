"""Parity of modelkiln.runtime.text.TextCodec with transformers tokenizers saved by save_pretrained.

The tokenizers are trained in-process on a few sentences (no hub downloads): a GPT-2 style byte-level BPE,
a WordLevel whitespace tokenizer and a BERT style WordPiece one like BLIP's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from modelkiln.errors import ArtifactError
from modelkiln.runtime.text import TextCodec

transformers = pytest.importorskip("transformers")

CORPUS = [
    "A dog runs on the grass.",
    "Two cats aren't sleeping on the red sofa!",
    "a red car, parked near the house?",
    "I'm here, you're there; we've gone and it's late.",
    "A man riding a wave on top of a surfboard .",
    "Café déjà vu: naïve résumé — 東京 🚗",
]
TEXTS = [
    "a picture of",
    "A dog isn't here , ok ? yes !",
    "Two  spaces and\ttabs\nnewlines",
    "unknownword zzz qqq",
    "Café 東京 🚗 déjà",
    "",
    " leading space",
]


def _gpt2_style(clean_up: bool):
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(CORPUS, trainer)
    return transformers.GPT2TokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        clean_up_tokenization_spaces=clean_up,
    )


def _word_level():
    words = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordLevelTrainer(special_tokens=["[UNK]", "<s>", "</s>", "<pad>"])
    words.train_from_iterator(CORPUS, trainer)
    words.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=words,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="[UNK]",
        clean_up_tokenization_spaces=True,
    )


def _bert_like():
    pieces = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    pieces.normalizer = normalizers.BertNormalizer(lowercase=True)
    pieces.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    pieces.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(
        vocab_size=260, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    )
    pieces.train_from_iterator(CORPUS, trainer)
    cls_id, sep_id = pieces.token_to_id("[CLS]"), pieces.token_to_id("[SEP]")
    pieces.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    # BLIP's tokenizer: BERT plus a [DEC] bos token and an [ENC] extra special token.
    return transformers.BertTokenizerFast(
        tokenizer_object=pieces,
        bos_token="[DEC]",
        extra_special_tokens=["[ENC]"],
        clean_up_tokenization_spaces=True,
    )


BUILDERS = {
    "gpt2-bpe": lambda: _gpt2_style(clean_up=False),
    "gpt2-bpe-cleanup-ignored": lambda: _gpt2_style(clean_up=True),
    "word-level": _word_level,
    "bert-wordpiece": _bert_like,
}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def saved(request, tmp_path_factory):
    """(in-memory tokenizer, tokenizer reloaded from disk, TextCodec) for one saved tokenizer."""
    directory = tmp_path_factory.mktemp(request.param)
    built = BUILDERS[request.param]()
    built.save_pretrained(directory)
    reloaded = transformers.AutoTokenizer.from_pretrained(directory)
    return built, reloaded, TextCodec.from_dir(directory)


def _id_sequences(tokenizer) -> list[list[int]]:
    rng = np.random.default_rng(7)
    size = len(tokenizer)
    special = sorted(set(tokenizer.all_special_ids))
    sequences = [[], special, special[::-1] * 2]
    for length in (1, 2, 5, 12, 30):
        for _ in range(6):
            ids = rng.integers(0, size, length).tolist()
            # Sprinkle special tokens at the start, the end and in between, as generation produces them.
            ids = [int(rng.choice(special)), *ids, int(rng.choice(special))]
            ids.insert(int(rng.integers(0, len(ids))), int(rng.choice(special)))
            sequences.append(ids)
    sequences += [tokenizer(text).input_ids for text in TEXTS]
    return sequences


def test_decode_matches_transformers(saved):
    built, reloaded, codec = saved
    sequences = _id_sequences(built)
    for reference in (built, reloaded):
        expected = reference.batch_decode(sequences, skip_special_tokens=True)
        assert codec.batch_decode(sequences) == expected
        assert [codec.decode(ids) for ids in sequences[1:6]] == [
            reference.decode(ids, skip_special_tokens=True) for ids in sequences[1:6]
        ]


def test_decode_accepts_numpy_ids(saved):
    built, _, codec = saved
    ids = np.asarray(built("a red car, parked").input_ids, dtype=np.int64)
    assert codec.decode(ids) == built.decode(ids.tolist(), skip_special_tokens=True)
    assert codec.batch_decode(np.stack([ids, ids])) == [codec.decode(ids)] * 2
    assert codec.batch_decode([]) == []


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_transformers(saved, add_special_tokens):
    built, reloaded, codec = saved
    for text in TEXTS + CORPUS:
        expected = reloaded(text, add_special_tokens=add_special_tokens).input_ids
        assert expected == built(text, add_special_tokens=add_special_tokens).input_ids
        assert codec.encode(text, add_special_tokens=add_special_tokens) == expected


def test_special_token_ids_match_transformers(saved):
    _, reloaded, codec = saved
    for name in ("bos", "eos", "pad", "unk", "sep", "cls", "mask"):
        assert getattr(codec, f"{name}_token_id") == getattr(reloaded, f"{name}_token_id"), name
    assert codec.vocab_size == len(reloaded)


def test_bpe_ignores_clean_up_like_transformers(tmp_path):
    tokenizer = _gpt2_style(clean_up=True)
    tokenizer.save_pretrained(tmp_path)
    ids = tokenizer("Two cats aren't sleeping , ok ?").input_ids
    decoded = TextCodec.from_dir(tmp_path).decode(ids)
    assert decoded == "Two cats aren't sleeping , ok ?"  # spaces before punctuation kept for BPE
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"] = True
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    forced = transformers.AutoTokenizer.from_pretrained(tmp_path).decode(ids, skip_special_tokens=True)
    assert TextCodec.from_dir(tmp_path).decode(ids) == forced == "Two cats aren't sleeping, ok?"


def test_legacy_special_tokens_map_is_honoured(tmp_path):
    tokenizer = _word_level()
    tokenizer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del config["pad_token"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": {"content": "<pad>"}}))
    reloaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    codec = TextCodec.from_dir(tmp_path)
    assert codec.pad_token_id == reloaded.pad_token_id == 3


def test_missing_or_broken_files_raise_artifact_error(tmp_path):
    with pytest.raises(ArtifactError, match=r"tokenizer\.json is missing.*Re-export the artifact"):
        TextCodec.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ArtifactError, match=r"tokenizer\.json cannot be read.*re-export"):
        TextCodec.from_dir(tmp_path)
    _word_level().save_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").unlink()
    with pytest.raises(ArtifactError, match=r"tokenizer_config\.json is missing"):
        TextCodec.from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(ArtifactError, match=r"tokenizer_config\.json must hold a JSON object"):
        TextCodec.from_dir(tmp_path)


def test_bad_ids_are_rejected(tmp_path: Path):
    _word_level().save_pretrained(tmp_path)
    codec = TextCodec.from_dir(tmp_path)
    with pytest.raises(ValueError, match="non-negative"):
        codec.decode([1, -2])
    with pytest.raises(TypeError, match="use batch_decode"):
        codec.decode([[1, 2]])
    with pytest.raises(TypeError, match="sequence of integers"):
        codec.decode("12")
    with pytest.raises(TypeError, match="expects a str"):
        codec.encode(["a"])
