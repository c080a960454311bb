"""PNG plots of a text-to-image benchmark report: step latency, stage breakdown, quality vs speed, size.

write_diffusion_plots(report, Path("bench"))   # [] when matplotlib is not installed
"""

from __future__ import annotations

from pathlib import Path

from ..core.plots import draw_all, finish_latency, percentile_markers, quality_scatter, save_figure

STAGES = ("text_encoders", "steps", "vae_decode", "other")  # stacked bottom to top


def _step(plt, rows: list[dict], path: Path) -> None:
    names = [row["name"] for row in rows]
    figure, axes = plt.subplots(figsize=(7, 3.5))
    percentile_markers(axes, rows, lambda row: row["latency"]["step"])
    bounds = [row["roofline"].get("own_bound_s") for row in rows]
    if all(bounds):
        axes.plot(names, [b * 1e3 for b in bounds], "_", markersize=20, color="black", label="FLOP bound")
    finish_latency(plt, figure, axes, "ms per transformer call", "Denoising step latency", path)


def _stages(plt, rows: list[dict], path: Path) -> None:
    figure, axes = plt.subplots(figsize=(7, 3.5))
    names, bottom = [row["name"] for row in rows], [0.0] * len(rows)
    for stage in STAGES:
        if stage == "steps":  # median step x steps: what the denoising loop costs per image
            values = [row["latency"]["step"]["p50_s"] * row["latency"]["step"]["count"] /
                      row["latency"]["pipeline"]["count"] for row in rows]  # fmt: skip
        else:
            values = [row["latency"][stage]["p50_s"] for row in rows]
        axes.bar(names, values, bottom=bottom, label=stage)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    axes.set_ylabel("s per image (medians)")
    axes.set_title("Where an image's time goes")
    axes.legend()
    save_figure(plt, figure, path)


def _quality(plt, rows: list[dict], path: Path) -> None:
    labels = ("p50 ms per step", "PSNR vs eager images (dB)", "Quality vs step latency")
    point = lambda row: (row["latency"]["step"]["p50_s"] * 1e3, row["quality"]["psnr_mean"])  # noqa: E731
    quality_scatter(plt, rows, point, labels, path)


def _size(plt, rows: list[dict], path: Path) -> None:
    figure, axes = plt.subplots(figsize=(7, 3.5))
    names = [row["name"] for row in rows]
    axes.bar(names, [row["size_bytes"] / 1e6 for row in rows], label="all files")
    axes.bar(names, [row["denoiser_bytes"] / 1e6 for row in rows], width=0.4, label="denoiser")
    axes.set_ylabel("MB on disk")
    axes.set_title("Size (eager: source weights)")
    axes.legend()
    save_figure(plt, figure, path)


def write_diffusion_plots(report: dict, out: Path) -> list[Path]:
    drawings = {
        "step_latency.png": _step,
        "stages.png": _stages,
        "quality_vs_step.png": _quality,
        "size.png": _size,
    }
    return draw_all(report, out, drawings)
