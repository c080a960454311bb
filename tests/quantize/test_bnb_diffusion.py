"""bitsandbytes schemes on the tiny diffusion pipelines: torch artifacts that save, reload to the same
image, run with the ONNX runtime's call, count their quantized layers and gate on PSNR vs the parent.

Every bnb scheme runs on one family: nf4 on SD3.5-Medium with its T5 quantized too, int8 on
SD3.5-Medium's transformer alone, fp4 on SD 1.x's UNet.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TEXT_LENGTHS

from modelkiln import runtime
from modelkiln.cli import main
from modelkiln.errors import KilnError, SourceModelError, ValidationFailedError
from modelkiln.exporters.export import export_model
from modelkiln.exporters.source import resolve_source
from modelkiln.manifest import artifact_hash, extra_files, read_manifest, verify_files
from modelkiln.quantize.bnb import make_bnb_artifact
from modelkiln.quantize.bnb_diffusion import load_quantized_pipeline, pipeline_quantization
from modelkiln.quantize.quantize import QuantizeConfig, quantize_artifact
from modelkiln.quantize.schemes import SCHEMES

# tiny pipeline -> export options (a short T5 length keeps SD3 fast)
PIPELINES = {"sd3.5-medium": {"max_sequence_length": TEXT_LENGTHS["sd3.5-medium"]}, "sd1": {}}
# case -> (pipeline, scheme, components (None: the denoiser alone), module class it puts in place)
CASES = {
    "sd35-nf4-with-t5": ("sd3.5-medium", "bnb-nf4", ("transformer", "text_encoder_3"), "Linear4bit"),
    "sd35-int8": ("sd3.5-medium", "bnb-int8", None, "Linear8bitLt"),
    "sd1-fp4": ("sd1", "bnb-fp4", None, "Linear4bit"),
}
FAST = {"num_prompts": 2, "quality_steps": 2}
# Explicit settings for image comparisons, so no default of either side matters.
CALL = {"num_inference_steps": 2, "guidance_scale": 5.0, "height": 32, "width": 32}


@pytest.fixture(scope="module", params=sorted(CASES))
def variant(request, tiny_diffusion, tmp_path_factory):
    """(case, source dir, parent artifact dir, variant dir, manifest), made once per case."""
    name, scheme, components, _ = CASES[request.param]
    source, parent = tiny_diffusion(name, **PIPELINES[name])
    out = tmp_path_factory.mktemp(request.param) / "variant"
    manifest = quantize_artifact(parent, out, QuantizeConfig(scheme, components=components, **FAST))
    return request.param, source, parent, out, manifest


def test_every_torch_scheme_runs_on_a_diffusion_family():
    torch_schemes = {name for name, scheme in SCHEMES.items() if scheme.kind == "torch"}
    assert {case[1] for case in CASES.values()} == torch_schemes


def test_manifest_records_scheme_components_modules_and_parent(variant):
    case, _, parent, out, manifest = variant
    _, scheme, components, module_class = CASES[case]
    denoiser = "unet" if case.startswith("sd1") else "transformer"
    quantization = manifest.quantization
    assert manifest == read_manifest(out) and verify_files(out, manifest) == []
    assert extra_files(out, manifest) == []  # nothing unlisted left in the variant
    assert manifest.kind == "torch" and manifest.task == "text-to-image" and manifest.components == {}
    assert manifest.precision == SCHEMES[scheme].precision and quantization["scheme"] == scheme
    assert quantization["components"] == list(components or (denoiser,))
    assert quantization["modules"][module_class] > 0
    for record in quantization["component_records"].values():
        assert record["modules"][module_class] > 0
        assert record["bitsandbytes_config"]["quant_method"] == "bitsandbytes"
    # The family recipe keeps the denoiser's embedders and output projection fp32, as ONNX schemes do.
    assert quantization["component_records"][denoiser]["skip_modules"]
    assert manifest.parent["artifact_sha256"] == artifact_hash(read_manifest(parent))
    assert manifest.runtime == read_manifest(parent).runtime  # same defaults: T5 length, sizes, steps
    assert f"{denoiser}/config.json" in manifest.files and "model_index.json" in manifest.files


def test_quality_against_the_onnx_parent_is_recorded(variant):
    _, _, _, _, manifest = variant
    quality = manifest.quantization["quality"]
    assert quality["prompts"] == 2 and len(quality["per_prompt"]) == 2 and quality["non_finite_images"] == 0
    assert {"psnr_mean", "psnr_min", "ssim_mean", "max_pixel_diff"} <= set(quality)
    # Same latents through both: the tiny pipelines stay far above noise level (measured 40-70 dB).
    assert quality["psnr_min"] > 30 and manifest.quantization["gate"] == []


def test_reloaded_variant_makes_the_image_the_in_memory_pipeline_made(variant):
    case, source_dir, _, out, manifest = variant
    name, scheme, _, _ = CASES[case]
    records = manifest.quantization["component_records"]
    skips = {component: record["skip_modules"] for component, record in records.items()}
    source = resolve_source(str(source_dir))
    options = manifest.quantization["options"]
    quantization = pipeline_quantization(source, tuple(records), scheme, options, skips)
    in_memory = load_quantized_pipeline(source, manifest.family, manifest.runtime, quantization)
    extra = {"max_sequence_length": 24} if "max_sequence_length" in PIPELINES[name] else {}
    with torch.no_grad():
        generator = torch.Generator().manual_seed(7)
        expected = in_memory("a red cat", generator=generator, output_type="np", **CALL, **extra).images
    reloaded = runtime.load(out)("a red cat", seed=7, output_type="np", **CALL).images
    np.testing.assert_array_equal(reloaded, expected)


def test_variant_takes_the_onnx_call_and_stays_near_the_parent(variant):
    _, _, parent, out, _ = variant
    pipe, onnx_parent = runtime.load(out), runtime.load(parent)
    steps, parent_steps = [], []
    result = pipe(["a cat", "a dog"], num_images_per_prompt=2, callback=lambda *s: steps.append(s), **CALL)
    onnx_parent("a cat", callback=lambda *s: parent_steps.append(s), **CALL)
    assert len(result.images) == 4 and result.images[0].size == (32, 32)
    assert steps == parent_steps  # (step, total) after each scheduler step (PNDM runs one extra)
    request = onnx_parent.request("a red cat", steps=2, guidance=5.0, height=32, width=32, seed=3)
    latents = onnx_parent.initial_latents(request)
    reference = onnx_parent("a red cat", latents=latents.clone(), output_type="np", **CALL).images
    image = pipe("a red cat", latents=latents.clone(), output_type="np", **CALL).images
    assert np.abs(image - reference).max() < 0.1
    with pytest.raises(KilnError, match="latents have shape"):
        pipe("a red cat", latents=torch.zeros(1, 4, 3, 3))


def test_gate_above_what_the_variant_reaches_fails_and_leaves_nothing(tiny_diffusion, tmp_path):
    _, parent = tiny_diffusion("sd1")
    config = QuantizeConfig("bnb-fp4", min_psnr=1000.0, num_prompts=1, quality_steps=1)
    with pytest.raises(ValidationFailedError, match=r"PSNR .* < --min-psnr 1000"):
        quantize_artifact(parent, tmp_path / "gated", config)
    assert list(tmp_path.iterdir()) == []


def test_a_pipeline_given_directly_is_measured_against_fp32_diffusers(tiny_diffusion, tmp_path):
    source, _ = tiny_diffusion("sd1")
    config = QuantizeConfig("bnb-int8", num_prompts=1, quality_steps=1)
    manifest = make_bnb_artifact(source, tmp_path / "int8", "bnb-int8", config)
    assert manifest.parent is None and manifest.source.model == str(source)
    assert manifest.quantization["quality"]["psnr_min"] > 30


@pytest.mark.parametrize(
    ("name", "components", "message"),
    [
        ("sd1", ("vae",), r"--components vae: .* of unet, text_encoder .*the VAE stays fp32"),
        ("sd1", ("text_encoder_3",), r"--components text_encoder_3"),
    ],
)
def test_bad_component_requests_say_what_to_do(tiny_diffusion, tmp_path, name, components, message):
    _, parent = tiny_diffusion(name, **PIPELINES[name])
    with pytest.raises(KilnError, match=message):
        quantize_artifact(parent, tmp_path / "out", QuantizeConfig("bnb-nf4", components=components))
    assert list(tmp_path.iterdir()) == []


def test_torch_artifacts_refuse_gpu_backends_and_onnx_export(variant, tmp_path):
    _, _, _, out, _ = variant
    with pytest.raises(KilnError, match="run on the cpu backend"):
        runtime.load(out, backend="cuda")
    with pytest.raises(SourceModelError, match="quantized with bitsandbytes"):
        export_model(out, tmp_path / "onnx")
    assert list(tmp_path.iterdir()) == []


def test_cli_quantize_bnb_diffusion(tiny_diffusion, tmp_path, capsys):
    _, parent = tiny_diffusion("sd1")
    out = tmp_path / "nf4"
    args = ["quantize", str(parent), "--scheme", "bnb-nf4", "--out", str(out), "--num-prompts", "1"]
    code = main([*args, "--quality-steps", "1"])
    err = capsys.readouterr().err
    assert code == 0 and "Linear4bit modules" in err and "psnr_min" in err and "next: kiln generate" in err
    assert read_manifest(out).kind == "torch"
