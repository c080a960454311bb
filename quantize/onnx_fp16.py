"""float16 weights and compute, with an fp32 keep-list for the numerically fragile operators.

LayerNormalization statistics and Softmax overflow or lose precision in fp16 (a softmax input of
65504 is already infinite), so they, and any node matched by ``--exclude``, stay fp32 with casts
around them; graph inputs and outputs stay fp32 so callers need no change. fp16 is a GPU format:
onnxruntime on CPU runs it, but slower than fp32 (casts and no fp16 kernels). ::

    stats = convert_fp16(model, out_path, options, exclude=[], external_data=False)
"""

from __future__ import annotations

from pathlib import Path

import onnx

from .graph_prep import quiet_quantizer_logs

# Operators kept in fp32 by default, in addition to onnxruntime's own block list.
FP32_OPS = ("LayerNormalization", "Softmax", "ReduceMean", "Pow", "Sqrt", "Erf")


def convert_fp16(
    model: onnx.ModelProto, out_path: Path, options: dict, exclude: list[str], external_data: bool
) -> dict:
    with quiet_quantizer_logs():
        from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

        keep = [*DEFAULT_OP_BLOCK_LIST, *(FP32_OPS if options.get("keep_fp32_ops", True) else ())]
        converted = convert_float_to_float16(
            model, keep_io_types=True, op_block_list=keep, node_block_list=exclude, disable_shape_infer=True
        )
    onnx.save_model(
        converted, str(out_path), save_as_external_data=external_data, location=f"{out_path.name}.data"
    )
    halves = sum(init.data_type == onnx.TensorProto.FLOAT16 for init in converted.graph.initializer)
    return {"quantized_nodes": halves, "node_type": "float16 initializers"}
