"""Quantization schemes on tiny models: nodes appear, size shrinks, quality is measured, gates fail."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from test_bnb import TESTED_TORCH_SCHEMES  # the bitsandbytes (torch artifact) schemes, tested there

from modelkiln import runtime
from modelkiln.cli import main
from modelkiln.errors import KilnError, ValidationFailedError
from modelkiln.manifest import artifact_hash, extra_files, read_manifest, verify_files
from modelkiln.quantize.graph_prep import (
    count_ops,
    excluded_nodes,
    module_path,
    prepare_weight_matmuls,
    weight_matmuls,
)
from modelkiln.quantize.quantize import QuantizeConfig, quantize_artifact
from modelkiln.quantize.schemes import SCHEMES, component_scheme, parse_option, resolve_options


def _size(directory) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file())


def test_gemm_rewrite_keeps_outputs_and_exposes_every_weight(small_artifact, tmp_path):
    parent = small_artifact / "decoder.onnx"
    model = onnx.load(str(parent))
    assert count_ops(model)["Gemm"] > 0 and weight_matmuls(model) == []
    stats = prepare_weight_matmuls(model)
    assert "Gemm" not in count_ops(model)
    assert len(weight_matmuls(model)) == stats["gemm_rewritten"] > 0
    onnx.save(model, str(tmp_path / "prepared.onnx"))
    feeds = _decoder_feeds(ort.InferenceSession(str(parent)))
    before = ort.InferenceSession(str(parent)).run(None, feeds)
    after = ort.InferenceSession(str(tmp_path / "prepared.onnx")).run(None, feeds)
    for a, b in zip(before, after, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def _decoder_feeds(session):
    sizes = {"batch": 2, "sequence": 1, "past_sequence": 3, "total_sequence": 4}
    rng = np.random.default_rng(0)
    feeds = {}
    for value in session.get_inputs():
        shape = [sizes.get(dim, dim) for dim in value.shape]
        feeds[value.name] = (
            rng.standard_normal(shape).astype(np.float32)
            if "float" in value.type
            else np.ones(shape, np.int64)
        )
    feeds["position_ids"] = np.full((2, 1), 3, dtype=np.int64)
    return feeds


# Every registered scheme with its options for the tiny model and the node type it must produce.
# The tiny model's widths (32, 48) are multiples of 16, not 32: int4 blocks must divide them.
TESTED_SCHEMES = {
    "int8-dynamic": ({}, "MatMulInteger"),
    "int4-weight": ({"block_size": 16}, "MatMulNBits"),
    "int8-static": ({}, "DequantizeLinear"),  # weights stored int8 behind DequantizeLinear (QDQ)
    "fp16": ({}, "Cast"),  # fp16 weights, casts around the fp32 keep-list and graph inputs/outputs
    # Per graph: the encoder's int8 GEMMs, the decoder's int4 weights.
    "mixed-int8-int4": ({"decoder.block_size": 16}, {"encoder": "MatMulInteger", "decoder": "MatMulNBits"}),
}


def test_every_registered_scheme_is_tested():
    assert set(SCHEMES) == set(TESTED_SCHEMES) | set(TESTED_TORCH_SCHEMES)


@pytest.mark.parametrize(
    ("scheme", "options", "node_type"), [(name, *spec) for name, spec in TESTED_SCHEMES.items()]
)
def test_scheme_makes_a_smaller_runnable_variant_with_quality_figures(
    wide_artifact, tmp_path, scheme, options, node_type
):
    out = tmp_path / scheme
    manifest = quantize_artifact(wide_artifact, out, QuantizeConfig(scheme, options=options, num_images=4))
    parent = read_manifest(wide_artifact)
    for name in ("encoder", "decoder"):
        graph = onnx.load(str(out / manifest.components[name].file), load_external_data=False)
        stats = manifest.quantization["nodes"][name]
        assert stats["quantized_nodes"] >= stats["gemm_rewritten"] > 0  # every weight matmul was taken
        expected = node_type[name] if isinstance(node_type, dict) else node_type
        assert count_ops(graph).get(expected, 0) > 0
        assert manifest.components[name].precision == stats["precision"] != "fp32"
    assert _size(out) < _size(wide_artifact)
    assert manifest.parent["artifact_sha256"] == artifact_hash(parent)
    assert manifest.precision == SCHEMES[scheme].precision
    quality = manifest.quantization["quality"]
    assert {"agreement", "token_agreement", "bleu_vs_parent", "empty_captions"} <= set(quality)
    assert 0.0 <= quality["agreement"] <= 1.0 and quality["images"] == 4
    assert verify_files(out, read_manifest(out)) == [] and extra_files(out, read_manifest(out)) == []
    captions = runtime.load(out)([np.zeros((20, 20, 3), np.uint8)])
    assert isinstance(captions[0][0]["generated_text"], str)


def test_gate_above_what_the_variant_reaches_fails_and_leaves_nothing(
    small_artifact, tmp_path, measured_figures
):
    config = QuantizeConfig("int8-dynamic", num_images=4, max_new_empty=None)
    reached = quantize_artifact(small_artifact, tmp_path / "first", config)
    assert reached.quantization["gate"] == []
    measured_figures(agreement=0.5)
    out = tmp_path / "gated"
    with pytest.raises(ValidationFailedError, match=r"agreement 0.500 < --min-agreement 0.51"):
        quantize_artifact(small_artifact, out, replace(config, min_agreement=0.51))
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first"]


def test_new_empty_captions_gate_is_named_and_can_be_relaxed(small_artifact, tmp_path, measured_figures):
    measured_figures(new_empty_captions=2)
    config = QuantizeConfig("int8-dynamic", num_images=4)
    with pytest.raises(
        ValidationFailedError, match=r"2 empty captions where the parent captioned > --max-new-empty 0"
    ):
        quantize_artifact(small_artifact, tmp_path / "strict", config)
    assert not (tmp_path / "strict").exists()
    relaxed = quantize_artifact(small_artifact, tmp_path / "relaxed", replace(config, max_new_empty=2))
    assert relaxed.quantization["gate"] == [] and relaxed.quantization["quality"]["new_empty_captions"] == 2


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"min_agreement": 1.01}, r"--min-agreement 1.01 is outside 0..1"),
        ({"min_agreement": -0.5}, r"--min-agreement -0.5 is outside 0..1"),
        ({"min_psnr": -1.0}, r"--min-psnr -1.0 must be a finite number of dB"),
        ({"max_new_empty": -2}, r"--max-new-empty -2 must be a whole number, 0 or more"),
        ({"num_images": 0}, r"--num-images must be at least 1"),
        ({"min_prompt_accuracy": 1.5}, r"--min-prompt-accuracy 1.5 is outside 0..1"),
        ({"prompt_accuracy_prompts": 0}, r"--prompt-accuracy-prompts must be at least 1"),
    ],
)
def test_gate_values_outside_their_range_are_refused_before_any_work(options, message):
    with pytest.raises(KilnError, match=message):
        QuantizeConfig("int8-dynamic", **options)


def test_cli_refuses_an_impossible_gate_before_reading_the_artifact(tmp_path, capsys):
    argv = [
        "quantize",
        str(tmp_path / "no-such-artifact"),
        "--scheme",
        "int8-dynamic",
        "--out",
        str(tmp_path / "o"),
    ]
    assert main([*argv, "--min-agreement", "1.01"]) == 2
    err = capsys.readouterr().err
    assert "--min-agreement 1.01 is outside 0..1" in err and "no-such-artifact" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(("scheme", "options"), [("int8-dynamic", {}), ("int4-weight", {"block_size": 16})])
def test_embedding_tables_are_stored_int8(wide_artifact, tmp_path, scheme, options):
    config = QuantizeConfig(scheme, options=options, num_images=2)
    manifest = quantize_artifact(wide_artifact, tmp_path / "out", config)
    assert manifest.quantization["nodes"]["decoder"]["quantized_embeddings"] == 2  # token and position tables
    graph = onnx.load(str(tmp_path / "out" / "decoder.onnx"))
    dtypes = {i.name: i.data_type for i in graph.graph.initializer}
    lookups = [n for n in graph.graph.node if n.op_type == "Gather" and n.input[0] in dtypes]
    # The rows are gathered from the int8 table, then dequantized: no fp32 table is left behind.
    assert len(lookups) == 2
    assert all(dtypes[n.input[0]] in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8) for n in lookups)


def test_static_calibration_is_recorded_from_real_decode_steps(small_artifact, tmp_path):
    manifest = quantize_artifact(
        small_artifact, tmp_path / "out", QuantizeConfig("int8-static", num_images=2)
    )
    calibration = manifest.quantization["calibration"]
    assert calibration["images"] == 8 and len(calibration["pixels_sha256"]) == 64
    assert calibration["feeds"]["encoder"] >= 1 and calibration["feeds"]["decoder"] > 1  # one per decode step


def _conv_then_matmul() -> onnx.ModelProto:
    """x [1, 3, 8, 8] -> 3x3 Conv (4 channels) -> flatten -> MatMul to 5: one of each weight layer."""
    rng = np.random.default_rng(0)
    h = onnx.helper
    weights = [
        onnx.numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "kernel"),
        onnx.numpy_helper.from_array(rng.standard_normal((144, 5)).astype(np.float32), "w"),
        onnx.numpy_helper.from_array(np.array([1, 144], np.int64), "flat"),
    ]
    nodes = [
        h.make_node("Conv", ["x", "kernel"], ["c"], name="conv"),
        h.make_node("Reshape", ["c", "flat"], ["r"], name="reshape"),
        h.make_node("MatMul", ["r", "w"], ["y"], name="matmul"),
    ]
    graph = h.make_graph(
        nodes,
        "g",
        [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 5])],
        weights,
    )
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 18)])


@pytest.mark.parametrize(
    ("options", "quantized"), [({}, {"conv", "matmul"}), ({"convolutions": False}, {"matmul"})]
)
def test_int8_static_takes_convolutions_unless_told_not_to(tmp_path, options, quantized):
    from modelkiln.quantize.onnx_int8 import quantize_int8_static

    rng = np.random.default_rng(1)
    feeds = [{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(4)]
    # The quantizer moves the model's weights out to a file of its own: give it a copy.
    quantize_int8_static(_conv_then_matmul(), tmp_path / "q.onnx", options, [], False, feeds)
    graph = onnx.load(str(tmp_path / "q.onnx")).graph
    dequantized = {node.output[0] for node in graph.node if node.op_type == "DequantizeLinear"}
    assert {node.name for node in graph.node if node.input[1] in dequantized} - {"reshape"} == quantized
    stored = {init.name: onnx.numpy_helper.to_array(init) for init in graph.initializer}
    assert np.abs(stored["w_quantized"]).max() == 127  # matmul weights: full int8 range
    if "conv" in quantized:  # kernels: 7 bits, or onnxruntime's fused u8 x s8 conv saturates
        assert np.abs(stored["kernel_quantized"]).max() == 64
    expected = ort.InferenceSession(_conv_then_matmul().SerializeToString()).run(None, feeds[0])[0]
    got = ort.InferenceSession(str(tmp_path / "q.onnx")).run(None, feeds[0])[0]
    # Calibrated int8 reads ~2% relative error here (the same QDQ graph run unfused agrees); full-range
    # kernels in the fused conv read 5.4% on an AVX2 EPYC without VNNI.
    assert np.linalg.norm(got - expected) < 0.04 * np.linalg.norm(expected)


def test_fp16_keeps_layer_norm_and_softmax_in_fp32(small_artifact, tmp_path):
    manifest = quantize_artifact(small_artifact, tmp_path / "out", QuantizeConfig("fp16", num_images=2))
    graph = onnx.load(str(tmp_path / "out" / manifest.components["decoder"].file))
    halves = [i for i in graph.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16]
    assert len(halves) == manifest.quantization["nodes"]["decoder"]["quantized_nodes"] > 0
    dtypes = {i.name: i.data_type for i in graph.graph.initializer}
    norms = [n for n in graph.graph.node if n.op_type == "LayerNormalization"]
    assert norms and all(
        dtypes.get(n.input[1], onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT for n in norms
    )
    assert all(
        i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        for i in graph.graph.output
        if "present" in i.name
    )
    quality = manifest.quantization["quality"]
    assert quality["token_agreement"] > 0.9  # fp16 barely moves a tiny model's logits


def test_a_scheme_that_quantizes_nothing_is_an_error(small_artifact, tmp_path):
    with pytest.raises(KilnError, match="quantized no node of component encoder"):
        quantize_artifact(small_artifact, tmp_path / "out", QuantizeConfig("int4-weight", exclude=("*",)))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "scopes",
    [
        "['', 'unet', 'unet.conv_in', 'conv2d']",
        # How the exporter recorded the same module on the full-size SD 1.5 UNet.
        """['', 'unet', "unet.__dict__['_modules']['conv_in']", 'conv2d']""",
    ],
)
def test_module_paths_are_dotted_however_the_exporter_spelled_them(scopes):
    node = onnx.helper.make_node("Conv", ["x", "w"], ["y"], name="node_conv2d")
    node.metadata_props.add(key="pkg.torch.onnx.name_scopes", value=scopes)
    assert module_path(node) == "unet.conv_in"
    assert excluded_nodes(
        onnx.helper.make_model(onnx.helper.make_graph([node], "g", [], [])), ("*conv_in",)
    ) == ["node_conv2d"]


def test_exclude_by_module_path_keeps_those_nodes_fp32(small_artifact, tmp_path):
    config = QuantizeConfig("int8-dynamic", components=("decoder",), exclude=("*mlp*",), num_images=2)
    manifest = quantize_artifact(small_artifact, tmp_path / "out", config)
    stats = manifest.quantization["nodes"]["decoder"]
    assert len(stats["excluded_nodes"]) > 0
    assert stats["quantized_nodes"] == stats["gemm_rewritten"] - 2 * 2  # c_fc and c_proj in 2 layers
    assert manifest.components["encoder"].precision == "fp32"


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (QuantizeConfig("int9"), r"unknown scheme 'int9'. Valid schemes: int8-dynamic, int4-weight"),
        (QuantizeConfig("int4-weight", options={"bits": 3}), r"has no option bits. Its options: block_size"),
        (QuantizeConfig("int4-weight", options={"block_size": 48}), "block_size 48 is not supported"),
        (
            QuantizeConfig("int8-dynamic", components=("unet",)),
            r"no such component. This artifact has: encoder",
        ),
    ],
)
def test_bad_requests_say_what_is_valid(small_artifact, tmp_path, config, message):
    with pytest.raises(KilnError, match=message):
        quantize_artifact(small_artifact, tmp_path / "out", config)


def test_mixed_scheme_graphs_are_exactly_its_uniform_parts(wide_artifact, tmp_path):
    """Each graph of the mixed variant is what that graph's uniform scheme makes of it."""
    mixed = quantize_artifact(
        wide_artifact,
        tmp_path / "mixed",
        QuantizeConfig("mixed-int8-int4", options={"decoder.block_size": 16}, num_images=2),
    )
    assert {n: s.precision for n, s in mixed.components.items()} == {"encoder": "int8", "decoder": "int4"}
    assert mixed.precision == "int8+int4" and mixed.quantization["options"]["decoder.block_size"] == 16
    parts = {
        "encoder": QuantizeConfig("int8-dynamic"),
        "decoder": QuantizeConfig("int4-weight", options={"block_size": 16}),
    }
    for name, config in parts.items():
        alone = quantize_artifact(
            wide_artifact, tmp_path / name, replace(config, components=(name,), num_images=2)
        )
        assert alone.components[name].precision == mixed.components[name].precision
        # Both quantizers are deterministic: the same graph, node for node and weight for weight.
        graphs = [
            onnx.load(str(folder / f"{name}.onnx")).graph for folder in (tmp_path / "mixed", tmp_path / name)
        ]
        assert graphs[0] == graphs[1]


def test_mixed_scheme_options_are_checked_by_each_part():
    mixed = SCHEMES["mixed-int8-int4"]
    assert parse_option("decoder.block_size=64") == ("decoder.block_size", 64)
    with pytest.raises(KilnError, match="scheme int4-weight: block_size 48 is not supported"):
        resolve_options(mixed, {"decoder.block_size": 48})
    with pytest.raises(
        KilnError, match=r"has no option encoder\.block_size\. Its options: encoder\.per_channel"
    ):
        resolve_options(mixed, {"encoder.block_size": 64})
    with pytest.raises(KilnError, match="quantizes encoder, decoder, not transformer: choose --components"):
        component_scheme(mixed, "transformer", mixed.options)
    # Its options are its parts' own, defaults included: every one of them, settable per graph.
    for graph, part in mixed.parts.items():
        assert component_scheme(mixed, graph, mixed.options) == (SCHEMES[part], SCHEMES[part].options)
    assert len(mixed.options) == sum(len(SCHEMES[part].options) for part in mixed.parts.values())
    assert mixed.precision == "int8+int4"


def test_option_parsing_types_values_from_the_scheme_table():
    assert parse_option("block_size=64") == ("block_size", 64)
    assert parse_option("symmetric=false") == ("symmetric", False)
    with pytest.raises(KilnError, match="KEY=VALUE with KEY one of"):
        parse_option("bits=4")
    with pytest.raises(KilnError, match="takes a int"):
        parse_option("block_size=big")


def test_cli_quantize_and_gate_exit_codes(small_artifact, wide_artifact, tmp_path, capsys, measured_figures):
    argv = ["quantize", str(wide_artifact), "--scheme", "int4-weight", "--out", str(tmp_path / "q4")]
    code = main([*argv, "--num-images", "2", "--option", "block_size=16"])
    err = capsys.readouterr().err
    assert code == 0 and "MatMulNBits nodes" in err and "next: kiln caption" in err
    measured_figures(agreement=0.5)
    argv = ["quantize", str(small_artifact), "--scheme", "int8-dynamic", "--out", str(tmp_path / "q8")]
    code = main([*argv, "--num-images", "4", "--min-agreement", "0.75", "--option", "per_channel=true"])
    assert code == 1 and "quality gate failed" in capsys.readouterr().err
    assert not (tmp_path / "q8").exists()
