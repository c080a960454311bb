"""Token generation for modelkiln's ONNX runtimes, in plain numpy.

Every captioning family (ViT-GPT2, BLIP, BLIP-2) decodes text the same way: run the decoder one token at a
time and pick the next token greedily, by beam search or by seeded sampling. This module is that loop, with
no PyTorch or transformers import so it runs on edge boxes that only have onnxruntime. Greedy and beam
search pick token-for-token what transformers 5 ``model.generate`` picks from the same logits: the beam
bookkeeping, length penalty, ``early_stopping`` rules, EOS lists and logits processors follow its semantics.

A model runtime implements :class:`StepDecoder` (its decoder session plus its key/value cache) and calls::

    settings = GenerationSettings.from_generation_config(config_json, prompt_length=ids.shape[1], num_beams=3)
    token_lists = generate(decoder, ids, mask, settings)  # one list of new token ids per prompt row

``ids``/``mask`` are the decoder prompt (the decoder start token for encoder-decoder models, the text
prompt for decoder-only ones, left padded). The result holds only generated tokens, EOS included when one
was generated, and no padding.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from modelkiln.errors import GenerationConfigError

# transformers marks impossible beam scores with this finite value (not -inf) so sums stay comparable; the
# same float32 constant keeps ties and orderings identical to it.
_IMPOSSIBLE = np.float32(-1.0e9)

# transformers generates 20 new tokens when neither max_length nor max_new_tokens is set.
_DEFAULT_NEW_TOKENS = 20


class StepDecoder(Protocol):
    """One decoder plus its cache, stepped by :func:`generate`. Model runtimes implement this."""

    def expand(self, n: int) -> None:
        """Before the first step: batch row ``i`` becomes rows ``i*n .. i*n+n-1`` (beam copies)."""

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Run the decoder on new tokens and append them to the cache.

        ``input_ids`` int64 [B, T_new] is the whole prompt on the first call, then one token per row;
        ``attention_mask`` int64 [B, T_past + T_new]. Returns float logits [B, vocab] for the last position.
        """

    def reorder(self, beam_idx: np.ndarray) -> None:
        """Cache row ``j`` becomes old row ``beam_idx[j]`` (int64 [B])."""


@dataclass(frozen=True)
class GenerationSettings:
    """How :func:`generate` decodes. Defaults are transformers' global generation defaults."""

    # Most tokens generated after the prompt (transformers' max_length minus the decoder prompt length).
    max_new_tokens: int = _DEFAULT_NEW_TOKENS
    # EOS tokens are masked out until this many tokens were generated.
    min_new_tokens: int = 0
    # 1 decodes greedily (or samples); more runs beam search with that many beams.
    num_beams: int = 1
    # Finished beam scores are divided by generated_length ** length_penalty; > 0 favours longer captions.
    length_penalty: float = 1.0
    # Beam search: True stops filling a row once it has num_beams finished hypotheses; all modes stop a row
    # once its best live beam cannot beat its worst finished one, judged at the current length (True, False)
    # or, for "never" with a positive length_penalty, at max length.
    early_stopping: bool | Literal["never"] = False
    # Draw tokens from the warped distribution instead of taking the argmax (num_beams must be 1).
    do_sample: bool = False
    # Sampling only: logits are divided by this before top-k / top-p.
    temperature: float = 1.0
    # Sampling only: keep the k most likely tokens (50 is transformers' default too); 0 keeps all.
    top_k: int = 50
    # Sampling only: keep the smallest set of tokens whose probability reaches top_p; 1.0 keeps all.
    top_p: float = 1.0
    # > 1 makes tokens already in the sequence (prompt included) less likely; 1.0 is off.
    repetition_penalty: float = 1.0
    # Forbid repeating any n-gram of this size (prompt included); 0 is off.
    no_repeat_ngram_size: int = 0
    # A row finishes when it generates any of these; empty means rows only stop at max_new_tokens.
    eos_token_ids: tuple[int, ...] = ()
    # Fed to rows that already finished; None falls back to the first EOS id.
    pad_token_id: int | None = None
    # Seed for numpy.random.default_rng when sampling; None draws a fresh seed each call.
    seed: int | None = None

    def __post_init__(self) -> None:
        # Accept a bare id, None or a list for convenience, but store a hashable tuple.
        object.__setattr__(self, "eos_token_ids", _eos_tuple(self.eos_token_ids, "eos_token_ids"))
        _validate_settings(self)

    @classmethod
    def from_generation_config(
        cls, config: Mapping[str, Any], prompt_length: int, **overrides: Any
    ) -> GenerationSettings:
        """Read a ``generation_config.json`` dict the way ``model.generate(**overrides)`` would.

        ``prompt_length`` is the decoder prompt length (1 for a lone decoder start token): ``max_length`` and
        ``min_length`` count it, ``max_new_tokens``/``min_new_tokens`` do not and win over them. Overrides
        use the config's key names (plus ``seed``); a None override keeps the config's value. Settings this
        loop does not implement raise :class:`GenerationConfigError` instead of being ignored. Unlike
        transformers, the 20-token default is not capped at the model's ``max_position_embeddings``.
        """
        if not isinstance(prompt_length, int) or prompt_length < 1:
            raise GenerationConfigError(f"prompt_length must be a positive integer, got {prompt_length!r}.")
        merged = _merge_config(config, overrides)
        _reject_unsupported(merged)
        eos = _eos_tuple(merged.get("eos_token_id"))
        pad = merged.get("pad_token_id")
        plain = {key: merged[key] for key in _PLAIN_KEYS if merged.get(key) is not None}
        return cls(
            max_new_tokens=_max_new_tokens(merged, prompt_length),
            min_new_tokens=_min_new_tokens(merged, prompt_length),
            eos_token_ids=eos,
            pad_token_id=eos[0] if pad is None and eos else pad,
            seed=merged.get("seed"),
            **plain,
        )


# --- reading generation_config.json ------------------------------------------------------------------------

# Keys copied as they are into GenerationSettings fields of the same name.
_PLAIN_KEYS = (
    "num_beams",
    "length_penalty",
    "early_stopping",
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "repetition_penalty",
    "no_repeat_ngram_size",
)
_LENGTH_KEYS = (
    "max_length",
    "max_new_tokens",
    "min_length",
    "min_new_tokens",
    "eos_token_id",
    "pad_token_id",
)

# Keys that never change which tokens come out: token ids the caller uses to build the prompt, cache and
# compile tuning, extra outputs, assistant tuning (only read with an assistant model) and file metadata.
_NO_EFFECT_KEYS = frozenset(
    {
        "bos_token_id",
        "decoder_start_token_id",
        "use_cache",
        "cache_implementation",
        "cache_config",
        "max_cache_len",
        "return_legacy_cache",
        "compile_config",
        "disable_compile",
        "continuous_batching_config",
        "prefill_chunk_size",
        "output_attentions",
        "output_hidden_states",
        "output_scores",
        "output_logits",
        "return_dict_in_generate",
        "num_assistant_tokens",
        "num_assistant_tokens_schedule",
        "assistant_confidence_threshold",
        "assistant_lookbehind",
        "target_lookbehind",
        "max_matching_ngram_size",
        "transformers_version",
        "_from_model_config",
        "_commit_hash",
    }
)


def _is_set(value: Any) -> bool:
    return value is not None and value is not False and value != [] and value != ()


def _differs(default: Any) -> Callable[[Any], bool]:
    return lambda value: value is not None and value != default


# Generation features this loop does not implement: key -> (is it switched on?, what it is).
_UNSUPPORTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "num_beam_groups": (lambda v: v is not None and v > 1, "group (diverse) beam search"),
    "diversity_penalty": (_differs(0.0), "group (diverse) beam search"),
    "constraints": (_is_set, "constrained beam search"),
    "force_words_ids": (_is_set, "constrained beam search"),
    "penalty_alpha": (lambda v: v is not None and v > 0, "contrastive search"),
    "dola_layers": (_is_set, "DoLa decoding"),
    "low_memory": (_is_set, "sequential low-memory beam search"),
    "num_return_sequences": (lambda v: v is not None and v > 1, "returning several sequences per input"),
    "bad_words_ids": (_is_set, "banned word lists"),
    "sequence_bias": (_is_set, "sequence biasing"),
    "suppress_tokens": (_is_set, "token suppression"),
    "begin_suppress_tokens": (_is_set, "token suppression at the first step"),
    "forced_bos_token_id": (_is_set, "forcing a first token"),
    "forced_eos_token_id": (_is_set, "forcing EOS at max length"),
    "forced_decoder_ids": (_is_set, "forced decoder ids"),
    "exponential_decay_length_penalty": (_is_set, "exponential decay length penalty"),
    "encoder_repetition_penalty": (_differs(1.0), "encoder repetition penalty"),
    "encoder_no_repeat_ngram_size": (lambda v: v is not None and v > 0, "encoder n-gram blocking"),
    "renormalize_logits": (_is_set, "renormalising processed logits"),
    "remove_invalid_values": (_is_set, "replacing nan/inf logits"),
    "guidance_scale": (_differs(1.0), "classifier-free guidance"),
    "watermarking_config": (_is_set, "watermarking"),
    "token_healing": (_is_set, "token healing"),
    "max_time": (_is_set, "a time limit"),
    "stop_strings": (_is_set, "stop strings"),
    "is_assistant": (_is_set, "running as an assistant model"),
    "use_mtp": (_is_set, "multi-token prediction"),
    "prompt_lookup_num_tokens": (_is_set, "prompt lookup decoding"),
    "assistant_early_exit": (_is_set, "early-exit assisted decoding"),
    "assistant_ensemble_weight": (_is_set, "ensemble speculative decoding"),
    "speculation_type": (_is_set, "speculative decoding"),
}

# Warpers transformers applies only when sampling, so they are harmless while do_sample is off.
_UNSUPPORTED_WARPERS: dict[str, Callable[[Any], bool]] = {
    "min_p": _is_set,
    "top_h": _is_set,
    "typical_p": _differs(1.0),
    "epsilon_cutoff": _differs(0.0),
    "eta_cutoff": _differs(0.0),
}

_KNOWN_KEYS = frozenset(
    {*_PLAIN_KEYS, *_LENGTH_KEYS, *_NO_EFFECT_KEYS, *_UNSUPPORTED, *_UNSUPPORTED_WARPERS, "seed"}
)


def _merge_config(config: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Config values overlaid with the non-None overrides; unknown keys are errors."""
    if not isinstance(config, Mapping):
        raise GenerationConfigError(
            "The generation config must be the dict read from generation_config.json, "
            f"got {type(config).__name__}."
        )
    for source, keys in (("generation_config.json", config), ("overrides", overrides)):
        unknown = sorted(str(key) for key in keys if key not in _KNOWN_KEYS)
        if unknown:
            raise GenerationConfigError(
                f"Unknown generation setting(s) {unknown} in {source}: the modelkiln runtime does not know "
                "what they do, so it will not guess. Remove them, or use transformers' key names."
            )
    merged = dict(config)
    merged.update({key: value for key, value in overrides.items() if value is not None})
    return merged


def _reject_unsupported(merged: Mapping[str, Any]) -> None:
    checks = [(key, active, what) for key, (active, what) in _UNSUPPORTED.items()]
    if merged.get("do_sample"):
        checks += [(key, active, "this sampling filter") for key, active in _UNSUPPORTED_WARPERS.items()]
    for key, active, what in checks:
        value = merged.get(key)
        try:
            switched_on = active(value)
        except TypeError:
            raise GenerationConfigError(f"`{key}={value!r}` is not a valid value for {what}.") from None
        if switched_on:
            raise GenerationConfigError(
                f"`{key}={value!r}` asks for {what}, which the modelkiln runtime does not implement. "
                f"Remove `{key}` from generation_config.json (or override it with its default) to generate "
                "with greedy, beam or plain sampling decoding."
            )


def _eos_tuple(value: Any, name: str = "eos_token_id") -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    if isinstance(value, list | tuple) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return tuple(value)
    raise GenerationConfigError(f"`{name}` must be an integer or a list of integers, got {value!r}.")


def _max_new_tokens(merged: Mapping[str, Any], prompt_length: int) -> int:
    # transformers: max_new_tokens wins; max_length counts the (decoder) prompt; neither means 20 new.
    if merged.get("max_new_tokens") is not None:
        return merged["max_new_tokens"]
    max_length = merged.get("max_length")
    if max_length is None:
        return _DEFAULT_NEW_TOKENS
    if not isinstance(max_length, int) or max_length <= prompt_length:
        raise GenerationConfigError(
            f"`max_length={max_length!r}` leaves no room to generate after the {prompt_length}-token prompt "
            "(max_length counts the prompt). Raise max_length, or set max_new_tokens instead."
        )
    return max_length - prompt_length


def _min_new_tokens(merged: Mapping[str, Any], prompt_length: int) -> int:
    if merged.get("min_new_tokens") is not None:
        return merged["min_new_tokens"]
    min_length = merged.get("min_length")
    if min_length is None:
        return 0
    if not isinstance(min_length, int) or min_length < 0:
        raise GenerationConfigError(f"`min_length` must be a non-negative integer, got {min_length!r}.")
    return max(0, min_length - prompt_length)


# --- validating settings -----------------------------------------------------------------------------------


def _require_int(value: Any, name: str, minimum: int, hint: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise GenerationConfigError(f"`{name}` must be an integer >= {minimum}, got {value!r}: {hint}.")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _require_number(value: Any, name: str, rule: str, ok: Callable[[float], bool] = lambda _: True) -> None:
    if not _is_number(value) or not ok(value):
        raise GenerationConfigError(f"`{name}` must be {rule}, got {value!r}.")


def _validate_settings(s: GenerationSettings) -> None:
    _require_int(s.max_new_tokens, "max_new_tokens", 1, "generate at least one token")
    _require_int(s.min_new_tokens, "min_new_tokens", 0, "use 0 to allow EOS at once")
    _require_int(s.num_beams, "num_beams", 1, "use 1 for greedy or sampling, more for beam search")
    _require_int(s.top_k, "top_k", 0, "use 0 to disable top-k filtering")
    _require_int(s.no_repeat_ngram_size, "no_repeat_ngram_size", 0, "use 0 to allow repeats")
    _require_number(s.length_penalty, "length_penalty", "a finite number")
    _require_number(s.temperature, "temperature", "> 0", lambda v: v > 0)
    _require_number(s.top_p, "top_p", "in (0, 1]", lambda v: 0 < v <= 1)
    _require_number(s.repetition_penalty, "repetition_penalty", "> 0 (1.0 disables it)", lambda v: v > 0)
    if not (isinstance(s.early_stopping, bool) or s.early_stopping == "never"):
        raise GenerationConfigError(
            f"`early_stopping` must be True, False or 'never', got {s.early_stopping!r}."
        )
    if not isinstance(s.do_sample, bool):
        raise GenerationConfigError(f"`do_sample` must be True or False, got {s.do_sample!r}.")
    for token in (*s.eos_token_ids, *(() if s.pad_token_id is None else (s.pad_token_id,))):
        _require_int(token, "eos_token_ids/pad_token_id", 0, "token ids are vocabulary indices")
    if s.seed is not None:
        _require_int(s.seed, "seed", 0, "use None for a random seed")
    if s.do_sample and s.num_beams > 1:
        raise GenerationConfigError("Beam sampling is not supported: set num_beams=1 or do_sample=False.")


# --- logits processing -------------------------------------------------------------------------------------


def _process(
    scores: np.ndarray, seqs: np.ndarray, generated: int, skip: np.ndarray, s: GenerationSettings
) -> np.ndarray:
    """transformers' logits processors, in its order, on float32 scores [R, V] for sequences [R, L]."""
    if s.repetition_penalty != 1.0:
        scores = _penalise_repeats(scores, seqs, skip, s.repetition_penalty)
    if s.no_repeat_ngram_size > 0:
        scores = _ban_repeated_ngrams(scores, seqs, s.no_repeat_ngram_size)
    if generated < s.min_new_tokens and s.eos_token_ids:
        eos = [token for token in s.eos_token_ids if token < scores.shape[1]]
        scores = scores.copy()
        scores[:, eos] = -np.inf
    return scores


def _penalise_repeats(scores: np.ndarray, seqs: np.ndarray, skip: np.ndarray, penalty: float) -> np.ndarray:
    rows, vocab = scores.shape
    positions = np.arange(seqs.shape[1])
    # Left padding and ids past the vocab land in a spare column, so they penalise nothing.
    ids = np.where(positions[None, :] < skip[:, None], vocab, np.minimum(seqs, vocab))  # [R, L]
    seen = np.zeros((rows, vocab + 1), dtype=bool)
    seen[np.arange(rows)[:, None], ids] = True
    factor = np.float32(penalty)
    penalised = np.where(scores < 0, scores * factor, scores / factor)
    return np.where(seen[:, :vocab], penalised, scores)


def _ban_repeated_ngrams(scores: np.ndarray, seqs: np.ndarray, size: int) -> np.ndarray:
    rows, length = seqs.shape
    if length < size:
        return scores
    vocab = scores.shape[1]
    windows = sliding_window_view(seqs, size, axis=1)  # [R, L - size + 1, size]
    suffix = seqs[:, length - size + 1 :]  # [R, size - 1]: the n-gram the next token would complete
    matches = (windows[:, :, :-1] == suffix[:, None, :]).all(axis=-1)  # [R, L - size + 1]
    banned = np.zeros((rows, vocab + 1), dtype=bool)
    banned[np.arange(rows)[:, None], np.where(matches, np.minimum(windows[:, :, -1], vocab), vocab)] = True
    return np.where(banned[:, :vocab], -np.inf, scores).astype(np.float32, copy=False)


def _warp(scores: np.ndarray, s: GenerationSettings) -> np.ndarray:
    """Sampling warpers in transformers' order: temperature, top-k, top-p."""
    if s.temperature != 1.0:
        scores = scores / np.float32(s.temperature)
    if s.top_k:
        k = min(s.top_k, scores.shape[1])
        kth = np.partition(scores, scores.shape[1] - k, axis=1)[:, -k, None]  # [R, 1] k-th largest
        scores = np.where(scores < kth, -np.inf, scores)
    if s.top_p < 1.0:
        order = np.argsort(scores, axis=1, kind="stable")  # ascending, like transformers
        cumulative = np.cumsum(_softmax(np.take_along_axis(scores, order, axis=1)), axis=1)
        drop_sorted = cumulative <= 1 - s.top_p
        drop_sorted[:, -1] = False  # the most likely token always survives
        drop = np.empty_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=1)
        scores = np.where(drop, -np.inf, scores)
    return scores.astype(np.float32, copy=False)


def _softmax(scores: np.ndarray) -> np.ndarray:
    shifted = np.exp(scores.astype(np.float64) - scores.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    # Same float32 formula as torch's CPU kernel: x - (max + log(sum(exp(x - max)))).
    top = logits.max(axis=1, keepdims=True)
    return logits - (top + np.log(np.exp(logits - top).sum(axis=1, keepdims=True)))


def _draw(scores: np.ndarray, rng: np.random.Generator, step: int) -> np.ndarray:
    """One token per row from softmax(scores), by inverse CDF on uniform draws."""
    probs = _softmax(scores)
    if not np.isfinite(probs).all():
        raise GenerationConfigError(
            f"Every token was filtered out at step {step}, so there is nothing to sample: relax "
            "no_repeat_ngram_size, min_new_tokens or top_k/top_p."
        )
    cdf = np.cumsum(probs, axis=1)  # [R, V]
    picks = (cdf <= rng.random((len(cdf), 1)) * cdf[:, -1:]).sum(axis=1)
    # Rounding can put a draw on the final CDF value: fall back to the last token with any probability.
    last = probs.shape[1] - 1 - np.argmax(probs[:, ::-1] > 0, axis=1)
    return np.minimum(picks, last)


# --- the decoding loops ------------------------------------------------------------------------------------


def generate(
    decoder: StepDecoder, prompt_ids: np.ndarray, prompt_mask: np.ndarray, settings: GenerationSettings
) -> list[list[int]]:
    """Generate tokens after each prompt row; returns the new tokens per row (best beam, EOS kept, no pad).

    ``prompt_ids``/``prompt_mask`` are int [B, T] (left padded for decoder-only models). The decoder must be
    fresh: this calls ``decoder.expand`` once, then ``step`` (and ``reorder`` for beam search).
    """
    ids, mask = _check_prompt(prompt_ids, prompt_mask)
    if settings.num_beams > 1:
        return _beam_search(decoder, ids, mask, settings)
    return _greedy_or_sample(decoder, ids, mask, settings)


def _check_prompt(prompt_ids: np.ndarray, prompt_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ids, mask = np.asarray(prompt_ids), np.asarray(prompt_mask)
    if ids.ndim != 2 or ids.shape[0] < 1 or ids.shape[1] < 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(
            f"prompt_ids must be an integer array [batch, length >= 1], got {ids.dtype} {ids.shape}."
        )
    if mask.shape != ids.shape:
        raise ValueError(f"prompt_mask has shape {mask.shape} but prompt_ids has shape {ids.shape}.")
    return ids.astype(np.int64), mask.astype(np.int64)


def _leading_pads(mask: np.ndarray) -> np.ndarray:
    # transformers exempts left padding (up to the first attended position) from the repetition penalty.
    return np.argmax(mask != 0, axis=1)


def _grown_mask(mask: np.ndarray, generated: int) -> np.ndarray:
    """The prompt mask [R, P] followed by ones for the generated tokens: [R, P + generated]."""
    return np.concatenate([mask, np.ones((len(mask), generated), dtype=np.int64)], axis=1)


def _run_step(decoder: StepDecoder, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    logits = np.asarray(decoder.step(ids, mask))
    if logits.ndim != 2 or logits.shape[0] != len(ids):
        raise ValueError(
            f"StepDecoder.step returned logits of shape {logits.shape}, expected [{len(ids)}, vocab]."
        )
    return logits.astype(np.float32, copy=False)


def _greedy_or_sample(
    decoder: StepDecoder, ids: np.ndarray, mask: np.ndarray, s: GenerationSettings
) -> list[list[int]]:
    rows, steps = len(ids), s.max_new_tokens
    eos = np.asarray(s.eos_token_ids, dtype=np.int64)
    pad = s.pad_token_id if s.pad_token_id is not None else (s.eos_token_ids or (0,))[0]
    rng = np.random.default_rng(s.seed) if s.do_sample else None
    skip, seqs, new_ids = _leading_pads(mask), ids, ids
    lengths = np.zeros(rows, dtype=np.int64)  # 0 while a row is still generating
    decoder.expand(1)
    for t in range(steps):
        scores = _process(_run_step(decoder, new_ids, _grown_mask(mask, t)), seqs, t, skip, s)
        tokens = _draw(_warp(scores, s), rng, t) if rng is not None else np.argmax(scores, axis=1)
        running = lengths == 0
        # Like transformers, finished rows keep stepping on pad tokens (only when EOS can finish them).
        tokens = np.where(running, tokens, pad) if eos.size else tokens
        seqs = np.concatenate([seqs, tokens[:, None]], axis=1)  # [R, P + t + 1]
        lengths[running & (np.isin(tokens, eos) | (t + 1 == steps))] = t + 1
        if lengths.all():
            break
        new_ids = tokens[:, None]
    generated = seqs[:, ids.shape[1] :]
    return [generated[row, : lengths[row]].tolist() for row in range(rows)]


@dataclass
class _Beams:
    """Beam search state for B rows of n beams with room for M new tokens."""

    live_tokens: np.ndarray  # int64 [B, n, M] tokens of the beams still being extended
    live_scores: np.ndarray  # float32 [B, n] their summed log-probs, best first
    done_tokens: np.ndarray  # int64 [B, n, M] best finished hypotheses, best first
    done_scores: np.ndarray  # float32 [B, n] their length-penalised scores (-1e9 while a slot is empty)
    done_lengths: np.ndarray  # int64 [B, n] their generated lengths
    done: np.ndarray  # bool [B, n] whether a slot holds a finished hypothesis
    improvable: np.ndarray  # bool [B] a live beam may still beat the worst finished one

    @classmethod
    def start(cls, batch: int, beams: int, steps: int) -> _Beams:
        live_scores = np.zeros((batch, beams), dtype=np.float32)
        # Only beam 0 starts alive so step one does not pick the same token n times from identical copies.
        live_scores[:, 1:] = _IMPOSSIBLE
        return cls(
            live_tokens=np.zeros((batch, beams, steps), dtype=np.int64),
            live_scores=live_scores,
            done_tokens=np.zeros((batch, beams, steps), dtype=np.int64),
            done_scores=np.full((batch, beams), _IMPOSSIBLE, dtype=np.float32),
            done_lengths=np.zeros((batch, beams), dtype=np.int64),
            done=np.zeros((batch, beams), dtype=bool),
            improvable=np.ones(batch, dtype=bool),
        )


@dataclass
class _Candidates:
    """The K best one-token extensions of a step, per row, best first."""

    tokens: np.ndarray  # int64 [B, K, M] extended token rows
    scores: np.ndarray  # float32 [B, K] summed log-probs
    parent: np.ndarray  # int64 [B, K] which live beam of the row each one extends
    finished: np.ndarray  # bool [B, K] ends with EOS or reached max_new_tokens


def _beam_search(
    decoder: StepDecoder, ids: np.ndarray, mask: np.ndarray, s: GenerationSettings
) -> list[list[int]]:
    batch, beams, steps = len(ids), s.num_beams, s.max_new_tokens
    # Enough candidates that num_beams of them survive even if every beam's top picks are EOS tokens.
    keep = max(2, 1 + len(s.eos_token_ids)) * beams
    ids, mask = np.repeat(ids, beams, axis=0), np.repeat(mask, beams, axis=0)  # [B*n, P]
    skip, new_ids, state = _leading_pads(mask), ids, _Beams.start(batch, beams, steps)
    decoder.expand(beams)
    for t in range(steps):
        generated = state.live_tokens[:, :, :t].reshape(batch * beams, t)  # [B, n, t] -> [B*n, t]
        seqs = np.concatenate([ids, generated], axis=1)  # [B*n, P + t]
        log_probs = _log_softmax(_run_step(decoder, new_ids, _grown_mask(mask, t)))
        log_probs = _process(log_probs, seqs, t, skip, s).reshape(batch, beams, -1)  # [B, n, V]
        cand = _extend(state, log_probs, keep, t, s)
        parents = _advance_live(state, cand)
        _collect_finished(state, cand, t, s)
        if not _keep_searching(state, cand, t, s):
            break
        decoder.reorder(parents)
        new_ids = state.live_tokens[:, :, t].reshape(batch * beams, 1)
    return [state.done_tokens[row, 0, : state.done_lengths[row, 0]].tolist() for row in range(batch)]


def _top_desc(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices [R, k] of the k largest scores per row, best first (lower index first on ties)."""
    if scores.shape[1] < k:
        raise ValueError(
            f"Beam search needs at least {k} candidates per row but the vocabulary gives {scores.shape[1]}."
        )
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.lexsort((part, -np.take_along_axis(scores, part, axis=1)), axis=1)
    return np.take_along_axis(part, order, axis=1)


def _extend(state: _Beams, log_probs: np.ndarray, keep: int, t: int, s: GenerationSettings) -> _Candidates:
    batch, beams, vocab = log_probs.shape
    totals = (log_probs + state.live_scores[:, :, None]).reshape(batch, beams * vocab)  # [B, n*V]
    best = _top_desc(totals, keep)  # [B, K]
    parent, token = best // vocab, best % vocab
    tokens = np.take_along_axis(state.live_tokens, parent[:, :, None], axis=1)  # [B, K, M]
    tokens[:, :, t] = token
    finished = np.isin(token, np.asarray(s.eos_token_ids, dtype=np.int64)) | (t + 1 == s.max_new_tokens)
    return _Candidates(tokens, np.take_along_axis(totals, best, axis=1), parent, finished)


def _advance_live(state: _Beams, cand: _Candidates) -> np.ndarray:
    """Keep the n best unfinished candidates as live beams; returns the cache rows they came from [B*n]."""
    batch, beams = state.live_scores.shape
    scores = cand.scores + cand.finished.astype(np.float32) * _IMPOSSIBLE  # finished ones cannot continue
    pick = _top_desc(scores, beams)  # [B, n]
    state.live_tokens = np.take_along_axis(cand.tokens, pick[:, :, None], axis=1)
    state.live_scores = np.take_along_axis(scores, pick, axis=1)
    parents = np.take_along_axis(cand.parent, pick, axis=1) + np.arange(batch)[:, None] * beams  # [B, n]
    return parents.reshape(-1)  # [B*n], the cache row order StepDecoder.reorder expects


def _collect_finished(state: _Beams, cand: _Candidates, t: int, s: GenerationSettings) -> None:
    """Merge newly finished candidates into the n best finished hypotheses, as transformers does."""
    beams = state.done_scores.shape[1]
    # Only the n best candidates may finish; the rest exist so n beams can stay live.
    finishing = cand.finished & (np.arange(cand.finished.shape[1]) < beams)[None, :]
    scores = cand.scores / np.float32((t + 1) ** s.length_penalty)
    full = state.done.all(axis=1, keepdims=True) & (s.early_stopping is True)
    # Same additions in the same order as transformers, so float32 rounding of the sentinels matches too.
    scores = scores + full.astype(np.float32) * _IMPOSSIBLE
    scores = scores + (~state.improvable)[:, None].astype(np.float32) * _IMPOSSIBLE
    scores = scores + (~finishing).astype(np.float32) * _IMPOSSIBLE
    merged = np.concatenate([state.done_scores, scores], axis=1)  # [B, n + K]
    pick = _top_desc(merged, beams)  # [B, n]
    lengths = np.full(cand.finished.shape, t + 1, dtype=np.int64)
    state.done_scores = np.take_along_axis(merged, pick, axis=1)
    state.done = np.take_along_axis(np.concatenate([state.done, finishing], axis=1), pick, axis=1)
    state.done_lengths = np.take_along_axis(
        np.concatenate([state.done_lengths, lengths], axis=1), pick, axis=1
    )
    all_tokens = np.concatenate([state.done_tokens, cand.tokens], axis=1)  # [B, n + K, M]
    state.done_tokens = np.take_along_axis(all_tokens, pick[:, :, None], axis=1)


def _keep_searching(state: _Beams, cand: _Candidates, t: int, s: GenerationSettings) -> bool:
    """transformers' stopping rule for the whole batch, after updating each row's "improvable" flag."""
    # The best live beam's hoped-for final score: at today's length, or at max length for "never" with a
    # positive penalty (dividing a negative log-prob sum by a larger length only raises it).
    hoped_length = s.max_new_tokens if s.early_stopping == "never" and s.length_penalty > 0 else t + 1
    best_live = state.live_scores[:, :1] / np.float32(hoped_length**s.length_penalty)  # [B, 1]
    worst_done = np.where(state.done, state.done_scores.min(axis=1, keepdims=True), _IMPOSSIBLE)  # [B, n]
    state.improvable &= (best_live > worst_done).any(axis=1)
    all_full = bool(state.done.all()) and s.early_stopping is True
    return bool(state.improvable.any()) and not all_full and not bool(cand.finished.all())
