"""Caption quality of a variant against the baseline's captions on the same images.

    caption_agreement(baseline_jobs, variant_jobs)
    # {"exact_match": 1.0, "token_agreement": 1.0, "bleu": 100.0, "chrf": 100.0, "empty_captions": 0}

The metrics are ``modelkiln.metrics``'s, the ones `kiln quantize` gates on; chrF is added because it
degrades more gradually than BLEU on short captions.
"""

from __future__ import annotations

from typing import Any

from modelkiln.metrics import bleu, chrf, token_agreement


def caption_agreement(baseline: list, variant: list) -> dict[str, Any]:
    """Figures over paired ``Job``s (same images, same order)."""
    count = len(baseline)
    references = [job.text for job in baseline]
    hypotheses = [job.text for job in variant]
    return {
        "images": count,
        "exact_match": sum(h == r for h, r in zip(hypotheses, references, strict=True)) / count,
        "token_agreement": sum(
            token_agreement(v.tokens, b.tokens) for v, b in zip(variant, baseline, strict=True)
        )
        / count,
        "bleu": bleu(hypotheses, references),
        "chrf": chrf(hypotheses, references),
        "empty_captions": sum(not text.strip() for text in hypotheses),
        "examples": [
            {"baseline": r, "variant": h} for r, h in list(zip(references, hypotheses, strict=True))[:3]
        ],
    }
