"""Token ids to text and back for the captioning runtime, with the ``tokenizers`` library only.

An artifact ships ``tokenizer.json`` and ``tokenizer_config.json`` as written by transformers'
``save_pretrained``; ``TextCodec`` reproduces what the transformers tokenizer loaded from them returns::

    from modelkiln.runtime.text import TextCodec

    codec = TextCodec.from_dir(artifact_dir)
    captions = codec.batch_decode(generated_ids)  # == tokenizer.batch_decode(ids, skip_special_tokens=True)
    prompt_ids = codec.encode("a picture of", add_special_tokens=False)  # == tokenizer(text).input_ids
    codec.eos_token_id  # None when the tokenizer has no eos token

Never imports torch or transformers.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer

from modelkiln.errors import ArtifactError

__all__ = ["TextCodec", "TokenizerSettings"]

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"

# transformers' SPECIAL_TOKENS_ATTRIBUTES, in its order (the order new special tokens get their ids).
NAMED_SPECIAL_TOKENS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
_ADDED_TOKEN_FIELDS = ("single_word", "lstrip", "rstrip", "normalized")


@dataclass(frozen=True)
class TokenizerSettings:
    """What ``tokenizer_config.json`` (and a legacy ``special_tokens_map.json``) say beyond tokenizer.json."""

    # Undo the spaces WordPiece-style decoders leave before punctuation (" ." -> "."); transformers skips
    # this for BPE models unless forced, because it corrupts byte-level text.
    clean_up_tokenization_spaces: bool = False
    # transformers' escape hatch that applies the clean-up to BPE models anyway.
    force_clean_up_for_bpe: bool = False
    # Encode special-token strings in the text as ordinary text instead of as the special token.
    split_special_tokens: bool = False
    # Named special tokens ("bos_token" -> AddedToken); a name the config sets to null is absent.
    named_tokens: dict[str, AddedToken] = field(default_factory=dict)
    # extra_special_tokens / additional_special_tokens and model-specific "*_token" entries.
    extra_tokens: tuple[AddedToken, ...] = ()


class TextCodec:
    """Decodes generated ids and encodes prompts exactly like the transformers tokenizer of the artifact."""

    def __init__(self, tokenizer: Tokenizer, settings: TokenizerSettings):
        """Wrap ``tokenizer``, which is configured in place and should not be shared; prefer ``from_dir``."""
        self._tokenizer = tokenizer
        self.settings = settings
        # transformers registers every configured special token as special after loading (_post_init), so
        # decoding with skip_special_tokens drops them even when tokenizer.json did not flag them.
        registered = [*settings.named_tokens.values(), *settings.extra_tokens]
        if registered:
            tokenizer.add_special_tokens(registered)
        # A plain call of a transformers tokenizer never truncates or pads, whatever tokenizer.json stored.
        tokenizer.no_truncation()
        tokenizer.no_padding()
        tokenizer.encode_special_tokens = settings.split_special_tokens
        self._clean_up = settings.clean_up_tokenization_spaces and (
            type(tokenizer.model).__name__ != "BPE" or settings.force_clean_up_for_bpe
        )
        self.bos_token_id = self._token_id("bos_token")
        self.eos_token_id = self._token_id("eos_token")
        self.pad_token_id = self._token_id("pad_token")
        self.unk_token_id = self._token_id("unk_token")
        self.sep_token_id = self._token_id("sep_token")
        self.cls_token_id = self._token_id("cls_token")
        self.mask_token_id = self._token_id("mask_token")

    @classmethod
    def from_dir(cls, path: str | Path) -> TextCodec:
        """Load ``tokenizer.json``, ``tokenizer_config.json`` and, if present, ``special_tokens_map.json``."""
        directory = Path(path)
        tokenizer_file = directory / TOKENIZER_FILE
        if not tokenizer_file.is_file():
            raise ArtifactError(
                f"{tokenizer_file} is missing: the artifact has no tokenizer. Re-export the artifact with "
                "`kiln export` so that it ships tokenizer.json."
            )
        try:
            tokenizer = Tokenizer.from_file(str(tokenizer_file))
        except Exception as error:  # tokenizers raises a bare Exception for malformed files
            raise ArtifactError(
                f"{tokenizer_file} cannot be read by the tokenizers library ({error}): re-export the "
                "artifact."
            ) from error
        config = _read_json(directory / TOKENIZER_CONFIG_FILE, required=True)
        special_map = _read_json(directory / SPECIAL_TOKENS_MAP_FILE, required=False)
        return cls(tokenizer, _settings_from(config, special_map))

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (``len(tokenizer)`` in transformers)."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of one id sequence with special tokens skipped.

        Equals ``tokenizer.decode(ids, skip_special_tokens=True)``; accepts any iterable of integers, numpy
        arrays included.
        """
        text = self._tokenizer.decode(_as_id_list(ids), skip_special_tokens=True)
        return _clean_up_tokenization(text) if self._clean_up else text

    def batch_decode(self, sequences: Iterable[Iterable[int]]) -> list[str]:
        """``[decode(ids) for ids in sequences]``; an empty batch gives ``[]``."""
        return [self.decode(ids) for ids in sequences]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids of ``text``, equal to ``tokenizer(text, add_special_tokens=...).input_ids``."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}.")
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def _token_id(self, name: str) -> int | None:
        token = self.settings.named_tokens.get(name)
        return None if token is None else self._tokenizer.token_to_id(token.content)


def _read_json(path: Path, required: bool) -> dict[str, Any]:
    if not path.is_file():
        if not required:
            return {}
        raise ArtifactError(
            f"{path} is missing: the artifact's tokenizer is incomplete. Re-export the artifact with "
            "`kiln export`."
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ArtifactError(f"{path} is not valid JSON ({error}): re-export the artifact.") from error
    if not isinstance(data, dict):
        raise ArtifactError(f"{path} must hold a JSON object: re-export the artifact.")
    return data


def _settings_from(config: Mapping[str, Any], special_map: Mapping[str, Any]) -> TokenizerSettings:
    # As in transformers, a legacy special_tokens_map.json overrides tokenizer_config.json unless the config
    # carries an added_tokens_decoder (then the map is ignored).
    merged = dict(config) if "added_tokens_decoder" in config else {**config, **special_map}
    named = {}
    for name in NAMED_SPECIAL_TOKENS:
        token = _added_token(merged.get(name), name)
        if token is not None:
            named[name] = token
    return TokenizerSettings(
        clean_up_tokenization_spaces=_bool_setting(merged, "clean_up_tokenization_spaces"),
        force_clean_up_for_bpe=_bool_setting(
            merged, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"
        ),
        split_special_tokens=_bool_setting(merged, "split_special_tokens"),
        named_tokens=named,
        extra_tokens=_extra_tokens(merged),
    )


def _extra_tokens(config: Mapping[str, Any]) -> tuple[AddedToken, ...]:
    extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
    values: list[Any] = list(extra.values()) if isinstance(extra, Mapping) else list(extra)
    # transformers also treats any other "<name>_token": "<string>" entry as a model-specific special token.
    values += [
        value
        for key, value in config.items()
        if key.endswith("_token") and key not in NAMED_SPECIAL_TOKENS and isinstance(value, str)
    ]
    tokens = [_added_token(value, "extra_special_tokens") for value in values]
    return tuple(token for token in tokens if token is not None)


def _added_token(value: Any, name: str) -> AddedToken | None:
    if value is None:
        return None
    if isinstance(value, str):
        return AddedToken(value, special=True, normalized=False)
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        options = {key: bool(value[key]) for key in _ADDED_TOKEN_FIELDS if key in value}
        return AddedToken(value["content"], special=True, **options)
    raise ArtifactError(
        f"tokenizer_config.json: {name} must be a string or an AddedToken object, got {value!r}. "
        "Re-export the artifact."
    )


def _bool_setting(config: Mapping[str, Any], key: str) -> bool:
    value = config.get(key, False)
    if value is None or isinstance(value, bool):
        return bool(value)
    raise ArtifactError(f"tokenizer_config.json: {key} must be true or false, got {value!r}.")


def _as_id_list(ids: Iterable[int]) -> list[int]:
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise TypeError(f"Token ids must be a sequence of integers, got {type(ids).__name__}.")
    result = []
    for token_id in ids:
        if isinstance(token_id, Sequence) or not hasattr(token_id, "__index__"):
            raise TypeError(f"Token ids must be integers, got {token_id!r}; use batch_decode for a batch.")
        value = token_id.__index__()
        if value < 0:
            raise ValueError(f"Token ids must be non-negative, got {value}.")
        result.append(value)
    return result


def _clean_up_tokenization(text: str) -> str:
    # transformers' PreTrainedTokenizerBase.clean_up_tokenization, verbatim.
    return (
        text.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
    )
