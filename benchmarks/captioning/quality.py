"""Caption quality of a variant against the baseline's captions on the same images, and of every
scheme on the trained shapes captioner the project ships.

    caption_agreement(baseline_jobs, variant_jobs)
    # {"exact_match": 1.0, "token_agreement": 1.0, "bleu": 100.0, "chrf": 100.0, "empty_captions": 0}
    shapes_quality(("int8-dynamic",), work_dir, log)
    # [{"scheme": "int8-dynamic", "agreement": 1.0, "accuracy_vs_truth": 0.98, ...}]

The metrics are ``modelkiln.metrics``'s, the ones `kiln quantize` gates on; chrF is added because it
degrades more gradually than BLEU on short captions. A random-weight preset's captions only say
whether a variant decodes like its parent, and its near-flat logits flip on any rounding; the trained
shapes captioner has captions that can be right or wrong, so its figures are the ones that mean something.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from modelkiln.fixtures import CAPTIONER_DIR
from modelkiln.manifest import read_manifest
from modelkiln.metrics import bleu, chrf, token_agreement
from modelkiln.quantize.quantize import QuantizeConfig
from modelkiln.quantize.schemes import SCHEMES

from ..core.variants import prepare_variants

SHAPES_IMAGES = 48  # held-out drawn images (kiln quantize's quality seeds): ~2% per caption on a tiny model


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


def _shapes_config(parent: Path, scheme: str) -> QuantizeConfig:
    """`kiln quantize`'s own measurement at the scheme's defaults, on more images, with no gate."""
    return QuantizeConfig(scheme=scheme, num_images=SHAPES_IMAGES, overwrite=True, max_new_empty=None)


def shapes_quality(schemes: tuple[str, ...], work_dir: Path, log: Callable[[str], None]) -> list[dict]:
    """Each ONNX scheme applied to the shipped shapes captioner: caption agreement with its fp32 parent
    and exact-caption accuracy against the drawn truth, for the variant and the parent."""
    onnx = tuple(scheme for scheme in dict.fromkeys(schemes) if SCHEMES[scheme].kind == "onnx")
    if not onnx:
        return []
    log(f"quality of {', '.join(onnx)} on the shipped shapes captioner")
    variants = prepare_variants(str(CAPTIONER_DIR), onnx, (), work_dir, log, _shapes_config)
    rows = []
    for variant in variants[1:]:  # the fp32 export comes first: it is every scheme's parent
        quality = read_manifest(variant.path).quantization["quality"]
        keys = ("images", "agreement", "token_agreement", "accuracy_vs_truth", "parent_accuracy_vs_truth")
        rows.append({"scheme": variant.name, **{key: quality[key] for key in keys}})
    return rows
