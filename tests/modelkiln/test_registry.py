"""The family registry: detection, errors naming the valid keys, and a test for every family."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelkiln.errors import UnsupportedModelError
from modelkiln.registry import FAMILIES, detect_family, get_family

TESTS = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family_has_an_exporter_test(name):
    test_file = TESTS / "exporters" / f"test_{name.replace('-', '_')}.py"
    assert test_file.is_file(), f"family {name} is registered but {test_file} does not exist"


# What every exporter module provides, and what each task's validator needs on top.
EXPORTER_API = ("load_model", "build_components", "runtime_config", "save_runtime_files")
TASK_API = {"image-to-text": ("validation_cases", "torch_captions"), "text-to-image": ()}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family_loads(name):
    family = FAMILIES[name]
    exporter = family.load_exporter()
    for function in (*EXPORTER_API, *TASK_API[family.task]):
        assert callable(getattr(exporter, function)), f"{family.exporter} lacks {function}"
    assert isinstance(family.quantize_recipes, dict)
    assert callable(family.load_pipeline_class())


@pytest.mark.parametrize(
    ("pipeline", "family"),
    [
        ("StableDiffusion3Pipeline", "sd3"),
        ("FluxPipeline", "flux"),
        ("StableDiffusionPipeline", "stable-diffusion"),
    ],
)
def test_detects_diffusion_pipelines_from_model_index(pipeline, family):
    assert detect_family({"_class_name": pipeline, "_diffusers_version": "0.42.1"}).name == family


def test_detects_vit_gpt2_from_config():
    config = {
        "model_type": "vision-encoder-decoder",
        "encoder": {"model_type": "vit"},
        "decoder": {"model_type": "gpt2"},
    }
    assert detect_family(config).name == "vit-gpt2"


def test_unknown_model_lists_supported_families():
    with pytest.raises(UnsupportedModelError, match=r"model_type 'llama'.*Supported families: .*vit-gpt2"):
        detect_family({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})


def test_unknown_family_name_lists_valid_keys():
    with pytest.raises(
        UnsupportedModelError, match=r"unknown family 'blip9'. Supported families: .*vit-gpt2"
    ):
        get_family("blip9")
