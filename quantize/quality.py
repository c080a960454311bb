"""Quality of a quantized variant against its parent, measured at quantize time.

Captioners: exact caption match rate, token agreement, BLEU (sacrebleu) of the variant's captions
against the parent's, empty captions; with ground-truth captions (the project's drawn fixture
images), accuracy and BLEU against the truth for both. Diffusion: PSNR and SSIM of the variant's
images against the parent's from identical latents, per prompt. ::

    report = caption_quality(parent_pipe, variant_pipe, images, truths)
    report = image_quality(parent_pipe, variant_pipe, prompts, steps=4)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from modelkiln.metrics import bleu, image_metrics, token_agreement


def _greedy(pipe, pixel_values, max_new_tokens: int) -> tuple[list[list[int]], list[str]]:
    ids, tokens = pipe.generate_tokens(
        pixel_values, max_new_tokens=max_new_tokens, num_beams=1, do_sample=False
    )
    return tokens, pipe.texts(ids, tokens)


def caption_quality(
    parent, variant, images, truths: list[str] | None, max_new_tokens: int = 16
) -> dict[str, Any]:
    """Greedy captions of both pipelines on the same images, compared."""
    pixel_values = parent.preprocess(images)
    parent_tokens, parent_texts = _greedy(parent, pixel_values, max_new_tokens)
    variant_tokens, variant_texts = _greedy(variant, variant.preprocess(images), max_new_tokens)
    count = len(images)
    report: dict[str, Any] = {
        "images": count,
        "agreement": sum(a == b for a, b in zip(variant_texts, parent_texts, strict=True)) / count,
        "token_agreement": sum(map(token_agreement, variant_tokens, parent_tokens)) / count,
        "bleu_vs_parent": bleu(variant_texts, parent_texts),
        "empty_captions": sum(not text.strip() for text in variant_texts),
        # Empty where the parent said something: the silent failure to catch (transformers#30383).
        "new_empty_captions": sum(
            not v.strip() and bool(p.strip()) for v, p in zip(variant_texts, parent_texts, strict=True)
        ),
        "examples": [
            {"parent": p, "variant": v} for p, v in list(zip(parent_texts, variant_texts, strict=True))[:4]
        ],
    }
    if truths is not None:
        report["accuracy_vs_truth"] = sum(v == t for v, t in zip(variant_texts, truths, strict=True)) / count
        report["parent_accuracy_vs_truth"] = (
            sum(p == t for p, t in zip(parent_texts, truths, strict=True)) / count
        )
        report["bleu_vs_truth"] = bleu(variant_texts, truths)
        report["parent_bleu_vs_truth"] = bleu(parent_texts, truths)
    return report


def _render(pipe, prompt: str, latents, request):
    """One image from given latents with the request's settings, or None when a graph gave NaN/Inf."""
    from modelkiln.errors import NonFiniteOutputError

    try:
        return pipe(
            prompt, latents=latents.clone(), num_inference_steps=request.steps, guidance_scale=request.guidance_scale,
            height=request.height, width=request.width, output_type="np",
        ).images[0]  # fmt: skip
    except NonFiniteOutputError:
        return None


def image_quality(
    parent, variant, prompts: list[str], steps: int, size: int | None, seed: int
) -> dict[str, Any]:
    """Both pipelines from the same latents per prompt: PSNR/SSIM of the variant against the parent."""
    rows, non_finite = [], 0
    for i, prompt in enumerate(prompts):
        request = parent.request(prompt, steps=steps, height=size, width=size, seed=seed + i)
        latents = parent.initial_latents(request)
        reference, image = (
            _render(parent, prompt, latents, request),
            _render(variant, prompt, latents, request),
        )
        if image is None:  # a black image is the failure to catch, not a number to average
            non_finite += 1
            continue
        rows.append({"prompt": prompt, **image_metrics(image, reference)})
    psnrs = [row["psnr"] for row in rows]
    return {
        "prompts": len(prompts),
        "steps": steps,
        "psnr_mean": sum(psnrs) / len(psnrs) if psnrs else 0.0,
        "psnr_min": min(psnrs, default=0.0),
        "ssim_mean": sum(row["ssim"] for row in rows) / len(rows) if rows else 0.0,
        "max_pixel_diff": max((row["max_pixel_diff"] for row in rows), default=255.0),
        "non_finite_images": non_finite,
        "per_prompt": rows,
    }


# Task -> quality measure; every task the registry serves needs one.
QUALITY: dict[str, Callable[..., dict[str, Any]]] = {
    "image-to-text": caption_quality,
    "text-to-image": image_quality,
}
