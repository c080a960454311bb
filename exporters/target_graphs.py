"""Make an exported graph fit its target, and check every node against what the target takes.

    finish_for_target(path, get_target("tensorrt"))   # constants -> initializers, checked, saved
    problems = incompatible_nodes(model, target, base_dir)   # ["node /x/Mul_3 (Foo): ...", ...]

For ``portable`` and ``tensorrt`` every ``Constant`` node of the main graph becomes an initializer: the
parser's restrictions ask for initializers ("`axes` must be an initializer"), and a graph whose every
constant is an initializer is what refitting and weight-stripping tools read. The check names each node
and its op, so an export that would not parse in TensorRT fails at export, not on the GPU machine.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from modelkiln.errors import KilnError

from .targets import Target
from .tensorrt_ops import OPSETS, SOURCE, SUPPORTED, TENSORRT_VERSION, TYPE_NAMES, UNSUPPORTED

STANDARD_DOMAINS = ("", "ai.onnx")
MAX_LISTED = 5  # problems named in one error line


def default_opset(model: onnx.ModelProto) -> int:
    return next(entry.version for entry in model.opset_import if entry.domain in STANDARD_DOMAINS)


def constants_to_initializers(model: onnx.ModelProto) -> int:
    """Move every main-graph ``Constant`` node into an initializer of the same name; returns how many."""
    graph = model.graph
    moved = [node for node in graph.node if node.op_type == "Constant" and node.domain in STANDARD_DOMAINS]
    for node in moved:
        # A Constant carries its value in exactly one attribute: a tensor, or one of the scalar forms.
        value = onnx.helper.get_attribute_value(node.attribute[0])
        if not isinstance(value, onnx.TensorProto):
            value = numpy_helper.from_array(_scalar_constant(node.attribute[0].name, value))
        value.name = node.output[0]
        graph.initializer.append(value)
        graph.node.remove(node)
    return len(moved)


def _scalar_constant(attribute: str, value) -> np.ndarray:
    kinds = {
        "value_float": np.float32,
        "value_floats": np.float32,
        "value_int": np.int64,
        "value_ints": np.int64,
    }
    if attribute not in kinds:
        raise KilnError(f"a Constant node holds a {attribute}, which no ONNX target here can take.")
    return np.asarray(value, dtype=kinds[attribute])


def integer_cumsums_in_float(model: onnx.ModelProto) -> int:
    """Run each integer ``CumSum`` (OPT's positions from its attention mask) in fp32 between two Casts:
    TensorRT's parser takes CumSum on floats only. Exact while every partial sum is below 2**24, which a
    sum of mask ones over a sequence is."""
    types = _element_types(model)
    graph = model.graph
    nodes, rewritten = [], 0
    for node in graph.node:
        kind = types.get(node.input[0]) if node.op_type == "CumSum" else None
        if kind not in ("INT32", "INT64"):
            nodes.append(node)
            continue
        name, out = node.name or node.output[0], node.output[0]
        back = getattr(onnx.TensorProto, kind)
        cast_in = onnx.helper.make_node("Cast", [node.input[0]], [f"{name}_f"], f"{name}_to_float", to=1)
        node.input[0], node.output[0] = f"{name}_f", f"{name}_sum"
        cast_out = onnx.helper.make_node("Cast", [f"{name}_sum"], [out], f"{name}_to_int", to=back)
        nodes += [cast_in, node, cast_out]
        rewritten += 1
    if rewritten:
        del graph.node[:]
        graph.node.extend(nodes)
    return rewritten


def _element_types(model: onnx.ModelProto) -> dict[str, str]:
    """Value name -> the matrix's type name, inferred from the inputs and initializers: the recorded
    value_info is dropped first, since rewriters (the fp16 converter) can leave stale types in it."""
    bare = onnx.ModelProto()
    bare.CopyFrom(model)
    del bare.graph.value_info[:]
    inferred = onnx.shape_inference.infer_shapes(bare, strict_mode=False)
    graph = inferred.graph
    types = {}
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if value.type.tensor_type.elem_type:
            types[value.name] = onnx.TensorProto.DataType.Name(value.type.tensor_type.elem_type)
    for init in graph.initializer:
        types[init.name] = onnx.TensorProto.DataType.Name(init.data_type)
    return {name: TYPE_NAMES.get(kind, kind) for name, kind in types.items()}


def _is_zero(initializer: onnx.TensorProto, base_dir: Path | None) -> bool:
    array = numpy_helper.to_array(initializer, base_dir=os.fspath(base_dir) if base_dir else "")
    return not np.any(array)


def _attribute_problem(node: onnx.NodeProto, allowed: dict[str, tuple]) -> str | None:
    for attribute in node.attribute:
        if attribute.name not in allowed:
            continue
        value = onnx.helper.get_attribute_value(attribute)
        values = value if isinstance(value, list) else [value]
        values = [v.decode() if isinstance(v, bytes) else v for v in values]
        if any(v not in allowed[attribute.name] for v in values):
            return (
                f"{attribute.name}={values} (TensorRT takes {', '.join(map(str, allowed[attribute.name]))})"
            )
    return None


def _tensorrt_problem(node: onnx.NodeProto, context: dict) -> str | None:
    """Why TensorRT's parser refuses ``node``, or None when the matrix supports it as used."""
    where = f"TensorRT {TENSORRT_VERSION}'s ONNX parser"
    if node.op_type in UNSUPPORTED:
        return f"{where} has no importer for {node.op_type}"
    support = SUPPORTED.get(node.op_type)
    if support is None:
        return f"{node.op_type} is not in {where}'s operator support matrix"
    initializers = context["initializers"]
    given = [name for name in node.input]
    typed = support.typed_input
    kind = context["types"].get(given[typed]) if typed is not None and typed < len(given) else None
    if kind is not None and kind not in support.types:
        return f"input type {kind}; {where} takes {node.op_type} on {', '.join(support.types)}"
    for index in support.constant_inputs:
        if index < len(given) and given[index] and given[index] not in initializers:
            return f"input {index} ({given[index]}) is computed; {where} needs it as an initializer"
    zero_point = support.zero_point_input
    if zero_point is not None and zero_point < len(given) and given[zero_point]:
        init = initializers.get(given[zero_point])
        if init is None or not _is_zero(init, context["base_dir"]):
            return f"zero point {given[zero_point]} is not all zeros; {where} takes symmetric (zero point 0) Q/DQ"
    if forbidden := [a.name for a in node.attribute if a.name in support.forbidden_attributes]:
        return f"attribute {forbidden[0]} is unsupported by {where}"
    if support.outputs is not None and any(node.output[support.outputs :]):
        return f"uses output {support.outputs + 1}; {where} supports {support.note or 'fewer outputs'}"
    attribute = _attribute_problem(node, support.attributes)
    return f"{attribute}, unsupported by {where}" if attribute else None


def incompatible_nodes(model: onnx.ModelProto, target: Target, base_dir: Path | None = None) -> list[str]:
    """One line per node (of the main graph) the target cannot take: name, op and why."""
    problems = []
    opset = default_opset(model)
    if opset < target.min_opset:
        problems.append(f"opset {opset} is below the {target.name} target's {target.min_opset}")
    if target.tensorrt_ops and not OPSETS[0] <= opset <= OPSETS[1]:
        problems.append(f"opset {opset} is outside TensorRT {TENSORRT_VERSION}'s {OPSETS[0]}..{OPSETS[1]}")
    context = {
        "initializers": {init.name: init for init in model.graph.initializer},
        "types": _element_types(model) if target.tensorrt_ops else {},
        "base_dir": base_dir,
    }
    for node in model.graph.node:
        why = None
        if target.standard_ops_only and node.domain not in STANDARD_DOMAINS:
            why = f"domain {node.domain} is not standard ONNX"
        elif target.standard_ops_only and node.op_type == "Constant":
            why = "a Constant node where the target needs an initializer"
        elif target.tensorrt_ops:
            why = _tensorrt_problem(node, context)
        if why:
            problems.append(f"node {node.name or node.output[0]} ({node.op_type}): {why}")
    return problems


def check_target(model: onnx.ModelProto, target: Target, what: str, base_dir: Path | None = None) -> None:
    """Raise naming the incompatible nodes of ``what`` (a component), or return when there are none."""
    problems = incompatible_nodes(model, target, base_dir)
    if problems:
        more = f" (and {len(problems) - MAX_LISTED} more)" if len(problems) > MAX_LISTED else ""
        matrix = f" The matrix: {SOURCE}." if target.tensorrt_ops else ""
        raise KilnError(
            f"{what} cannot be made for target {target.name}: {'; '.join(problems[:MAX_LISTED])}{more}."
            f"{matrix} Export with --target onnxruntime to run it on onnxruntime instead."
        )


def finish_for_target(path: Path, target: Target, what: str) -> None:
    """Rewrite the graph at ``path`` for ``target`` (in place, weights untouched) and check it."""
    if not target.standard_ops_only:
        return
    model = onnx.load(str(path), load_external_data=False)
    constants_to_initializers(model)
    if target.tensorrt_ops:
        integer_cumsums_in_float(model)
    check_target(model, target, what, path.parent)
    onnx.save_model(model, str(path))
    onnx.checker.check_model(str(path))
