"""The numpy generation loop against transformers' ``model.generate``, token for token, on tiny models.

A torch-backed :class:`StepDecoder` feeds the models exactly what ``generate`` feeds them (cache, position
ids, mask), so any difference in the chosen tokens comes from the loop itself: processors, beam bookkeeping
or stopping rules.
"""

import ast
import inspect
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (
    GenerationConfig,
    GPT2Config,
    GPT2LMHeadModel,
    VisionEncoderDecoderModel,
    ViTConfig,
    ViTModel,
)
from transformers.modeling_outputs import BaseModelOutput

from modelkiln.errors import GenerationConfigError
from modelkiln.runtime import generation
from modelkiln.runtime.generation import GenerationSettings, generate

VOCAB, PAD, BOS, EOS = 64, 0, 1, 2
NEW_TOKENS = 8
# Three left-padded prompts of different lengths, as a tokenizer with padding_side="left" makes them.
PROMPT_IDS = np.array([[5, 6, 7, 8, 9], [PAD, PAD, 10, 11, 12], [PAD, 13, 14, 15, 16]], dtype=np.int64)
PROMPT_MASK = (np.arange(5)[None, :] >= np.array([[0], [2], [1]])).astype(np.int64)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # Tiny models run ~10x faster on one thread than fighting over shared cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _gpt2(cross_attention: bool = False) -> GPT2LMHeadModel:
    config = GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=VOCAB,
        n_positions=64,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
        add_cross_attention=cross_attention,
        is_decoder=cross_attention,
        initializer_range=0.3,  # large weights so the image changes the caption
    )
    return GPT2LMHeadModel(config)


def _bias_eos(model: GPT2LMHeadModel, eos_bias: float) -> None:
    # A seeded head with a bias on EOS, so rows and beams end early and at different steps.
    head = torch.nn.Linear(32, VOCAB, bias=True)
    with torch.no_grad():
        head.bias.zero_()
        head.bias[EOS] = eos_bias
    model.lm_head = head


def _language_model(eos_bias: float) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    model = _gpt2()
    _bias_eos(model, eos_bias)
    return model.eval()


@pytest.fixture(scope="module")
def models():
    return {"lm": _language_model(0.0), "eos_lm": _language_model(0.8)}


@pytest.fixture(scope="module")
def captioner() -> VisionEncoderDecoderModel:
    torch.manual_seed(0)
    vit = ViTConfig(
        image_size=16,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        initializer_range=0.3,
    )
    model = VisionEncoderDecoderModel(encoder=ViTModel(vit, add_pooling_layer=False), decoder=_gpt2(True))
    _bias_eos(model.decoder, 0.6)  # after wrapping: VisionEncoderDecoderModel re-initialises weights
    model.generation_config.update(decoder_start_token_id=BOS, pad_token_id=PAD, eos_token_id=EOS)
    return model.eval()


class TorchStepDecoder:
    """A StepDecoder that runs a transformers model with the inputs ``model.generate`` would give it."""

    def __init__(self, model, encoder_states: torch.Tensor | None = None):
        self.model, self.encoder_states, self.cache = model, encoder_states, None
        self.last_logits_only = "logits_to_keep" in inspect.signature(model.forward).parameters

    def expand(self, n: int) -> None:
        if self.encoder_states is not None:
            self.encoder_states = self.encoder_states.repeat_interleave(n, dim=0)

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        ids, mask = torch.from_numpy(input_ids), torch.from_numpy(attention_mask)
        # generate passes no mask when nothing is padded; the masked attention path rounds differently.
        given_mask = None if bool(mask.all()) else mask
        if self.encoder_states is not None:
            encoded = BaseModelOutput(last_hidden_state=self.encoder_states)
            inputs = {
                "decoder_input_ids": ids,
                "decoder_attention_mask": given_mask,
                "encoder_outputs": encoded,
            }
        else:
            positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, -ids.shape[1] :]
            inputs = {"input_ids": ids, "attention_mask": given_mask, "position_ids": positions}
        if self.last_logits_only:
            inputs["logits_to_keep"] = 1
        with torch.no_grad():
            out = self.model(**inputs, past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        return out.logits[:, -1].float().numpy()

    def reorder(self, beam_idx: np.ndarray) -> None:
        self.cache.reorder_cache(torch.from_numpy(beam_idx))


def _config_json(model) -> dict:
    return json.loads(model.generation_config.to_json_string())


def _until_eos(rows: list[list[int]], eos: tuple[int, ...]) -> list[list[int]]:
    """transformers' output rows cut after the first EOS (the rest is padding)."""
    cut = []
    for row in rows:
        ends = [i for i, token in enumerate(row) if token in eos]
        cut.append(row[: ends[0] + 1] if ends else row)
    return cut


def _compare_lm(model, overrides: dict, ids=PROMPT_IDS, mask=PROMPT_MASK) -> list[list[int]]:
    settings = GenerationSettings.from_generation_config(
        _config_json(model), ids.shape[1], max_new_tokens=NEW_TOKENS, **overrides
    )
    ours = generate(TorchStepDecoder(model), ids, mask, settings)
    with torch.no_grad():
        out = model.generate(
            torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            max_new_tokens=NEW_TOKENS,
            **overrides,
        )
    theirs = _until_eos(out[:, ids.shape[1] :].tolist(), settings.eos_token_ids)
    assert ours == theirs
    return ours


BEAM_GRID = [
    {"num_beams": beams, "length_penalty": penalty, "early_stopping": stopping}
    for beams, penalty, stopping in itertools.product([2, 4], [1.0, 0.0, 2.0], [True, False, "never"])
]
PROCESSOR_CASES = [
    {},
    {"min_new_tokens": 4},
    {"repetition_penalty": 1.5},
    {"no_repeat_ngram_size": 2},
    {"eos_token_id": [EOS, 7, 9]},
    {"num_beams": 3, "min_new_tokens": 4},
    {"num_beams": 3, "repetition_penalty": 1.5},
    {"num_beams": 3, "no_repeat_ngram_size": 2},
    {"num_beams": 2, "eos_token_id": [EOS, 7, 9], "early_stopping": True},
    {"num_beams": 3, "repetition_penalty": 0.7, "no_repeat_ngram_size": 3, "length_penalty": -0.5},
]


@pytest.mark.parametrize("overrides", BEAM_GRID + PROCESSOR_CASES, ids=str)
@pytest.mark.parametrize("name", ["lm", "eos_lm"])
def test_matches_transformers_generate(models, name, overrides):
    _compare_lm(models[name], overrides)


@pytest.mark.parametrize("overrides", [{}, {"num_beams": 3}], ids=str)
def test_matches_transformers_for_a_single_unpadded_row(models, overrides):
    _compare_lm(models["eos_lm"], overrides, PROMPT_IDS[:1], PROMPT_MASK[:1])


def test_eos_model_finishes_rows_and_beams_early(models):
    # Guards the fixture: the EOS cases above only mean something if rows really stop at different steps.
    greedy = _compare_lm(models["eos_lm"], {})
    beams = _compare_lm(models["eos_lm"], {"num_beams": 2, "early_stopping": True})
    assert len({len(row) for row in greedy}) > 1
    assert min(len(row) for row in beams) < NEW_TOKENS
    assert all(row[-1] == EOS for row in greedy if len(row) < NEW_TOKENS)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"num_beams": 3},
        {"num_beams": 2, "early_stopping": True, "length_penalty": 2.0},
        {"num_beams": 4, "early_stopping": "never"},
        {"num_beams": 3, "max_new_tokens": 4},
    ],
    ids=str,
)
def test_encoder_decoder_counts_the_decoder_prompt_in_max_length(captioner, overrides):
    pixels = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        encoded = captioner.get_encoder()(pixel_values=pixels).last_hidden_state
        out = captioner.generate(pixels, max_length=8, **overrides)
    start = np.full((3, 1), BOS, dtype=np.int64)
    settings = GenerationSettings.from_generation_config(
        _config_json(captioner), prompt_length=1, max_length=8, **overrides
    )
    ours = generate(TorchStepDecoder(captioner, encoded), start, np.ones_like(start), settings)
    assert settings.max_new_tokens == overrides.get("max_new_tokens", 7)  # max_length 8 minus the start token
    assert ours == _until_eos(out[:, 1:].tolist(), (EOS,))


def _sample(model, **overrides) -> list[list[int]]:
    settings = GenerationSettings(
        max_new_tokens=NEW_TOKENS, eos_token_ids=(EOS,), pad_token_id=PAD, **overrides
    )
    return generate(TorchStepDecoder(model), PROMPT_IDS, PROMPT_MASK, settings)


def test_sampling_is_reproducible_per_seed(models):
    first = _sample(models["lm"], do_sample=True, seed=7, temperature=1.5)
    assert _sample(models["lm"], do_sample=True, seed=7, temperature=1.5) == first
    assert _sample(models["lm"], do_sample=True, seed=8, temperature=1.5) != first


@pytest.mark.parametrize("warper", [{"top_k": 1}, {"top_p": 1e-6}], ids=str)
def test_sampling_with_one_candidate_is_greedy(models, warper):
    assert _sample(models["lm"], do_sample=True, seed=3, **warper) == _sample(models["lm"])


@pytest.mark.parametrize(
    ("config", "prompt_length", "overrides", "max_new", "min_new"),
    [
        ({"max_length": 10}, 4, {}, 6, 0),
        ({"max_length": 10, "max_new_tokens": 3}, 4, {}, 3, 0),
        ({"max_new_tokens": 3}, 4, {"max_length": 30}, 3, 0),
        ({"max_length": 10}, 1, {"max_new_tokens": None, "max_length": None}, 9, 0),
        ({}, 7, {}, 20, 0),
        ({"min_length": 6}, 4, {}, 20, 2),
        ({"min_length": 6, "min_new_tokens": 1}, 4, {}, 20, 1),
    ],
)
def test_lengths_follow_transformers(config, prompt_length, overrides, max_new, min_new):
    settings = GenerationSettings.from_generation_config(config, prompt_length, **overrides)
    assert (settings.max_new_tokens, settings.min_new_tokens) == (max_new, min_new)


def test_tokens_and_overrides_are_read():
    config = {"eos_token_id": [2, 5], "num_beams": 4, "length_penalty": 0.5, "early_stopping": "never"}
    settings = GenerationSettings.from_generation_config(
        config, 1, num_beams=None, length_penalty=2.0, seed=3
    )
    assert settings.eos_token_ids == (2, 5) and settings.pad_token_id == 2
    assert (settings.num_beams, settings.length_penalty, settings.early_stopping) == (4, 2.0, "never")
    assert settings.seed == 3
    single = GenerationSettings.from_generation_config({"eos_token_id": 9, "pad_token_id": 0}, 1)
    assert (single.eos_token_ids, single.pad_token_id) == ((9,), 0)


def test_every_transformers_default_is_accepted():
    defaults = GenerationConfig(**GenerationConfig._get_default_generation_params()).to_dict()
    # max_length=20 counts the one-token prompt.
    assert GenerationSettings.from_generation_config(defaults, 1) == GenerationSettings(max_new_tokens=19)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("num_beam_groups", 2),
        ("diversity_penalty", 0.5),
        ("constraints", [[3]]),
        ("bad_words_ids", [[3]]),
        ("forced_bos_token_id", 1),
        ("forced_eos_token_id", 2),
        ("suppress_tokens", [4]),
        ("exponential_decay_length_penalty", [5, 1.1]),
        ("num_return_sequences", 2),
        ("guidance_scale", 1.5),
        ("penalty_alpha", 0.6),
        ("renormalize_logits", True),
    ],
)
def test_unsupported_features_are_refused(key, value):
    with pytest.raises(GenerationConfigError, match=rf"`{key}=.*does not implement"):
        GenerationSettings.from_generation_config({key: value}, 1)
    with pytest.raises(GenerationConfigError, match=f"`{key}="):
        GenerationSettings.from_generation_config({}, 1, **{key: value})


def test_sampling_filters_matter_only_when_sampling():
    assert GenerationSettings.from_generation_config({"typical_p": 0.9}, 1).do_sample is False
    with pytest.raises(GenerationConfigError, match="typical_p"):
        GenerationSettings.from_generation_config({"typical_p": 0.9, "do_sample": True}, 1)


@pytest.mark.parametrize("source", ["config", "override"])
def test_unknown_keys_are_refused(source):
    config, overrides = ({"beam_width": 3}, {}) if source == "config" else ({}, {"beam_width": 3})
    with pytest.raises(GenerationConfigError, match="beam_width"):
        GenerationSettings.from_generation_config(config, 1, **overrides)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"num_beams": 0}, "num_beams"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"temperature": 0.0}, "temperature"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"early_stopping": "sometimes"}, "early_stopping"),
        ({"eos_token_ids": (-1,)}, "eos_token_ids"),
        ({"do_sample": True, "num_beams": 2}, "Beam sampling is not supported"),
    ],
)
def test_invalid_values_are_refused(fields, message):
    with pytest.raises(GenerationConfigError, match=message):
        GenerationSettings(**fields)


def test_max_length_must_leave_room_after_the_prompt():
    with pytest.raises(GenerationConfigError, match=r"max_length=5.*5-token prompt"):
        GenerationSettings.from_generation_config({"max_length": 5}, 5)


def test_prompt_and_mask_shapes_must_agree(models):
    with pytest.raises(ValueError, match="prompt_mask"):
        generate(TorchStepDecoder(models["lm"]), PROMPT_IDS, PROMPT_MASK[:, 1:], GenerationSettings())


def test_module_does_not_import_torch_or_transformers():
    tree = ast.parse(Path(generation.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not {name.split(".")[0] for name in imported} & {"torch", "transformers"}
