"""BLIP captioning on ONNX Runtime: the shared captioning pipeline with BLIP's prompt handling.

    pipe = modelkiln.runtime.load("out/blip")
    pipe("cat.jpg")                                  # [{"generated_text": "a cat on a couch"}]
    pipe("cat.jpg", prompt="a photography of")       # [{"generated_text": "a photography of a cat ..."}]

``BlipForConditionalGeneration.generate`` starts the text decoder from the text config's bos token
(``[DEC]``). A prompt is tokenized with the BERT template (``[CLS] words [SEP]``), its ``[CLS]`` replaced by
``[DEC]`` and its trailing ``[SEP]`` dropped. transformers' decoded caption then includes the prompt words,
so ``texts`` decodes prompt and generated tokens together. Never imports torch or transformers.
"""

from __future__ import annotations

import numpy as np

from modelkiln.errors import GenerationConfigError

from .captioning import CaptioningPipeline


class BlipCaptioningPipeline(CaptioningPipeline):
    """``pipe(images, prompt=None, **generation_options)`` -> captions, as BLIP's ``generate`` + decode."""

    def prompt_ids(self, prompt: str | None, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """``[DEC]`` alone, or ``[DEC]`` + the prompt's word tokens, for every row: ids and mask [batch, T]."""
        bos = self.manifest.runtime["bos_token_id"]
        if prompt is None:
            ids = [bos]
        else:
            if not isinstance(prompt, str):
                raise GenerationConfigError(f"prompt must be a string, got {type(prompt).__name__}.")
            encoded = self.codec.encode(prompt)  # [CLS] words [SEP], like BlipProcessor(text=prompt)
            if len(encoded) < 2:
                raise GenerationConfigError(
                    f"the tokenizer turned prompt {prompt!r} into {len(encoded)} token(s), but BLIP expects "
                    "[CLS] ... [SEP]: re-export the artifact so it ships the model's own tokenizer."
                )
            ids = [bos, *encoded[1:-1]]  # as generate: first token -> bos, trailing [SEP] dropped
        rows = np.tile(np.asarray(ids, dtype=np.int64), (batch, 1))  # [batch, T]
        return rows, np.ones_like(rows)

    def texts(self, prompt_ids: np.ndarray, tokens: list[list[int]]) -> list[str]:
        """Prompt words plus caption, as ``processor.decode(generate(...)[i], skip_special_tokens=True)``."""
        return self.codec.batch_decode(
            [[*row.tolist(), *new] for row, new in zip(prompt_ids, tokens, strict=True)]
        )
