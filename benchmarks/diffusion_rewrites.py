"""Experimental graph rewrites of an exported SD3 transformer, for ``diffusion_levers`` to time.

    path = multi_head_attention(Path("art/transformer.onnx"), Path("/tmp/scratch/mha"), transformer_config)
    path = ort_mmdit_fusions(Path("art/transformer.onnx"), Path("/tmp/scratch/fused"), transformer_config)

Each writes a new graph into its scratch folder and returns its path; the artifact is left alone. A
graph's external weights file is copied beside the new graph.

``multi_head_attention`` rewrites what the dynamo exporter makes of ``scaled_dot_product_attention``
(Q*s @ (K^T)*s -> Softmax -> @ V, with s = scale**0.5 on both sides) into one com.microsoft
MultiHeadAttention node, with Q, K and V transposed to [B, S, H*d] (see ``_to_bsd``).
``ort_mmdit_fusions`` runs onnxruntime's own transformer optimizer for MMDiT (LayerNorm,
SimplifiedLayerNorm/RMSNorm and FastGelu fusions; its attention fusion does not match dynamo exports).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper


def _constant(graph: onnx.GraphProto, name: str) -> np.ndarray | None:
    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            return numpy_helper.to_array(node.attribute[0].t)
    return None


def _scaled(graph, producers: dict, name: str) -> tuple[str, float] | None:
    """(input, s) for ``name = Mul(input, s)`` with a constant scalar s."""
    node = producers.get(name)
    if node is None or node.op_type != "Mul":
        return None
    value = _constant(graph, node.input[1])
    return (node.input[0], float(value.reshape(()))) if value is not None and value.size == 1 else None


def _key(producers: dict, name: str) -> str | None:
    """K [B, H, L, d] behind the exporter's K^T: Reshape(Transpose(Reshape(K), perm 0,2,1))."""
    for op in ("Reshape", "Transpose", "Reshape"):
        node = producers.get(name)
        if node is None or node.op_type != op:
            return None
        name = node.input[0]
    return name


def _match(graph, producers: dict, consumers: dict, softmax) -> dict | None:
    scores, weighted = producers.get(softmax.input[0]), consumers.get(softmax.output[0], [])
    if scores is None or scores.op_type != "MatMul" or len(weighted) != 1 or weighted[0].op_type != "MatMul":
        return None
    query, key_t = _scaled(graph, producers, scores.input[0]), _scaled(graph, producers, scores.input[1])
    key = _key(producers, key_t[0]) if key_t else None
    if query is None or key is None:
        return None
    return {"q": query[0], "k": key, "v": weighted[0].input[1], "out": weighted[0].output[0],
            "scale": query[1] * key_t[1]}  # fmt: skip


def _to_bsd(name: str, prefix: str, flat: str) -> list:
    """[B, H, S, d] -> [B, S, H*d] named ``prefix``: the layout in which onnxruntime's CPU
    MultiHeadAttention took its fast path; with K and V left [B, H, L, d] it ran ~10% slower than the
    unfused graph in a 1357-token microbenchmark, with all three [B, S, H*d] ~20% faster."""
    return [
        helper.make_node("Transpose", [name], [f"{prefix}_bsnh"], perm=[0, 2, 1, 3], name=f"{prefix}_t"),
        helper.make_node("Reshape", [f"{prefix}_bsnh", flat], [prefix], name=f"{prefix}_r"),
    ]


def _attention_nodes(match: dict, index: int, heads: int, head_dim: int) -> tuple[list, list]:
    """Nodes computing ``match["out"]`` [B, H, S, d] through one MultiHeadAttention, and their constants."""
    p = f"kiln_mha_{index}"
    flat = numpy_helper.from_array(np.array([0, 0, -1], dtype=np.int64), f"{p}_flat")
    split = numpy_helper.from_array(np.array([0, 0, heads, head_dim], dtype=np.int64), f"{p}_split")
    nodes = [node for role in ("q", "k", "v") for node in _to_bsd(match[role], f"{p}_{role}", flat.name)]
    nodes += [
        helper.make_node("MultiHeadAttention", [f"{p}_q", f"{p}_k", f"{p}_v"], [f"{p}_o"], name=p,
                         domain="com.microsoft", num_heads=heads, scale=match["scale"]),
        helper.make_node("Reshape", [f"{p}_o", split.name], [f"{p}_o_bsnh"], name=f"{p}_o_r"),
        helper.make_node("Transpose", [f"{p}_o_bsnh"], [match["out"]], perm=[0, 2, 1, 3], name=f"{p}_o_t"),
    ]  # fmt: skip
    return nodes, [flat, split]


def _prune(graph: onnx.GraphProto) -> None:
    """Drop nodes whose outputs nothing reads (the replaced attention's leftovers), then their constants."""
    while True:
        used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
        dead = [node for node in graph.node if not any(out in used for out in node.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    used = {name for node in graph.node for name in node.input}
    for init in [init for init in graph.initializer if init.name not in used]:
        graph.initializer.remove(init)


def _copy_external_data(graph_path: Path, folder: Path) -> None:
    """The weights file beside the new graph, copied: onnxruntime refuses a symlink leaving the graph's
    folder, and onnx refuses a weights file with several hard links (its hard-link attack check)."""
    folder.mkdir(parents=True, exist_ok=True)
    for data in graph_path.parent.glob(f"{graph_path.name}.data"):
        if not (folder / data.name).exists():
            shutil.copyfile(data, folder / data.name)


def _splice(graph: onnx.GraphProto, matches: list[dict], config: dict) -> None:
    """Each match's nodes where its weighted MatMul stood: Q, K and V all come before it, so order holds."""
    by_output = {match["out"]: (index, match) for index, match in enumerate(matches)}
    heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
    nodes = []
    for node in graph.node:
        if node.output[0] not in by_output:
            nodes.append(node)
            continue
        index, match = by_output[node.output[0]]
        attention, constants = _attention_nodes(match, index, heads, head_dim)
        nodes += attention
        graph.initializer.extend(constants)
    del graph.node[:]
    graph.node.extend(nodes)


def multi_head_attention(graph_path: Path, folder: Path, config: dict) -> Path:
    """Every SDPA subgraph replaced by one MultiHeadAttention node; returns the new graph's path."""
    model = onnx.load(str(graph_path), load_external_data=False)
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    softmaxes = [node for node in graph.node if node.op_type == "Softmax"]
    matches = [m for node in softmaxes if (m := _match(graph, producers, consumers, node))]
    if not matches:
        raise ValueError(f"{graph_path}: no exported SDPA pattern (MatMul -> Softmax -> MatMul) found.")
    _splice(graph, matches, config)
    _prune(graph)
    if not any(opset.domain == "com.microsoft" for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    _copy_external_data(graph_path, folder)
    onnx.save(model, str(folder / graph_path.name))
    return folder / graph_path.name


def ort_mmdit_fusions(graph_path: Path, folder: Path, config: dict) -> Path:
    """onnxruntime's MMDiT optimizer (graph-level fusions only, opt_level 0); weights written anew."""
    from onnxruntime.transformers.optimizer import optimize_model

    heads = config["num_attention_heads"]
    optimized = optimize_model(str(graph_path), model_type="mmdit", num_heads=heads,
                               hidden_size=heads * config["attention_head_dim"], opt_level=0, use_gpu=False)  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / graph_path.name
    optimized.save_model_to_file(str(path), use_external_data_format=True)
    return path


def mha_and_fusions(graph_path: Path, folder: Path, config: dict) -> Path:
    """``multi_head_attention`` first, then onnxruntime's MMDiT fusions on its result."""
    return ort_mmdit_fusions(multi_head_attention(graph_path, folder / "mha", config), folder, config)


def int8_without_excludes(graph_path: Path, folder: Path, config: dict) -> Path:
    """The int8-dynamic graph remade from its fp32 parent with no node kept fp32 (the family recipe
    keeps the embedders, position table and output projection fp32: QUANTIZE_EXCLUDE in sd3.py)."""
    from modelkiln.manifest import read_manifest
    from modelkiln.quantize.graph_prep import prepare_weight_matmuls
    from modelkiln.quantize.onnx_int8 import quantize_int8_dynamic

    manifest = read_manifest(graph_path.parent)
    parent = (graph_path.parent / manifest.parent["path"]).resolve() / graph_path.name
    model = onnx.load(str(parent))
    prepare_weight_matmuls(model)
    folder.mkdir(parents=True, exist_ok=True)
    options = manifest.quantization["options"]
    quantize_int8_dynamic(model, folder / graph_path.name, options, exclude=[], external_data=True)
    return folder / graph_path.name
