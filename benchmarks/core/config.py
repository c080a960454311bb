"""The settings every benchmark task shares, and the checks on them.

    config = BenchConfig(out=Path("bench"), preset="tiny", schemes=("int8-dynamic",))
    check_config(config, counts=("threads", "repeats"))

A task's own config is a subclass that adds its fields (``CaptioningConfig``, ``TextToImageConfig``);
report.json records every field of it under ``settings``. ``TaskOptions`` carries what a caller (the
CLI, a build recipe) asks beyond the shared fields; each task reads the ones it knows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from modelkiln.errors import KilnError

from .variants import check_schemes


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark run: the fields every task has."""

    out: Path  # results folder: report.json, report.md, PNG plots
    model: str | None = None  # source model (hub id or local dir): the eager baseline and on-the-fly exports
    preset: str | None = None  # "tiny" or "full": build a random-weight source instead of --model
    # Family whose preset --preset names (its registry entry's preset table); None: the task's default
    # family (vit-gpt2 for captioning, sd3 for text-to-image).
    family: str | None = None
    variants: tuple[str, ...] = ()  # existing artifact directories to compare
    schemes: tuple[str, ...] = ()  # schemes to quantize on the fly from an fp32 export of the source
    work_dir: Path | None = None  # presets and on-the-fly artifacts; None puts them in OUT/artifacts
    threads: int = 2  # intra-op threads for torch and onnxruntime alike
    repeats: int = 5  # timed passes over the inputs per variant
    warmup: int = 1  # untimed passes first (thread pools, allocators, weight packing, page cache)
    measure_rss: bool = True  # peak RSS per variant in a fresh subprocess
    plots: bool = True  # PNG plots when matplotlib is importable
    progress: bool = True  # rich progress bar on stderr
    command: str = ""  # the exact command line, recorded in the report

    @property
    def artifacts_dir(self) -> Path:
        return self.work_dir or self.out / "artifacts"


@dataclass(frozen=True)
class TaskOptions:
    """What a caller asks beyond ``BenchConfig``; a task reads the fields it has a use for."""

    per_pass: int  # inputs per pass: drawn images (captioning) or prompts (text-to-image)
    max_new_tokens: int = 16  # tokens every captioner decodes
    peers: tuple[str, ...] = ()  # other captioning toolchains to time beside the variants
    peers_dir: Path | None = None  # where peer virtualenvs live; None: ~/.cache/modelkiln/peers
    family: str | None = None  # text-to-image family of a --preset; None: the default one
    steps: int | None = None  # denoising steps per image; None: the preset's or the task's default
    size: int | None = None  # image side in pixels; None: the preset's or the model's default


def check_config(config: BenchConfig, counts: tuple[str, ...]) -> None:
    """Each of ``counts`` at least 1, warm-up not negative, every scheme known."""
    for name in counts:
        if getattr(config, name) < 1:
            raise KilnError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(config, name)}.")
    if config.warmup < 0:
        raise KilnError(f"--warmup must be 0 or more, got {config.warmup}.")
    check_schemes(config.schemes)
