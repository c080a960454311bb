"""What every report's PNG plots share: matplotlib when installed, and the figure kinds two tasks draw.

plt = pyplot()                                    # None without matplotlib (pip install modelkiln[bench])
percentile_markers(axes, rows, lambda row: row["latency"])
quality_scatter(plt, rows, lambda row: (ms, figure), ("x label", "y label", "title"), path)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

MARKERS = (("p50_s", "o"), ("p90_s", "^"), ("p99_s", "v"))  # percentile key -> marker


def pyplot():
    """matplotlib's pyplot drawing to files, or None when matplotlib is not installed (modelkiln[bench])."""
    try:
        import matplotlib  # an optional extra: imported only when plots are drawn
    except ImportError:
        return None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def save_figure(plt, figure, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def percentile_markers(axes, rows: list[dict], stats_of: Callable[[dict], dict]) -> None:
    """p50, p90 and p99 of every row in ms, one marker kind each; ``stats_of(row)`` holds the *_s keys."""
    names = [row["name"] for row in rows]
    for key, marker in MARKERS:
        axes.plot(names, [stats_of(row)[key] * 1e3 for row in rows], marker, label=key[:3])


def quality_scatter(
    plt,
    rows: list[dict],
    point: Callable[[dict], tuple[float, float]],
    labels: tuple[str, str, str],
    path: Path,
) -> None:
    """Every variant but the eager baseline at ``point(row)`` = (ms, quality), named; labels: x, y, title."""
    figure, axes = plt.subplots(figsize=(6, 4))
    for row in rows[1:]:
        x, y = point(row)
        axes.scatter(x, y)
        axes.annotate(row["name"], (x, y), textcoords="offset points", xytext=(4, 4))
    axes.set_xlabel(labels[0])
    axes.set_ylabel(labels[1])
    axes.set_title(labels[2])
    save_figure(plt, figure, path)


def finish_latency(plt, figure, axes, ylabel: str, title: str, path: Path) -> None:
    """Labels from zero, a legend, and the figure saved to ``path``."""
    axes.set_ylabel(ylabel)
    axes.set_ylim(bottom=0)
    axes.set_title(title)
    axes.legend()
    save_figure(plt, figure, path)


def draw_all(report: dict, out: Path, drawings: dict[str, Callable]) -> list[Path]:
    """Each ``draw(plt, rows, path)`` into ``out / name``; the files written ([] without matplotlib)."""
    plt = pyplot()
    if plt is None:
        return []
    for name, draw in drawings.items():
        draw(plt, report["variants"], out / name)
    return [out / name for name in drawings]
