"""Export one declared component (a named ``nn.Module`` wrapper) to a checked ONNX graph.

Family files declare ``Component`` objects; this module turns each into a graph file with the dynamo
exporter, names its dynamic axes, decides on external data, runs ``onnx.checker`` and returns the
``ComponentSpec`` the manifest records::

    spec = export_component(component, staging_dir, opset=18)
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch

from modelkiln.exporters.attention import fuse_attention
from modelkiln.exporters.kv_attention import TRANSLATIONS
from modelkiln.manifest import ComponentSpec, TensorSpec

# Protobuf cannot hold a message over 2 GiB, so larger graphs must keep their weights outside.
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3 - 64 * 1024**2

_ONNX_DTYPES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.BFLOAT16: "bfloat16",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.BOOL: "bool",
    onnx.TensorProto.UINT8: "uint8",
    onnx.TensorProto.INT8: "int8",
}


@dataclass(frozen=True)
class Component:
    """One graph a family exports: a wrapper module and how to trace it."""

    name: str  # graph name in the manifest; the file is <name>.onnx
    module: torch.nn.Module  # named wrapper whose forward is the graph
    example_inputs: dict[str, torch.Tensor]  # forward arguments in order, keyed by ONNX input name
    output_names: tuple[str, ...]  # ONNX output names in forward's return order
    dynamic_axes: dict[str, dict[int, str]]  # input or output name -> {axis: symbolic name}
    # Rewrite its attention into onnxruntime's MultiHeadAttention (see exporters/attention.py); set only
    # where the fused graph was measured faster than the exported one.
    fuse_attention: bool = False


def _parameter_bytes(module: torch.nn.Module) -> int:
    unique = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return sum(t.numel() * t.element_size() for t in unique.values())


def _dynamic_shapes(component: Component) -> tuple:
    """torch.export dims for every input; ONNX names are applied after export (see _name_axes).

    torch.export groups the inputs that land in ``*args`` into one tuple, so the dims are grouped the
    same way.
    """
    dyn = torch.export.Dim.DYNAMIC
    flat = [
        {axis: dyn for axis in component.dynamic_axes.get(name, {})} or None
        for name in component.example_inputs
    ]
    params = inspect.signature(component.module.forward).parameters.values()
    if not any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return tuple(flat)
    fixed = sum(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params)
    return (*flat[:fixed], tuple(flat[fixed:]))


def _name_axes(model: onnx.ModelProto, dynamic_axes: dict[str, dict[int, str]]) -> None:
    """Replace the exporter's generated symbols (s12, s3 + s7) with the declared axis names."""
    for value in [*model.graph.input, *model.graph.output]:
        for axis, name in dynamic_axes.get(value.name, {}).items():
            dim = value.type.tensor_type.shape.dim[axis]
            dim.ClearField("dim_value")
            dim.dim_param = name


def _tensor_specs(values) -> list[TensorSpec]:
    specs = []
    for value in values:
        tensor_type = value.type.tensor_type
        shape = [dim.dim_param or dim.dim_value for dim in tensor_type.shape.dim]
        dtype = _ONNX_DTYPES.get(tensor_type.elem_type, str(tensor_type.elem_type))
        specs.append(TensorSpec(name=value.name, dtype=dtype, shape=shape))
    return specs


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter prints progress lines, warns, and logs about optional packages (torchvision); keep
    all three out of the CLI's output for the duration of one export, restoring everything after."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _trace(component: Component, opset: int) -> torch.onnx.ONNXProgram:
    with _quiet_exporter(), torch.no_grad():
        return torch.onnx.export(
            component.module,
            tuple(component.example_inputs.values()),
            input_names=list(component.example_inputs),
            output_names=list(component.output_names),
            dynamic_shapes=_dynamic_shapes(component),
            opset_version=opset,
            dynamo=True,
            verbose=False,
            # The decoders' cache attention ops become onnxruntime's fused kernels (exporters.kv_attention).
            custom_translation_table=TRANSLATIONS,
        )


def export_component(
    component: Component,
    directory: Path,
    opset: int,
    external_data: bool | None = None,
    fuse: bool = True,
) -> ComponentSpec:
    """Export, name axes, fuse, check, and describe one component. ``external_data=None`` decides by
    size; ``fuse=False`` skips the attention fusion the component declares."""
    component.module.eval()
    program = _trace(component, opset)
    path = directory / f"{component.name}.onnx"
    use_external = external_data
    if use_external is None:
        use_external = _parameter_bytes(component.module) > EXTERNAL_DATA_THRESHOLD
    program.save(str(path), external_data=use_external)
    del program
    model = onnx.load(str(path), load_external_data=False)
    _name_axes(model, component.dynamic_axes)
    fused = {}
    if fuse and component.fuse_attention:
        fused["MultiHeadAttention"] = fuse_attention(model)
    onnx.save_model(model, str(path))
    onnx.checker.check_model(str(path))  # by path, so graphs over 2 GB are checked too
    data_file = f"{path.name}.data"
    return ComponentSpec(
        file=path.name,
        external_data=data_file if (directory / data_file).exists() else None,
        inputs=_tensor_specs(model.graph.input),
        outputs=_tensor_specs(model.graph.output),
        fused=fused,
    )
