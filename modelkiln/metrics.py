"""Quality metrics, one definition each: what `kiln validate`, `kiln quantize` and `kiln bench` report.

A base-layer leaf: numpy at import; sacrebleu and scikit-image only inside the function that needs them
(the export extra installs both), so importing it costs nothing in the runtime-only install.

    token_agreement([1, 2, 3], [1, 2, 4])   # 0.667
    bleu(["a cat"], ["a cat"])               # 100.0
    image_metrics(ours, reference)          # {"psnr": ..., "ssim": ..., "max_pixel_diff": ...}
"""

from __future__ import annotations

import numpy as np

PSNR_IDENTICAL = 200.0  # reported for identical images, whose PSNR is infinite (JSON has no infinity)


def token_agreement(a: list[int], b: list[int]) -> float:
    """Fraction of positions where two token sequences agree, over the longer one."""
    longest = max(len(a), len(b))
    return 1.0 if longest == 0 else sum(x == y for x, y in zip(a, b, strict=False)) / longest


def bleu(hypotheses: list[str], references: list[str]) -> float:
    """Corpus BLEU (sacrebleu), 0-100, rounded to 2 places."""
    import sacrebleu

    return round(float(sacrebleu.corpus_bleu(hypotheses, [references]).score), 2)


def chrf(hypotheses: list[str], references: list[str]) -> float:
    """Corpus chrF (sacrebleu), 0-100, rounded to 2 places: kinder than BLEU to short captions."""
    import sacrebleu

    return round(float(sacrebleu.corpus_chrf(hypotheses, [references]).score), 2)


def psnr(ours: np.ndarray, reference: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two images in [0, 1]."""
    mse = float(np.mean((ours.astype(np.float64) - reference.astype(np.float64)) ** 2))
    return PSNR_IDENTICAL if mse == 0 else min(PSNR_IDENTICAL, float(10 * np.log10(1.0 / mse)))


def ssim(ours: np.ndarray, reference: np.ndarray) -> float:
    """Structural similarity of two [H, W, 3] images in [0, 1] (scikit-image)."""
    from skimage.metrics import structural_similarity

    side = min(ours.shape[0], ours.shape[1])
    window = min(7, side if side % 2 else side - 1)
    return float(structural_similarity(ours, reference, channel_axis=-1, data_range=1.0, win_size=window))


def image_metrics(ours: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """PSNR, SSIM and the largest pixel difference (0-255) of two [H, W, 3] images in [0, 1]."""
    return {
        "psnr": psnr(ours, reference),
        "ssim": ssim(ours, reference),
        "max_pixel_diff": float(np.max(np.abs(ours - reference)) * 255),
    }
