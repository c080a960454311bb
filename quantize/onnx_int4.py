"""int4 weight-only quantization with onnxruntime's MatMulNBits (block-wise, RTN or HQQ).

Weights are stored as 4-bit blocks with one scale (and zero point when asymmetric) per block; the
activations stay fp32. On CPUs without VNNI the speed-up comes only with ``accuracy_level=4``
(int8 compute inside MatMulNBits); without it, decode is no faster than fp32, so 4 is the default. ::

    stats = quantize_int4_weight(model, out_path, {"block_size": 128, ...}, exclude=[], external_data=False)
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path

import onnx

from .graph_prep import count_ops, embedding_gathers, quiet_quantizer_logs, weight_matmuls


def _algo_config(options: dict):
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits  # imported under quiet logs

    algorithm = options.get("algorithm", "rtn")
    if algorithm == "hqq":
        return nbits.HQQWeightOnlyQuantConfig(block_size=options["block_size"], bits=4)
    return nbits.RTNWeightOnlyQuantConfig()


@quiet_quantizer_logs()  # a context manager, used as a decorator: the whole call is quiet
def quantize_int4_weight(
    model: onnx.ModelProto, out_path: Path, options: dict, exclude: list[str], external_data: bool
) -> dict:
    """Replace every constant-weight MatMul not excluded by MatMulNBits; return the node count."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    embeddings = [name for name in embedding_gathers(model) if name not in exclude]
    if options.get("quantize_embeddings", True) and embeddings:
        model = _int8_tables(model, out_path.parent, embeddings)
    skip = [name for name in _all_matmuls(model) if name in exclude or name not in weight_matmuls(model)]
    quantizer = MatMulNBitsQuantizer(
        model,
        bits=4,
        block_size=options["block_size"],
        is_symmetric=options.get("symmetric", True),
        accuracy_level=options.get("accuracy_level", 4),
        nodes_to_exclude=skip,
        algo_config=_algo_config(options),
    )
    # The quantizer prints a progress bar per node to stdout; keep the CLI's output readable.
    with contextlib.redirect_stdout(io.StringIO()):
        quantizer.process()
    quantizer.model.save_model_to_file(str(out_path), use_external_data_format=external_data)
    counts = count_ops(onnx.load(str(out_path), load_external_data=False))
    return {
        "quantized_nodes": counts.get("MatMulNBits", 0),
        "node_type": "MatMulNBits",
        "quantized_embeddings": counts.get("DequantizeLinear", 0),
    }


def _int8_tables(model: onnx.ModelProto, scratch: Path, gathers: list[str]) -> onnx.ModelProto:
    """The model with its embedding tables stored int8 and gathered per row.

    4-bit Gather needs opset 21 (these graphs are 18), and an fp32 table beside 4-bit matmuls would be
    most of the decoder's bytes (GPT-2: 154 of ~190 MB). Done before MatMulNBits, whose contrib op the
    int8 quantizer's shape inference cannot read.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        path = Path(tmp) / "tables.onnx"
        quantize_dynamic(
            model,
            path,
            op_types_to_quantize=["Gather"],
            weight_type=QuantType.QInt8,
            nodes_to_quantize=gathers,
            use_external_data_format=True,
        )
        return onnx.load(str(path))


def _all_matmuls(model: onnx.ModelProto) -> list[str]:
    return [node.name for node in model.graph.node if node.op_type == "MatMul"]
