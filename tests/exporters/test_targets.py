"""Export targets: every family's tiny model exports for ``tensorrt`` and ``portable`` with standard ops
only, passes TensorRT's parser matrix, and matches PyTorch on onnxruntime CPU with `kiln validate`'s bars.

Each (family, target) is exported once per test run (conftest ``target_artifact``), shared with the
TensorRT quantizer, engine and runtime tests; the graph rules are checked on small hand-made graphs.
"""

from __future__ import annotations

import collections
import dataclasses
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import TARGET_CAPTIONERS
from onnx import TensorProto, helper, numpy_helper

from modelkiln.cli import main
from modelkiln.errors import KilnError
from modelkiln.exporters.export import ExportConfig, export_model
from modelkiln.exporters.target_graphs import (
    constants_to_initializers,
    incompatible_nodes,
    integer_cumsums_in_float,
)
from modelkiln.exporters.targets import TARGETS, get_target
from modelkiln.exporters.tensorrt_ops import SUPPORTED, UNSUPPORTED
from modelkiln.manifest import MANIFEST_NAME, read_manifest
from modelkiln.validation import (
    DiffusionValidateConfig,
    ValidateConfig,
    validate_artifact,
    validate_diffusion,
)


def check_target_export(source, artifact, target: str) -> None:
    """The artifact records its target, every graph passes the target's check with no contrib op or
    Constant node, and it matches PyTorch with `kiln validate`'s default bars."""
    manifest = read_manifest(artifact)
    assert manifest.target == target
    for component, spec in manifest.components.items():
        graph = onnx.load(str(artifact / spec.file), load_external_data=False)
        assert incompatible_nodes(graph, TARGETS[target], artifact) == [], component
        ops = _ops(artifact / spec.file)
        assert not [op for op in ops if "." in op or op == "Constant"], component
        assert not spec.fused
    if manifest.task == "image-to-text":
        config = ValidateConfig(num_images=3, max_new_tokens=8, update_manifest=False)
        report = validate_artifact(artifact, str(source), config)
    else:
        config = DiffusionValidateConfig(
            prompts=("a red cat",), steps=2, height=32, width=32, update_manifest=False
        )
        report = validate_diffusion(artifact, str(source), config)
    assert report["passed"], json.dumps(report, default=str)[:2000]


def _ops(path) -> collections.Counter:
    return collections.Counter(
        f"{node.domain}.{node.op_type}" if node.domain else node.op_type
        for node in onnx.load(str(path), load_external_data=False).graph.node
    )


# BLIP's portable graphs are its tensorrt graphs (no CumSum to rewrite: checked below), so one export of
# it is enough; ViT-GPT2's portable export is made for the quantizer tests anyway, and OPT's positions
# are a CumSum that only the tensorrt export rewrites.
TARGET_EXPORTS = [(name, "tensorrt") for name in TARGET_CAPTIONERS] + [
    ("vit-gpt2", "portable"),
    ("blip-2", "portable"),
]


@pytest.mark.parametrize(("name", "target"), TARGET_EXPORTS, ids=[f"{n}-{t}" for n, t in TARGET_EXPORTS])
def test_every_captioner_exports_standard_graphs_that_match_pytorch(target_artifact, name, target):
    check_target_export(*target_artifact(name, target), target)


def assert_tensorrt_graphs_are_portable_graphs(artifact) -> None:
    """``portable`` differs from ``tensorrt`` only in TensorRT's integer-CumSum rewrite and parser check
    (exporters.target_graphs.finish_for_target): with no CumSum, a tensorrt export's graphs are the
    portable export's, node for node."""
    for component, spec in read_manifest(artifact).components.items():
        model = onnx.load(str(artifact / spec.file), load_external_data=False)
        assert "CumSum" not in {node.op_type for node in model.graph.node}, component
        assert incompatible_nodes(model, TARGETS["portable"], artifact) == [], component


def test_portable_and_tensorrt_shape_graphs_alike_but_for_the_tensorrt_rewrite():
    def graph_shaping(name: str) -> dict:
        fields = dataclasses.asdict(TARGETS[name])
        return {k: v for k, v in fields.items() if k not in ("name", "description", "schemes", "refused_why")}

    assert graph_shaping("portable") == {**graph_shaping("tensorrt"), "tensorrt_ops": False}


def test_blip_tensorrt_graphs_are_portable_graphs(target_artifact):
    assert_tensorrt_graphs_are_portable_graphs(target_artifact("blip", "tensorrt")[1])


def test_onnxruntime_target_keeps_its_fused_attention_and_is_the_default(small_artifact, target_artifact):
    fused = small_artifact  # the same tiny ViT-GPT2 as the tensorrt export
    _, plain = target_artifact("vit-gpt2", "tensorrt")
    assert read_manifest(fused).target == "onnxruntime" and ExportConfig().target == "onnxruntime"
    assert _ops(fused / "encoder.onnx")["com.microsoft.MultiHeadAttention"] > 0
    assert (
        _ops(plain / "encoder.onnx")["Softmax"]
        == _ops(fused / "encoder.onnx")["com.microsoft.MultiHeadAttention"]
    )
    assert _ops(plain / "encoder.onnx")["LayerNormalization"] > 0  # opset >= 17: one node per norm


def test_manifest_without_a_target_reads_as_onnxruntime(small_artifact, tmp_path):
    data = json.loads((small_artifact / MANIFEST_NAME).read_text())
    data.pop("target")
    data.pop("engine")
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(data))
    manifest = read_manifest(tmp_path)
    assert manifest.target == "onnxruntime" and manifest.engine is None


def test_unknown_target_and_old_opset_are_refused_before_loading(small_source, tmp_path, capsys):
    with pytest.raises(
        KilnError, match=r"unknown target 'trt'\. Valid targets: onnxruntime, portable, tensorrt"
    ):
        export_model(small_source, tmp_path / "a", ExportConfig(target="trt"))
    with pytest.raises(KilnError, match=r"--opset 16 is too old for target tensorrt: it needs opset 17"):
        export_model(small_source, tmp_path / "b", ExportConfig(target="tensorrt", opset=16))
    args = ["export", "--model", str(small_source), "--out", str(tmp_path / "c"), "--target", "portable"]
    assert main([*args, "--opset", "16"]) == 2
    assert "too old for target portable" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


# -- graph rules on hand-made graphs ---------------------------------------------------------------


def _graph(nodes, inputs, outputs, initializers=(), opset=18, domains=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    imports = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, 1) for d in domains)]
    return helper.make_model(graph, opset_imports=imports)


def _value(name, kind=TensorProto.FLOAT, shape=(2, 4)):
    return helper.make_tensor_value_info(name, kind, list(shape))


def test_each_incompatible_node_is_named_with_its_op_and_why():
    zero_point = numpy_helper.from_array(np.array(3, dtype=np.int8), "zp")
    scale = numpy_helper.from_array(np.array(0.1, dtype=np.float32), "scale")
    nodes = [
        helper.make_node(
            "MultiHeadAttention", ["x", "x", "x"], ["mha"], "attn", domain="com.microsoft", num_heads=2
        ),
        helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"], "dyn"),
        helper.make_node("QuantizeLinear", ["x", "scale", "zp"], ["q8"], "quant"),
        helper.make_node("Shape", ["x"], ["shape"], "shape"),
        helper.make_node("RandomNormal", [], ["noise"], "noise", shape=[2, 4]),
        helper.make_node("ReduceMean", ["x", "shape"], ["mean"], "mean"),
        helper.make_node("Resize", ["x", "", "scales"], ["big"], "resize", mode="cubic"),
        helper.make_node(
            "Constant", [], ["c"], "const", value=numpy_helper.from_array(np.ones(2, np.float32))
        ),
    ]
    scales = numpy_helper.from_array(np.ones(2, dtype=np.float32), "scales")
    model = _graph(
        nodes, [_value("x")], [_value("mha")], [zero_point, scale, scales], domains=["com.microsoft"]
    )
    problems = incompatible_nodes(model, get_target("tensorrt"))
    text = "\n".join(problems)
    assert "node attn (MultiHeadAttention): domain com.microsoft is not standard ONNX" in text
    assert "node dyn (DynamicQuantizeLinear): TensorRT 10.1's ONNX parser has no importer" in text
    assert "node quant (QuantizeLinear): zero point zp is not all zeros" in text
    assert "node mean (ReduceMean): input 1 (shape) is computed" in text
    assert "node resize (Resize): mode=['cubic']" in text
    assert "node const (Constant): a Constant node where the target needs an initializer" in text
    assert len(problems) == 6  # Shape and an input-less RandomNormal are fine
    portable = incompatible_nodes(model, get_target("portable"))
    assert [p.split(" (")[0] for p in portable] == ["node attn", "node const"]
    assert incompatible_nodes(model, get_target("onnxruntime")) == []


def test_tensorrt_export_fails_naming_the_node_and_op(small_source, tmp_path, monkeypatch):
    """A graph the matrix does not take stops the export, and no artifact is left."""
    from modelkiln.exporters import tensorrt_ops

    monkeypatch.setitem(tensorrt_ops.SUPPORTED, "MatMul", tensorrt_ops.OpSupport(("INT8",)))
    with pytest.raises(
        KilnError, match=r"component encoder cannot be made for target tensorrt: node \S+ \(MatMul\)"
    ):
        export_model(small_source, tmp_path / "x", ExportConfig(target="tensorrt"))
    assert not (tmp_path / "x").exists()


def test_constants_become_initializers_and_integer_cumsum_runs_in_float():
    axes = helper.make_node(
        "Constant", [], ["axis"], "axis", value=numpy_helper.from_array(np.array(1, np.int64))
    )
    two = helper.make_node("Constant", [], ["two"], "two", value_float=2.0)
    nodes = [
        axes,
        two,
        helper.make_node("CumSum", ["mask", "axis"], ["positions"], "cumsum"),
        helper.make_node("Mul", ["x", "two"], ["y"], "mul"),
    ]
    inputs = [_value("mask", TensorProto.INT64), _value("x")]
    model = _graph(nodes, inputs, [_value("positions", TensorProto.INT64), _value("y")])
    feeds = {"mask": np.array([[1, 1, 0, 1], [0, 1, 1, 1]], dtype=np.int64), "x": np.ones((2, 4), np.float32)}

    def run(m):
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            None, feeds
        )

    expected = run(model)
    assert constants_to_initializers(model) == 2 and integer_cumsums_in_float(model) == 1
    assert [n.op_type for n in model.graph.node] == ["Cast", "CumSum", "Cast", "Mul"]
    assert incompatible_nodes(model, get_target("tensorrt")) == []
    for ours, theirs in zip(run(model), expected, strict=True):
        assert ours.dtype == theirs.dtype and np.array_equal(ours, theirs)


def test_the_matrix_lists_each_op_once():
    assert not set(SUPPORTED) & UNSUPPORTED
    assert {"LayerNormalization", "MatMul", "Softmax", "QuantizeLinear", "DequantizeLinear"} <= set(SUPPORTED)
    assert {"DynamicQuantizeLinear", "MatMulInteger", "QLinearMatMul"} <= UNSUPPORTED
