"""Shared fixtures: tiny source models and their exported artifacts, built once per test session."""

from __future__ import annotations

import pytest
from tiny_models import TINY_VIT_GPT2, save_tiny_vit_gpt2

from modelkiln.exporters.export import ExportConfig, export_model


@pytest.fixture(scope="session", params=sorted(TINY_VIT_GPT2))
def vit_gpt2_source(request, tmp_path_factory):
    """A tiny ViT-GPT2 saved like save_pretrained, once per config."""
    return save_tiny_vit_gpt2(tmp_path_factory.mktemp(f"src-{request.param}"), TINY_VIT_GPT2[request.param])


@pytest.fixture(scope="session")
def vit_gpt2_artifact(vit_gpt2_source, tmp_path_factory):
    """(source dir, artifact dir) for each tiny config."""
    out = tmp_path_factory.mktemp("art") / "artifact"
    export_model(vit_gpt2_source, out)
    return vit_gpt2_source, out


@pytest.fixture(scope="session")
def small_source(tmp_path_factory):
    """One tiny ViT-GPT2 for tests that need any model (bad input, CLI)."""
    return save_tiny_vit_gpt2(tmp_path_factory.mktemp("small-src"), TINY_VIT_GPT2["a"])


@pytest.fixture(scope="session")
def small_artifact(small_source, tmp_path_factory):
    out = tmp_path_factory.mktemp("small-art") / "artifact"
    export_model(small_source, out, ExportConfig(external_data=True))
    return out


@pytest.fixture(scope="session")
def wide_artifact(tmp_path_factory):
    """The wider tiny ViT-GPT2 (config b, widths 64): 4-bit variants of it still caption every image,
    where config a's widths (32, 48) lose so much that the empty-caption gate refuses them."""
    source = save_tiny_vit_gpt2(tmp_path_factory.mktemp("wide-src"), TINY_VIT_GPT2["b"])
    out = tmp_path_factory.mktemp("wide-art") / "artifact"
    export_model(source, out)
    return out


@pytest.fixture(scope="session")
def tiny_diffusion(tmp_path_factory):
    """``tiny_diffusion(name, **export_options) -> (source dir, artifact dir)``: each tiny pipeline of
    modelkiln.fixtures.tiny_diffusion saved and exported once per session (exports take tens of
    seconds), shared by the exporter, runtime and quantizer tests."""
    from modelkiln.fixtures.tiny_diffusion import build_pipeline

    sources, artifacts = {}, {}

    def get(name: str, **options):
        if name not in sources:
            sources[name] = tmp_path_factory.mktemp(f"{name}-src")
            build_pipeline(name).save_pretrained(sources[name])
        key = (name, tuple(sorted(options.items())))
        if key not in artifacts:
            out = tmp_path_factory.mktemp(f"{name}-art") / "artifact"
            export_model(sources[name], out, ExportConfig(**options))
            artifacts[key] = out
        return sources[name], artifacts[key]

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
