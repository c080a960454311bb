"""BLIP-2 (OPT) captioning and visual question answering on ONNX Runtime, without torch.

    pipe = modelkiln.runtime.load("out/blip2-opt-2.7b")
    pipe("cat.jpg")                                                  # captioning
    pipe("cat.jpg", prompt="Question: what is in the picture? Answer:")  # VQA

The encoder graph turns each image into ``num_query_tokens`` query embeddings (``prefix_embeds``). Like
transformers' ``generate``, the prompt is ``[image token] * num_query_tokens + BOS + prompt``; the decoder's
first step replaces the image tokens by the query embeddings, later steps feed one token and an empty
prefix. Returned texts include the prompt, as ``processor.batch_decode(model.generate(...))`` does.
"""

from __future__ import annotations

import numpy as np

from .captioning import BufferCache, CaptioningPipeline, GrowingCache, OrtCachedDecoder, _ortvalue

PREFIX_INPUT = "prefix_embeds"


class OrtPrefixDecoder(OrtCachedDecoder):
    """``OrtCachedDecoder`` whose first step puts the query embeddings where the prompt's image tokens are.

    The image tokens lead every prompt row, so the first step feeds the embeddings as ``prefix_embeds``
    and only the ids after them; later steps feed an empty prefix [B, 0, D].
    """

    def __init__(self, session, prefix: np.ndarray, cache: BufferCache | GrowingCache, image_token_id: int):
        self.image_token_id = image_token_id
        super().__init__(session, {PREFIX_INPUT: prefix}, cache)

    def _reset_cache(self) -> None:
        super()._reset_cache()
        self.started = False

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        if self.started:
            return super().step(input_ids, attention_mask)
        prefix = self._static_arrays[PREFIX_INPUT]
        queries = prefix.shape[1]
        if input_ids.shape[1] <= queries or not np.all(input_ids[:, :queries] == self.image_token_id):
            raise ValueError(
                f"the first decoder step expects {queries} image tokens ({self.image_token_id}) before the "
                f"text ids, got ids of shape {input_ids.shape}. Build the prompt with "
                "Blip2CaptioningPipeline.prompt_ids."
            )
        logits = super().step(input_ids[:, queries:], attention_mask)
        # The queries are in the cache now; every later step feeds an empty prefix.
        empty = np.zeros((self.batch, 0, prefix.shape[2]), dtype=prefix.dtype)
        self.static = {PREFIX_INPUT: _ortvalue(empty)}
        self.started = True
        return logits


class Blip2CaptioningPipeline(CaptioningPipeline):
    """``pipe(images, prompt=None, **generation)`` -> captions (or answers) like transformers' BLIP-2."""

    def make_decoder(self, pixel_values: np.ndarray, capacity: int) -> OrtPrefixDecoder:
        prefix = self.encode(pixel_values)[PREFIX_INPUT]
        image_token = self.manifest.runtime["image_token_index"]
        return OrtPrefixDecoder(self.decoder_session, prefix, self.cache(capacity), image_token)

    def prompt_ids(self, prompt: str | None, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """``[image token] * num_query_tokens`` then BOS (no prompt) or the tokenized prompt (BOS included).

        That is what ``Blip2Processor(images, text=prompt)`` builds, and what ``generate`` builds without one.
        """
        runtime = self.manifest.runtime
        text = [runtime["bos_token_id"]] if prompt is None else self.codec.encode(prompt)
        row = [runtime["image_token_index"]] * runtime["num_query_tokens"] + list(text)
        ids = np.tile(np.asarray(row, dtype=np.int64), (batch, 1))  # [B, N + T]
        return ids, np.ones_like(ids)

    def texts(self, prompt_ids: np.ndarray, tokens: list[list[int]]) -> list[str]:
        """transformers returns the prompt with the new tokens; decoding skips the image tokens and BOS."""
        return self.codec.batch_decode(
            [[*row.tolist(), *new] for row, new in zip(prompt_ids, tokens, strict=True)]
        )
