"""The family registry: detection, errors naming the valid keys, and a test for every family."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from modelkiln.benchmarks.tasks import BENCH_TASKS
from modelkiln.errors import KilnError, UnsupportedModelError
from modelkiln.exporters.export import ExportConfig
from modelkiln.exporters.protocol import EXPORTER_PROTOCOLS
from modelkiln.quantize.schemes import SCHEMES
from modelkiln.registry import FAMILIES, TorchCaptioner, detect_family, get_family, load_attr

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


# Adding a family is one declaration: everything a Family names must resolve, and the README must
# describe it, so a new entry that forgets a file or a fact fails here rather than in a user's command.


def _rows(readme: str, marker: str) -> str:
    return readme.split(f"<!-- generated: {marker} -->")[1].split("<!-- end generated -->")[0]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_declared_reference_resolves(name):
    family = FAMILIES[name]
    assert family.name == name and family.task in BENCH_TASKS
    assert isinstance(family.load_exporter(), EXPORTER_PROTOCOLS[family.task])
    assert isinstance(family.load_pipeline_class(), type)
    assert set(family.export_options) <= {f.name for f in fields(ExportConfig)}
    for scheme, components in family.quantize_recipes.items():
        assert SCHEMES[scheme].kind == "onnx" and components, f"{name}: recipe for {scheme}"
    assert all(isinstance(patterns, tuple) for patterns in family.quantize_exclude.values())
    torch_runtime = family.torch_runtime
    if torch_runtime is not None:
        assert callable(load_attr(torch_runtime.runtime))
        if isinstance(torch_runtime, TorchCaptioner):
            assert family.task == "image-to-text"
            assert callable(load_attr(torch_runtime.prompt_inputs))
            assert callable(load_attr(f"transformers:{torch_runtime.model_class}"))
        else:
            assert family.task == "text-to-image" and family.matches(
                {"_class_name": torch_runtime.pipeline_class}
            )
            assert callable(load_attr(f"diffusers:{torch_runtime.pipeline_class}"))
    if family.bench is not None:
        assert family.bench.task in BENCH_TASKS
        assert tuple(load_attr(family.bench.preset_table)) == family.bench.presets
        assert not family.bench.step_flops or callable(load_attr(family.bench.step_flops))


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family_has_its_readme_row(name):
    readme = (TESTS.parent / "README.md").read_text()
    assert f"| `{name}` | {FAMILIES[name].models} |" in _rows(readme, "families")


def test_an_unknown_family_has_no_torch_runtime_and_lists_the_ones_that_do():
    from modelkiln.runtime.torch_diffusion import torch_diffusion_family

    with pytest.raises(KilnError, match=r"has no PyTorch .*supported: sd3, flux, stable-diffusion"):
        torch_diffusion_family("vit-gpt2")


def test_flux_keeps_its_final_projection_fp32_but_quantizes_the_single_blocks_own():
    from fnmatch import fnmatchcase

    patterns = FAMILIES["flux"].quantize_exclude["transformer"]
    # Module paths as the exporter records them (and as diffusers names them, unwrapped).
    for final in ("transformer.proj_out", "proj_out"):
        assert any(fnmatchcase(final, pattern) for pattern in patterns)
    for block in (
        "transformer.single_transformer_blocks.0.proj_out",
        "single_transformer_blocks.37.proj_out",
    ):
        assert not any(fnmatchcase(block, pattern) for pattern in patterns)
