"""Experimental graph rewrites of an exported SD3 transformer, for ``levers`` to time.

    path = multi_head_attention(Path("art/transformer.onnx"), Path("/tmp/scratch/mha"), transformer_config)
    path = ort_mmdit_fusions(Path("art/transformer.onnx"), Path("/tmp/scratch/fused"), transformer_config)

Each writes a new graph into its scratch folder and returns its path; the artifact is left alone. A
graph's external weights file is copied beside the new graph.

``multi_head_attention`` is the export's own attention fusion (``exporters/attention.py``), for graphs
exported without it: it was measured here first (levers.md), then made the export default.
``ort_mmdit_fusions`` runs onnxruntime's own transformer optimizer for MMDiT (LayerNorm,
SimplifiedLayerNorm/RMSNorm and FastGelu fusions; its attention fusion does not match dynamo exports).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import onnx
from onnxruntime.transformers.optimizer import optimize_model

from modelkiln.exporters.attention import fuse_attention
from modelkiln.manifest import read_manifest
from modelkiln.quantize.graph_prep import prepare_weight_matmuls
from modelkiln.quantize.onnx_int8 import quantize_int8_dynamic


def _copy_external_data(graph_path: Path, folder: Path) -> None:
    """The weights file beside the new graph, copied: onnxruntime refuses a symlink leaving the graph's
    folder, and onnx refuses a weights file with several hard links (its hard-link attack check)."""
    folder.mkdir(parents=True, exist_ok=True)
    for data in graph_path.parent.glob(f"{graph_path.name}.data"):
        if not (folder / data.name).exists():
            shutil.copyfile(data, folder / data.name)


def multi_head_attention(graph_path: Path, folder: Path, config: dict) -> Path:
    """The export's attention fusion (exporters/attention.py) applied to a graph exported without it
    (``--no-fuse-attention``, or an artifact older than the fusion); returns the new graph's path."""
    model = onnx.load(str(graph_path), load_external_data=False)
    if not fuse_attention(model):
        raise ValueError(f"{graph_path}: no unfused attention left (already MultiHeadAttention, or masked).")
    _copy_external_data(graph_path, folder)
    onnx.save(model, str(folder / graph_path.name))
    return folder / graph_path.name


def ort_mmdit_fusions(graph_path: Path, folder: Path, config: dict) -> Path:
    """onnxruntime's MMDiT optimizer (graph-level fusions only, opt_level 0); weights written anew."""
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
    manifest = read_manifest(graph_path.parent)
    parent = (graph_path.parent / manifest.parent["path"]).resolve() / graph_path.name
    model = onnx.load(str(parent))
    prepare_weight_matmuls(model)
    folder.mkdir(parents=True, exist_ok=True)
    options = manifest.quantization["options"]
    quantize_int8_dynamic(model, folder / graph_path.name, options, exclude=[], external_data=True)
    return folder / graph_path.name
