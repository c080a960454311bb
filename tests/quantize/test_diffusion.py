"""Every ONNX scheme on the diffusion families: variants load and generate, node types are counted,
sizes shrink, image quality against the parent is measured, and the PSNR gate fails when set too high.

int8-static is calibrated from whole multi-step runs, so its denoiser feeds span several timesteps.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import TEXT_LENGTHS

from modelkiln import runtime
from modelkiln.errors import ValidationFailedError
from modelkiln.manifest import read_manifest
from modelkiln.quantize.calibration import record_calibration
from modelkiln.quantize.graph_prep import count_ops, module_path
from modelkiln.quantize.quantize import QuantizeConfig, quantize_artifact

# tiny pipeline -> (export options, denoiser graph)
PIPELINES = {
    "sd3.5-medium": ({"max_sequence_length": TEXT_LENGTHS["sd3.5-medium"]}, "transformer"),
    "flux-dev": ({"max_sequence_length": TEXT_LENGTHS["flux-dev"]}, "transformer"),
    "sd1": ({}, "unet"),
}
# Scheme -> (options fitting the tiny widths, node type it must leave in the quantized graphs).
SCHEMES = {
    "int8-dynamic": ({}, "MatMulInteger"),
    "int8-static": ({}, "DequantizeLinear"),
    "int4-weight": ({"block_size": 16}, "MatMulNBits"),
    "fp16": ({}, "Cast"),
}
FAST = {"num_prompts": 2, "quality_steps": 2, "num_calibration": 2, "calibration_steps": 3, "image_size": 32}


def _size(folder) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module", params=sorted(PIPELINES))
def parent(request, tiny_diffusion):
    options, denoiser = PIPELINES[request.param]
    return tiny_diffusion(request.param, **options)[1], denoiser


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_scheme_makes_a_smaller_variant_that_generates(parent, scheme, tmp_path):
    artifact, _ = parent
    options, node_type = SCHEMES[scheme]
    manifest = quantize_artifact(artifact, tmp_path / "v", QuantizeConfig(scheme, options=options, **FAST))
    nodes = manifest.quantization["nodes"]
    assert nodes and "vae_decoder" not in nodes  # the recipe leaves the VAE decoder in fp32
    for name, stats in nodes.items():
        graph = onnx.load(str(tmp_path / "v" / manifest.components[name].file), load_external_data=False)
        assert stats["quantized_nodes"] > 0 and count_ops(graph).get(node_type, 0) > 0, name
    assert _size(tmp_path / "v") < _size(artifact)
    if scheme == "int8-static" and "unet" in nodes:
        unet = onnx.load(str(tmp_path / "v" / manifest.components["unet"].file), load_external_data=False)
        assert _int8_convolutions(unet) == _convolutions(unet) - {"unet.conv_in", "unet.conv_out"}
    quality = manifest.quantization["quality"]
    assert quality["non_finite_images"] == 0 and len(quality["per_prompt"]) == 2
    image = runtime.load(tmp_path / "v")("a cat", num_inference_steps=2, seed=0).images[0]
    assert np.asarray(image).std() > 0  # not a flat (black) image


def _convolutions(graph) -> set[str]:
    return {module_path(node) for node in graph.graph.node if node.op_type == "Conv"}


def _int8_convolutions(graph) -> set[str]:
    """Modules of the convolutions whose kernel is read back from int8 (QDQ)."""
    dequantized = {node.output[0] for node in graph.graph.node if node.op_type == "DequantizeLinear"}
    return {module_path(n) for n in graph.graph.node if n.op_type == "Conv" and n.input[1] in dequantized}


def test_int8_keeps_the_recipe_layers_fp32_and_stays_above_30db(parent, tmp_path):
    artifact, denoiser = parent
    manifest = quantize_artifact(
        artifact, tmp_path / "v", QuantizeConfig("int8-dynamic", min_psnr=30, **FAST)
    )
    recipe = manifest.quantization["recipe_exclude"][denoiser]
    assert recipe and manifest.quantization["nodes"][denoiser]["excluded_nodes"]
    assert manifest.quantization["quality"]["psnr_min"] >= 30


def test_psnr_gate_fails_and_leaves_no_variant(parent, tmp_path):
    artifact, _ = parent
    with pytest.raises(ValidationFailedError, match=r"worst image PSNR .* dB < --min-psnr 500"):
        quantize_artifact(artifact, tmp_path / "v", QuantizeConfig("int8-dynamic", min_psnr=500, **FAST))
    assert not (tmp_path / "v").exists()


def test_prompt_accuracy_gate_on_another_model_says_it_needs_the_shapes_pipeline(tiny_diffusion, tmp_path):
    artifact = tiny_diffusion("sd3.5-medium", max_sequence_length=TEXT_LENGTHS["sd3.5-medium"])[1]
    config = QuantizeConfig("int8-dynamic", min_prompt_accuracy=0.8, **FAST)
    with pytest.raises(
        ValidationFailedError, match=r"--min-prompt-accuracy needs the shipped shapes pipeline"
    ):
        quantize_artifact(artifact, tmp_path / "v", config)
    assert not (tmp_path / "v").exists()


def test_calibration_spans_timesteps_of_whole_runs(parent, tmp_path):
    artifact, denoiser = parent
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\n\na blue house\n")
    feeds, record = record_calibration(artifact, None, 8, prompts_file=str(prompts), steps=3)
    assert record["prompts"] == 2 and "3 steps each" in record["description"]
    timesteps = {float(feed["timestep"].ravel()[0]) for feed in feeds[denoiser]}
    # 2 prompts x 3 steps (PNDM adds a warm-up call), at least 3 distinct timesteps.
    assert len(feeds[denoiser]) >= 6 and len(timesteps) >= 3
    assert read_manifest(artifact).task == "text-to-image"
