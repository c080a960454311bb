"""Round-robin timing: every variant runs every input in the same passes, so drift hits them alike.

    timings = time_variants(runners, inputs, config, run_job)   # {name: Timings(first_pass, jobs)}

A job is whatever a task's runner returns for one input (a caption, an image, their stage times). On
a shared machine a neighbour's burst lasts seconds: interleaving the variants spreads it over all of
them instead of landing on one, so ratios between variants hold even when absolute times drift.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import Progress

from .config import BenchConfig

EAGER = "pytorch-eager"  # the PyTorch fp32 baseline's row: always first, every ratio is against it
Advance = Callable[..., None]  # moves the progress bar by one unit of work
RunJob = Callable[[Any, int, Advance], Any]  # (runner, input index, advance) -> the job


@dataclass
class Timings:
    """Measured jobs of one variant: those of the first pass (quality) and every timed one."""

    first_pass: list = field(default_factory=list)  # jobs of the first (warm-up) pass, input by input
    jobs: list = field(default_factory=list)  # jobs of the timed passes


@dataclass(frozen=True)
class Schedule:
    """How one pass walks the variants and inputs."""

    by_input: bool = True  # True: each input through every variant in turn; False: variant by variant
    units_per_job: int = 1  # progress units one job advances (text-to-image: one per step)
    on_timed_pass: Callable[[], None] | None = None  # called before every timed pass (rate sampling)


def _order(names: list[str], count: int, by_input: bool) -> Iterator[tuple[str, int]]:
    if by_input:
        return ((name, i) for i in range(count) for name in names)
    return ((name, i) for name in names for i in range(count))


def time_variants(
    runners: dict[str, Any], count: int, config: BenchConfig, run: RunJob, schedule: Schedule = Schedule()
) -> dict[str, Timings]:
    """Warm-up passes, then timed passes of ``count`` inputs through every runner (see ``Schedule``)."""
    timings = {name: Timings() for name in runners}
    passes = config.warmup + config.repeats
    with Progress(console=Console(stderr=True), transient=True, disable=not config.progress) as progress:
        task = progress.add_task("timing", total=passes * len(runners) * count * schedule.units_per_job)
        for index in range(passes):
            if index >= config.warmup and schedule.on_timed_pass:
                schedule.on_timed_pass()
            for name, i in _order(list(runners), count, schedule.by_input):
                progress.update(task, description=f"pass {index + 1}/{passes}: {name}, input {i + 1}")
                job = run(runners[name], i, lambda *_: progress.advance(task))
                if index == 0:
                    timings[name].first_pass.append(job)
                if index >= config.warmup:
                    timings[name].jobs.append(job)
    return timings


def percentiles(values: list[float]) -> dict[str, float]:
    """p50/p90/p99, mean and count of ``values`` (seconds)."""
    p50, p90, p99 = np.percentile(np.asarray(values), [50, 90, 99])
    return {"p50_s": float(p50), "p90_s": float(p90), "p99_s": float(p99), "mean_s": statistics.fmean(values),
            "count": len(values)}  # fmt: skip


def timed_calls(method, name: str, calls: list[tuple[str, float]]):
    """``method`` wrapped to append (name, seconds) to ``calls`` on every call."""

    def run(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            calls.append((name, time.perf_counter() - start))

    return run


def hook_calls(module, name: str, calls: list[tuple[str, float]]) -> None:
    """Forward hooks on a torch module that append (name, seconds) to ``calls`` on every forward."""
    started: list[float] = []
    module.register_forward_pre_hook(lambda *_: started.append(time.perf_counter()))
    module.register_forward_hook(lambda *_: calls.append((name, time.perf_counter() - started.pop())))
