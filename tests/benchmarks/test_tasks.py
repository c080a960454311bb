"""The bench task table that `kiln bench` and `kiln build` share: one entry per runtime task, each
turning the shared config and the caller's options into its own config."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelkiln.benchmarks.captioning.harness import CaptioningConfig
from modelkiln.benchmarks.core.config import BenchConfig, TaskOptions
from modelkiln.benchmarks.tasks import BENCH_TASKS, get_task
from modelkiln.benchmarks.text_to_image.harness import TextToImageConfig
from modelkiln.errors import KilnError
from modelkiln.registry import FAMILIES

SHARED = BenchConfig(out=Path("bench"), preset="tiny", schemes=("int8-dynamic",), repeats=2)


def test_every_runtime_task_has_a_bench_task():
    assert set(BENCH_TASKS) == {family.task for family in FAMILIES.values()}


def test_an_unknown_task_lists_the_valid_ones():
    with pytest.raises(KilnError, match=r"no video benchmark\. It runs: captioning: .*; text-to-image: "):
        get_task("video")


def test_each_task_keeps_the_shared_fields_and_reads_its_own_options():
    options = TaskOptions(per_pass=3, max_new_tokens=8, steps=2)
    captioning = get_task("image-to-text").configure(SHARED, options)
    assert isinstance(captioning, CaptioningConfig) and (captioning.images, captioning.max_new_tokens) == (
        3,
        8,
    )
    text_to_image = get_task("text-to-image").configure(SHARED, options)
    assert isinstance(text_to_image, TextToImageConfig) and (text_to_image.prompts, text_to_image.steps) == (
        3,
        2,
    )
    for config in (captioning, text_to_image):
        assert (config.preset, config.schemes, config.repeats) == ("tiny", ("int8-dynamic",), 2)


def test_peers_are_refused_for_text_to_image():
    with pytest.raises(KilnError, match="--peers compares captioning toolchains only"):
        get_task("text-to-image").configure(SHARED, TaskOptions(per_pass=1, peers=("optimum",)))
