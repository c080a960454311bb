"""PNG plots of a benchmark report: latency per variant, quality vs latency, size on disk.

write_plots(report, Path("bench"))   # [] when matplotlib is not installed (pip install modelkiln[bench])
"""

from __future__ import annotations

from pathlib import Path

from ..core.plots import draw_all, finish_latency, percentile_markers, quality_scatter, save_figure


def _latency(plt, rows: list[dict], path: Path) -> None:
    figure, axes = plt.subplots(figsize=(7, 3.5))
    percentile_markers(axes, rows, lambda row: row["latency"])
    finish_latency(plt, figure, axes, "ms per image", "End-to-end latency, batch 1", path)


def _quality(plt, rows: list[dict], path: Path) -> None:
    labels = ("p50 ms per image", "chrF vs eager captions", "Quality vs latency")
    quality_scatter(
        plt, rows, lambda row: (row["latency"]["p50_s"] * 1e3, row["quality"]["chrf"]), labels, path
    )


def _size(plt, rows: list[dict], path: Path) -> None:
    figure, axes = plt.subplots(figsize=(7, 3.5))
    axes.bar([row["name"] for row in rows], [row["size_bytes"] / 1e6 for row in rows])
    axes.set_ylabel("MB on disk")
    axes.set_title("Size (eager: source weights)")
    save_figure(plt, figure, path)


def write_plots(report: dict, out: Path) -> list[Path]:
    return draw_all(
        report, out, {"latency.png": _latency, "quality_vs_latency.png": _quality, "size.png": _size}
    )
