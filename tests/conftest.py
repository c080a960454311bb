"""Shared fixtures: tiny source models and their exported artifacts, built once per test run.

The suite runs on several pytest-xdist workers; ``shared_folder`` lets the first worker that needs a
tiny export make it and the others wait for it and reuse it, so no export is made twice per run.
Tests only read these folders (a test that changes one copies it first).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from filelock import FileLock
from tiny_models import (
    TINY_BLIP,
    TINY_BLIP2,
    TINY_VIT_GPT2,
    save_tiny_blip,
    save_tiny_blip2,
    save_tiny_vit_gpt2,
)

from modelkiln.exporters.export import ExportConfig, export_model


def shared_folder(tmp_path_factory, key: str, make: Callable[[Path], None]) -> Path:
    """``make(folder)`` once per test run for this key, whichever worker asks first; the folder after."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, above each worker's own
    folder = root / "shared" / key
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{folder}.lock"):
        if not (root / "shared" / f"{key}.done").exists():
            shutil.rmtree(folder, ignore_errors=True)  # left by a worker that failed half-way
            folder.mkdir()
            make(folder)
            (root / "shared" / f"{key}.done").touch()
    return folder


def _exported(tmp_path_factory, key: str, source: Path, config: ExportConfig | None = None) -> Path:
    config = config or ExportConfig()
    folder = shared_folder(tmp_path_factory, key, lambda f: export_model(source, f / "artifact", config))
    return folder / "artifact"


def vit_gpt2_export(tmp_path_factory, name: str) -> tuple[Path, Path]:
    """(source dir, artifact dir) of tiny ViT-GPT2 config ``name``, saved and exported once per run, for
    every fixture and test module that needs that config."""
    sizes = TINY_VIT_GPT2[name]
    source = shared_folder(tmp_path_factory, f"src-{name}", lambda f: save_tiny_vit_gpt2(f, sizes))
    return source, _exported(tmp_path_factory, f"art-src-{name}", source)


@pytest.fixture(scope="session", params=sorted(TINY_VIT_GPT2))
def vit_gpt2_artifact(request, tmp_path_factory):
    """(source dir, artifact dir) for each tiny config."""
    return vit_gpt2_export(tmp_path_factory, request.param)


@pytest.fixture(scope="session")
def small_source(tmp_path_factory):
    """One tiny ViT-GPT2 for tests that need any model (bad input, CLI)."""
    return shared_folder(tmp_path_factory, "small-src", lambda f: save_tiny_vit_gpt2(f, TINY_VIT_GPT2["a"]))


@pytest.fixture(scope="session")
def small_artifact(small_source, tmp_path_factory):
    return _exported(tmp_path_factory, "small-art", small_source, ExportConfig(external_data=True))


@pytest.fixture(scope="session")
def wide_artifact(tmp_path_factory):
    """The wider tiny ViT-GPT2 (config b, widths 64): 4-bit variants of it still caption every image,
    where config a's widths (32, 48) lose so much that the empty-caption gate refuses them."""
    return vit_gpt2_export(tmp_path_factory, "b")[1]  # vit_gpt2_artifact's config b: one export per run


def shapes_sd3_artifact(tmp_path_factory) -> Path:
    """The shipped shapes text-to-image pipeline exported the way a user exports any SD3 pipeline
    (``kiln export --model DIR``), once per test run."""
    from modelkiln.cli import main
    from modelkiln.fixtures import TEXT_TO_IMAGE_DIR

    def export(folder):
        assert main(["export", "--model", str(TEXT_TO_IMAGE_DIR), "--out", str(folder / "artifact")]) == 0

    return shared_folder(tmp_path_factory, "shapes-sd3-art", export) / "artifact"


# Tiny BLIP-family configs: family -> (saver, configs). BLIP-2 "b" is exported with external data.
TINY_CAPTIONERS = {"blip": (save_tiny_blip, TINY_BLIP), "blip-2": (save_tiny_blip2, TINY_BLIP2)}


@pytest.fixture(scope="session")
def captioner_export(tmp_path_factory):
    """``captioner_export(family, config) -> (source dir, artifact dir)``: a tiny BLIP or BLIP-2 config
    saved and exported once per test run, shared by the exporter and the quantizer family tests."""

    def get(family: str, name: str) -> tuple[Path, Path]:
        save, configs = TINY_CAPTIONERS[family]
        source = shared_folder(tmp_path_factory, f"{family}-src-{name}", lambda f: save(f, configs[name]))
        config = ExportConfig(external_data=(family, name) == ("blip-2", "b"))
        return source, _exported(tmp_path_factory, f"{family}-art-{name}", source, config)

    return get


@pytest.fixture(scope="session")
def tiny_diffusion(tmp_path_factory):
    """``tiny_diffusion(name, **export_options) -> (source dir, artifact dir)``: each tiny pipeline of
    modelkiln.fixtures.tiny_diffusion saved and exported once per test run (exports take tens of
    seconds), shared by the exporter, runtime and quantizer tests."""
    from modelkiln.fixtures.tiny_diffusion import build_pipeline

    def get(name: str, **options):
        source = shared_folder(
            tmp_path_factory, f"{name}-src", lambda f: build_pipeline(name).save_pretrained(f)
        )
        key = "-".join([f"{name}-art", *(f"{k}={v}" for k, v in sorted(options.items()))])
        return source, _exported(tmp_path_factory, key, source, ExportConfig(**options))

    return get


# Tiny models of every family for the export-target tests: captioner builders, and the tiny pipelines
# of modelkiln.fixtures.tiny_diffusion that cover the diffusion families.
TARGET_CAPTIONERS = {
    "vit-gpt2": lambda f: save_tiny_vit_gpt2(f, TINY_VIT_GPT2["a"]),
    "blip": lambda f: save_tiny_blip(f, TINY_BLIP["a"]),
    "blip-2": lambda f: save_tiny_blip2(f, TINY_BLIP2["a"]),
}
# Whole pipelines exported per target: SD3.5 (CLIP, T5, MMDiT, VAE). Flux's and SD 1.x's text encoders and
# VAE are the classes it covers, so their tensorrt checks export their denoiser alone
# (test_targets_diffusion); each whole tiny pipeline costs ~50 s of the suite's 10 minutes.
TARGET_DIFFUSION = ("sd3.5-medium",)
# T5 prompt length of every tiny SD3 and Flux export: short, and not the export default, to prove the
# option is honoured. One length per pipeline, so tests that ask for the same pipeline share its export.
TEXT_LENGTHS = {"sd3.5-medium": 24, "flux-dev": 32, "flux-schnell": 32}


@pytest.fixture(scope="session")
def target_artifact(tmp_path_factory):
    """``target_artifact(name, target) -> (source dir, artifact dir)``: a tiny model of each family
    (a key of TARGET_CAPTIONERS or TARGET_DIFFUSION) exported once per run for ``target``."""
    from modelkiln.fixtures.tiny_diffusion import build_pipeline

    def get(name: str, target: str):
        make = TARGET_CAPTIONERS.get(name) or (lambda f: build_pipeline(name).save_pretrained(f))
        # The source folders small_source, captioner_export and tiny_diffusion save: once per run.
        shared = {"vit-gpt2": "small-src", "blip": "blip-src-a", "blip-2": "blip-2-src-a"}
        source = shared_folder(tmp_path_factory, shared.get(name, f"{name}-src"), make)
        options = {"max_sequence_length": TEXT_LENGTHS[name]} if name in TEXT_LENGTHS else {}
        config = ExportConfig(target=target, **options)
        folder = shared_folder(
            tmp_path_factory, f"{name}-{target}", lambda f: export_model(source, f / "artifact", config)
        )
        return source, folder / "artifact"

    return get


@pytest.fixture()
def measured_figures(monkeypatch):
    """Make the next captioner quantizations measure these figures (the others stay real).

    Which tokens an int8 or int4 random tiny model emits depends on the CPU's int8 path (VNNI or not),
    so a gate test that needs a figure below its limit sets the figure instead of hoping for it.
    """
    from modelkiln.quantize.quality import QUALITY

    real = QUALITY["image-to-text"]

    def patch(**figures) -> None:
        monkeypatch.setitem(
            QUALITY, "image-to-text", lambda *args, **kwargs: {**real(*args, **kwargs), **figures}
        )

    return patch
