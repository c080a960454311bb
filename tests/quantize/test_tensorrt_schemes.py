"""Quantized variants of export-target artifacts: TensorRT gets symmetric int8 QDQ and fp16 with the fp32
keep-list; the schemes it cannot run are refused naming the ones that work (the portable target too)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from modelkiln.errors import KilnError
from modelkiln.exporters.target_graphs import incompatible_nodes
from modelkiln.exporters.targets import get_target
from modelkiln.manifest import read_manifest
from modelkiln.quantize.quantize import QuantizeConfig, quantize_artifact

QUICK = {
    "num_images": 2,
    "num_calibration": 2,
    "max_new_empty": None,
}  # figures only; no gate on random weights


@pytest.fixture(scope="module")
def trt_artifact(target_artifact):
    return target_artifact("vit-gpt2", "tensorrt")[1]


@pytest.mark.parametrize(
    ("scheme", "why"),
    [
        ("int8-dynamic", "no DynamicQuantizeLinear or MatMulInteger"),
        ("int4-weight", "MatMulNBits is an onnxruntime contrib op TensorRT's parser cannot import"),
        ("bnb-nf4", "it is a PyTorch \\(bitsandbytes\\) variant, not ONNX graphs"),
    ],
)
def test_schemes_tensorrt_cannot_run_are_refused_naming_those_that_can(trt_artifact, tmp_path, scheme, why):
    with pytest.raises(
        KilnError,
        match=rf"scheme {scheme} cannot run on a tensorrt artifact: .*{why}\. Schemes that work for tensorrt: "
        "int8-static, fp16",
    ):
        quantize_artifact(trt_artifact, tmp_path / "v", QuantizeConfig(scheme))
    assert not (tmp_path / "v").exists()


@pytest.mark.parametrize(
    ("scheme", "prefix"), [("int4-weight", ""), ("mixed-int8-int4", "mixed-int8-int4: ")]
)
def test_portable_refuses_the_contrib_int4(target_artifact, tmp_path, scheme, prefix):
    _, artifact = target_artifact("vit-gpt2", "portable")
    # A mixed scheme runs only where each of its parts does: its int4 decoder names why.
    with pytest.raises(
        KilnError, match=f"^{prefix}scheme int4-weight cannot run on a portable artifact: its MatMulNBits"
    ):
        quantize_artifact(artifact, tmp_path / "v", QuantizeConfig(scheme))


def test_asymmetric_activations_are_refused_for_tensorrt(trt_artifact, tmp_path):
    config = QuantizeConfig("int8-static", options={"symmetric_activations": False})
    with pytest.raises(
        KilnError, match="needs symmetric_activations=true; drop --option symmetric_activations=false"
    ):
        quantize_artifact(trt_artifact, tmp_path / "v", config)


def _zero_points(model: onnx.ModelProto) -> list[np.ndarray]:
    initializers = {init.name: init for init in model.graph.initializer}
    return [
        numpy_helper.to_array(initializers[node.input[2]])
        for node in model.graph.node
        if node.op_type in ("QuantizeLinear", "DequantizeLinear")
    ]


def test_int8_static_for_tensorrt_is_symmetric_qdq_the_parser_takes(trt_artifact, tmp_path):
    manifest = quantize_artifact(trt_artifact, tmp_path / "v", QuantizeConfig("int8-static", **QUICK))
    assert manifest.target == "tensorrt" and manifest.quantization["options"]["symmetric_activations"]
    for name in manifest.quantization["components"]:
        model = onnx.load(str(tmp_path / "v" / manifest.components[name].file))
        points = _zero_points(model)
        assert points and all(p.dtype == np.int8 and not p.any() for p in points), name
        assert incompatible_nodes(model, get_target("tensorrt"), tmp_path / "v") == []
        assert not {"DynamicQuantizeLinear", "MatMulInteger"} & {n.op_type for n in model.graph.node}


def test_fp16_for_tensorrt_keeps_norms_in_fp32_and_passes_the_matrix(trt_artifact, tmp_path):
    manifest = quantize_artifact(trt_artifact, tmp_path / "v", QuantizeConfig("fp16", **QUICK))
    assert (
        manifest.quantization["options"]["keep_fp32_ops"]
        and read_manifest(tmp_path / "v").precision == "fp16"
    )
    model = onnx.load(str(tmp_path / "v" / "encoder.onnx"))
    assert incompatible_nodes(model, get_target("tensorrt"), tmp_path / "v") == []
    halves = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16}
    norms = [n for n in model.graph.node if n.op_type == "LayerNormalization"]
    assert halves and norms and not any(name in halves for node in norms for name in node.input)
