"""What every report shares: cell formats, markdown tables, the machine's description, the files written.

table(["variant", "p50 ms"], [["onnx-fp32", ms(0.012)]])   # markdown lines
write_report_files(report, Path("bench"), markdown, write_plots)
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

LIBRARIES = ("modelkiln", "torch", "transformers", "onnx", "onnxruntime", "numpy", "sacrebleu", "matplotlib")


def ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    # Tiny models have sub-millisecond stages: keep two significant digits there.
    return f"{seconds * 1e3:.1f}" if seconds >= 0.01 else f"{seconds * 1e3:.2g}"


def mb(size: float | None) -> str:
    return "-" if size is None else f"{size / 1e6:.1f}"


def times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table, then a blank line."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows] + [""]


def size_share(ratio: float | None) -> str:
    """A size as a share of the fp32 ONNX export's, or '-' where there is none."""
    return "-" if ratio is None else f"{ratio:.0%}"


def _cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")


def machine_info() -> dict:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        # Runnable processes over the last 1, 5, 15 minutes, at the end of the run: above the core
        # count, neighbours shared the CPU, and absolute times read slow (ratios hold, being interleaved).
        "load_average": [round(load, 2) for load in os.getloadavg()],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "libraries": versions,
    }


def plain_json(report: dict) -> dict:
    """``report`` with paths and other objects as strings: plain JSON types throughout."""
    return json.loads(json.dumps(report, default=str))


def settings_of(config) -> dict:
    """A config's fields as report.json's ``settings``, paths as strings."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(config).items()}


def write_report_files(
    report: dict, out: Path, text: Callable[[dict], str], plot: Callable[[dict, Path], list[Path]] | None
) -> list[Path]:
    """report.json, report.md (``text(report)``) and ``plot``'s PNGs into ``out``; the files written."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(text(report))
    return [out / "report.json", out / "report.md", *(plot(report, out) if plot else [])]
