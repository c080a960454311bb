"""PNG plots of a benchmark report: latency per variant, quality vs latency, size on disk.

write_plots(report, Path("bench"))   # [] when matplotlib is not installed (pip install modelkiln[bench])
"""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def _latency(plt, rows: list[dict], path: Path) -> None:
    names = [row["name"] for row in rows]
    figure, axes = plt.subplots(figsize=(7, 3.5))
    for key, marker in (("p50_s", "o"), ("p90_s", "^"), ("p99_s", "v")):
        axes.plot(names, [row["latency"][key] * 1e3 for row in rows], marker, label=key[:3])
    axes.set_ylabel("ms per image")
    axes.set_ylim(bottom=0)
    axes.set_title("End-to-end latency, batch 1")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _quality(plt, rows: list[dict], path: Path) -> None:
    figure, axes = plt.subplots(figsize=(6, 4))
    for row in rows[1:]:
        x, y = row["latency"]["p50_s"] * 1e3, row["quality"]["chrf"]
        axes.scatter(x, y)
        axes.annotate(row["name"], (x, y), textcoords="offset points", xytext=(4, 4))
    axes.set_xlabel("p50 ms per image")
    axes.set_ylabel("chrF vs eager captions")
    axes.set_title("Quality vs latency")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _size(plt, rows: list[dict], path: Path) -> None:
    figure, axes = plt.subplots(figsize=(7, 3.5))
    axes.bar([row["name"] for row in rows], [row["size_bytes"] / 1e6 for row in rows])
    axes.set_ylabel("MB on disk")
    axes.set_title("Size (eager: source weights)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_plots(report: dict, out: Path) -> list[Path]:
    plt = _pyplot()
    if plt is None:
        return []
    rows = report["variants"]
    paths = [out / "latency.png", out / "quality_vs_latency.png", out / "size.png"]
    for draw, path in zip((_latency, _quality, _size), paths, strict=True):
        draw(plt, rows, path)
    return paths
