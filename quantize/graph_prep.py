"""Put an exported graph's weight matmuls in the form onnxruntime's quantizers recognise.

The dynamo exporter writes GPT-2's Conv1D layers as ``Gemm`` and a tied head as
``Transpose(initializer) -> MatMul``. Both int8 dynamic quantization and MatMulNBits only pick up a
``MatMul`` whose second input is an initializer, so without this step they quantize little or
nothing (TensorRT#4208 is what a silent no-op looks like). ::

    model = load_graph(path)                # onnx.load that also reads through symlinks
    stats = prepare_weight_matmuls(model)   # {"gemm_rewritten": 13, "transpose_folded": 1}
    weight_matmuls(model)                   # names of MatMul nodes with a constant weight
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from pathlib import Path

import numpy as np
import onnx
from onnx import external_data_helper, helper, numpy_helper

from modelkiln.confine import confined_name


def load_graph(path: str | os.PathLike) -> onnx.ModelProto:
    """``onnx.load`` with the external data read through symlinks, which onnx.load refuses: the
    Hugging Face cache stores every file of a download as a symlink into its blobs folder. Each
    location must be a confined name (modelkiln.confine); callers check artifacts with require_intact
    first, which also checks each file is hashed by the manifest."""
    graph = Path(path)
    model = onnx.load(str(graph), load_external_data=False)
    for tensor in external_data_helper._get_all_tensors(model):
        if not external_data_helper.uses_external_data(tensor):
            continue
        info = external_data_helper.ExternalDataInfo(tensor)
        confined_name(info.location, "its external data", where=str(graph))
        with open(graph.parent / info.location, "rb") as handle:
            handle.seek(info.offset or 0)
            tensor.raw_data = handle.read(info.length if info.length is not None else -1)
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT
    return model


def _attrs(node: onnx.NodeProto) -> dict:
    return {attr.name: helper.get_attribute_value(attr) for attr in node.attribute}


def _initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {init.name: init for init in model.graph.initializer}


def _transposed_initializer(model: onnx.ModelProto, name: str) -> str:
    """Add (once) a transposed copy of a 2-D initializer and return its name."""
    new_name = f"{name}__transposed"
    inits = _initializers(model)
    if new_name not in inits:
        array = numpy_helper.to_array(inits[name])
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array.T), new_name))
    return new_name


def _rewrite_gemm(model: onnx.ModelProto, node: onnx.NodeProto, inits: dict) -> list[onnx.NodeProto] | None:
    attrs = _attrs(node)
    plain = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)
    if not plain or node.input[1] not in inits:
        return None
    weight = _transposed_initializer(model, node.input[1]) if attrs.get("transB", 0) else node.input[1]
    has_bias = len(node.input) > 2 and node.input[2]
    product = f"{node.output[0]}__matmul" if has_bias else node.output[0]
    nodes = [helper.make_node("MatMul", [node.input[0], weight], [product], name=f"{node.name}_MatMul")]
    if has_bias:
        nodes.append(
            helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}_Add")
        )
    for new in nodes:  # keep the module path, so --exclude by module name still finds them
        new.metadata_props.extend(node.metadata_props)
    return nodes


def _fold_transpose(model: onnx.ModelProto, node: onnx.NodeProto, producers: dict, inits: dict) -> bool:
    """MatMul(x, Transpose(W)) with W constant -> MatMul(x, W^T) stored as an initializer."""
    source = producers.get(node.input[1])
    if source is None or source.op_type != "Transpose" or source.input[0] not in inits:
        return False
    if inits[source.input[0]].dims.__len__() != 2 or _attrs(source).get("perm", [1, 0]) != [1, 0]:
        return False
    node.input[1] = _transposed_initializer(model, source.input[0])
    return True


def prepare_weight_matmuls(model: onnx.ModelProto) -> dict[str, int]:
    """Rewrite constant-weight Gemm into MatMul(+Add) and fold constant transposes, in place."""
    inits = _initializers(model)
    rewritten, folded, nodes = 0, 0, []
    for node in model.graph.node:
        replacement = _rewrite_gemm(model, node, inits) if node.op_type == "Gemm" else None
        rewritten += replacement is not None
        nodes.extend(replacement or [node])
    producers = {out: node for node in nodes for out in node.output}
    for node in nodes:
        if node.op_type == "MatMul":
            folded += _fold_transpose(model, node, producers, _initializers(model))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    _drop_unused_initializers(model)
    return {"gemm_rewritten": rewritten, "transpose_folded": folded}


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
    # Transposes feeding only folded MatMuls are dead now; drop them, then their weights if unused.
    live = [n for n in model.graph.node if n.op_type != "Transpose" or any(o in used for o in n.output)]
    del model.graph.node[:]
    model.graph.node.extend(live)
    used = {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
    kept = [init for init in model.graph.initializer if init.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)


def _reads_table(model: onnx.ModelProto, op_type: str, index: int) -> list[str]:
    """Names of ``op_type`` nodes whose input ``index`` is a 2-D initializer."""
    inits = _initializers(model)
    return [
        node.name
        for node in model.graph.node
        if node.op_type == op_type and node.input[index] in inits and len(inits[node.input[index]].dims) == 2
    ]


def weight_matmuls(model: onnx.ModelProto) -> list[str]:
    """Names of MatMul nodes whose weight (second input) is a constant matrix: the ones worth quantizing."""
    return _reads_table(model, "MatMul", 1)


def weight_convs(model: onnx.ModelProto) -> list[str]:
    """Names of Conv nodes whose kernel (second input) is a constant."""
    inits = _initializers(model)
    return [node.name for node in model.graph.node if node.op_type == "Conv" and node.input[1] in inits]


def embedding_gathers(model: onnx.ModelProto) -> list[str]:
    """Names of Gather nodes that look rows up in a constant table: embeddings."""
    return _reads_table(model, "Gather", 0)


def count_ops(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


# How the exporter sometimes spells a child module's attribute access: on the full-size SD 1.5 UNet it
# recorded "unet.__dict__['_modules']['conv_in']" where the tiny one reads "unet.conv_in".
_MODULES_ACCESS = re.compile(r"\.__dict__\[_modules\]\[([^\]]+)\]")


def module_path(node: onnx.NodeProto) -> str:
    """The PyTorch module a node came from ("transformer.h.0.mlp.c_fc"), from the exporter's metadata,
    always in dotted form, so that exclude patterns anchored at the end ("*conv_in") match."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            scopes = [scope for scope in prop.value.strip("[]").replace("'", "").split(", ") if scope]
            path = scopes[-2] if len(scopes) >= 2 else ""
            return _MODULES_ACCESS.sub(r".\1", path.strip('"'))
    return ""


def excluded_nodes(model: onnx.ModelProto, patterns: tuple[str, ...]) -> list[str]:
    """Node names matching any fnmatch pattern by node name or by module path."""
    from fnmatch import fnmatchcase

    def matches(node: onnx.NodeProto) -> bool:
        names = (node.name, module_path(node))  # the path parsed once a node, not once a pattern
        return any(fnmatchcase(name, pattern) for pattern in patterns for name in names)

    return [node.name for node in model.graph.node if matches(node)]


@contextlib.contextmanager
def quiet_quantizer_logs():
    """onnxruntime's quantizers log per tensor on the root logger, and importing the MatMulNBits
    quantizer installs a root handler at INFO. Keep both to this block: restore the root logger after."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    import onnxruntime.quantization.matmul_nbits_quantizer  # noqa: F401  (its import calls basicConfig)

    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
