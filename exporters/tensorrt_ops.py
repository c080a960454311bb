"""What TensorRT's ONNX parser accepts: its operator support matrix as data, for the ``tensorrt`` target.

Transcribed from the matrix NVIDIA publishes with the parser, ``docs/operators.md`` of onnx/onnx-tensorrt
at the "ONNX-TensorRT 10.1 GA release" (commit 96e7811, June 2024):
https://github.com/onnx/onnx-tensorrt/blob/96e7811/docs/operators.md. That page covers TensorRT 10.x
(opset 9 to 20). Only the standard ``ai.onnx`` domain is listed there: any other domain (onnxruntime's
``com.microsoft`` contrib ops) has no importer. ``exporters.targets`` checks every node against this
table; the restriction fields below are the matrix's "Restrictions" column in checkable form.
"""

from __future__ import annotations

from dataclasses import dataclass, field

TENSORRT_VERSION = "10.1"  # the parser release the table was transcribed from
SOURCE = "https://github.com/onnx/onnx-tensorrt/blob/96e7811/docs/operators.md"
OPSETS = (9, 20)  # default-domain opsets the parser imports, inclusive

# ONNX TensorProto data type name -> the matrix's type name. DOUBLE is cast down to FP32 by the parser
# ("limited support"), so it counts as FP32 here.
TYPE_NAMES: dict[str, str] = {
    "FLOAT": "FP32",
    "DOUBLE": "FP32",
    "FLOAT16": "FP16",
    "BFLOAT16": "BF16",
    "INT32": "INT32",
    "INT64": "INT64",
    "INT8": "INT8",
    "UINT8": "UINT8",
    "INT4": "INT4",
    "FLOAT8E4M3FN": "FP8",
    "BOOL": "BOOL",
}

FLOAT = ("FP32", "FP16", "BF16")
NUMERIC = (*FLOAT, "INT32", "INT64")
ANY = (*NUMERIC, "BOOL")


@dataclass(frozen=True)
class OpSupport:
    """One supported operator of the matrix."""

    types: tuple[str, ...]  # the matrix's "Supported Types", checked on input ``typed_input``
    typed_input: int | None = 0  # input whose element type the types describe; None: not checkable
    constant_inputs: tuple[int, ...] = ()  # inputs that must be initializers when given ("`axes` ...")
    zero_point_input: int | None = None  # input that must hold only zeros when given (Q/DQ zero points)
    attributes: dict[str, tuple] = field(default_factory=dict)  # attribute -> allowed values (each element)
    forbidden_attributes: tuple[str, ...] = ()  # attributes the parser does not read
    outputs: int | None = None  # how many leading outputs may be used; None: all
    note: str = ""  # the matrix's restriction text this entry encodes


_AXES = "`axes` must be an initializer"
_REDUCE = OpSupport(NUMERIC, constant_inputs=(1,), note=_AXES)
_POOL = OpSupport(FLOAT, attributes={"dilations": (1,)}, note="`dilations` must be empty or all ones")

# fmt: off
SUPPORTED: dict[str, OpSupport] = {
    **{
        op: OpSupport(FLOAT)
        for op in (
            "Acos", "Acosh", "Asin", "Asinh", "Atan", "Atanh", "BatchNormalization", "Ceil", "Celu",
            "Clip", "Conv", "ConvTranspose", "Cos", "Cosh", "Einsum", "Elu", "Erf", "Exp", "Floor",
            "Gemm", "GlobalAveragePool", "GlobalLpPool", "GlobalMaxPool", "GroupNormalization",
            "HardSigmoid", "HardSwish", "ImageScaler", "InstanceNormalization", "IsInf", "LeakyRelu",
            "Log", "LogSoftmax", "LRN", "LpNormalization", "MatMul", "MeanVarianceNormalization",
            "ParametricSoftplus", "Pow", "PRelu", "RandomNormal", "RandomNormalLike", "RandomUniform",
            "RandomUniformLike", "Reciprocal", "Round", "ScaledTanh", "Scan", "Selu", "Sigmoid", "Sin",
            "Sinh", "Softmax", "Softplus", "Softsign", "Sqrt", "Tan", "Tanh", "ThresholdedRelu",
            "Upsample", "RNN", "GRU",
        )
    },
    **{
        op: OpSupport(NUMERIC)
        for op in (
            "Abs", "Add", "ArgMax", "ArgMin", "DepthToSpace", "Div", "Equal", "Greater", "GreaterOrEqual",
            "Less", "LessOrEqual", "Max", "Min", "Mod", "Mul", "Neg", "Range", "Relu", "Scatter",
            "ScatterElements", "Shrink", "Sign", "SpaceToDepth", "Sub", "Sum",
        )
    },
    **{
        op: OpSupport(ANY)
        for op in (
            "Concat", "Expand", "Flatten", "Gather", "GatherElements", "GatherND", "Identity", "If",
            "Loop", "OneHot", "Reshape", "ReverseSequence", "Shape", "Size", "Split", "Tile", "Transpose",
            "Trilu",
        )
    },
    **{op: OpSupport(("BOOL",)) for op in ("And", "Not", "Or", "Xor")},
    **{
        op: _REDUCE
        for op in (
            "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
            "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare",
        )
    },
    **{op: _POOL for op in ("AveragePool", "LpPool")},
    "MaxPool": OpSupport(FLOAT, attributes={"dilations": (1,)}, outputs=1, note="no `Indices` output"),
    "Cast": OpSupport((*ANY, "UINT8")),
    "CastLike": OpSupport((*ANY, "UINT8")),
    "Where": OpSupport(ANY, typed_input=1),  # its condition is BOOL; the matrix's types are X's and Y's
    "Constant": OpSupport(
        ANY,
        typed_input=None,
        forbidden_attributes=("sparse_value", "value_string", "value_strings"),
        note="`sparse_value`, `value_string`, and `value_strings` attributes are unsupported",
    ),
    "ConstantOfShape": OpSupport(ANY, typed_input=None),  # its input is always an INT64 shape
    "CumSum": OpSupport(FLOAT, constant_inputs=(1,), note="`axis` must be an initializer"),
    "DequantizeLinear": OpSupport(
        ("INT8", "FP8", "INT4"), zero_point_input=2, note="`x_zero_point` must be zero"
    ),
    "QuantizeLinear": OpSupport(FLOAT, zero_point_input=2, note="`y_zero_point` must be 0"),
    "Dropout": OpSupport(FLOAT, constant_inputs=(2,), note="`is_training` must be an initializer"),
    "Gelu": OpSupport((*NUMERIC, "INT8")),
    "LayerNormalization": OpSupport(FLOAT, outputs=1, note="only the first output `Y` is supported"),
    "Mean": OpSupport((*NUMERIC, "FP8")),
    "Mish": OpSupport(("FP32", "FP16")),
    "NonMaxSuppression": OpSupport(("FP32", "FP16")),
    "NonZero": OpSupport(("FP32", "FP16")),
    "GridSample": OpSupport(("FP32", "FP16")),
    "RoiAlign": OpSupport(("FP32", "FP16")),
    "DeformConv": OpSupport(("FP32", "FP16")),
    "EyeLike": OpSupport(ANY),
    "Hardmax": OpSupport(FLOAT),
    "IsNaN": OpSupport(NUMERIC),
    "LSTM": OpSupport(FLOAT, attributes={"input_forget": (0,), "layout": (0,)}),
    "Pad": OpSupport(NUMERIC, constant_inputs=(3,), note=_AXES),
    "Resize": OpSupport(
        FLOAT,
        attributes={
            "coordinate_transformation_mode": (
                "half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners",
            ),
            "mode": ("nearest", "linear"),
            "nearest_mode": ("floor", "ceil", "round_prefer_floor", "round_prefer_ceil"),
            "keep_aspect_ratio_policy": ("stretch",),
            "antialias": (0,),
        },
        note="modes, nearest modes and coordinate transforms as listed; no antialiasing",
    ),
    "ScatterND": OpSupport(NUMERIC, attributes={"reduction": ("none",)}, note="`reduction` is not supported"),
    "Slice": OpSupport(ANY, constant_inputs=(3,), note=_AXES),
    "Squeeze": OpSupport(ANY, constant_inputs=(1,), note=_AXES),
    "Unsqueeze": OpSupport(ANY, constant_inputs=(1,), note="`axes` must be a constant tensor"),
    "TopK": OpSupport(NUMERIC, attributes={"sorted": (1,)}, note="`sorted` must be 1"),
}
# fmt: on

# Marked "N" in the matrix: named so that the error says the parser has no importer for them.
UNSUPPORTED: frozenset[str] = frozenset(
    (
        "AffineGrid", "Bernoulli", "BitShift", "BitwiseAnd", "BitwiseNot", "BitwiseOr", "BitwiseXor",
        "BlackmanWindow", "Col2Im", "CenterCropPad", "Compress", "ConcatFromSequence", "ConvInteger", "DFT",
        "Det", "DynamicQuantizeLinear", "HammingWindow", "HannWindow", "ImageDecoder", "MatMulInteger",
        "MaxRoiPool", "MaxUnpool", "MelWeightMatrix", "Multinomial", "NegativeLogLikelihoodLoss",
        "Optional", "OptionalGetElement", "OptionalHasElement", "QLinearConv", "QLinearMatMul",
        "RegexFullMatch", "STFT", "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase",
        "SequenceInsert", "SequenceLength", "SequenceMap", "SoftmaxCrossEntropyLoss", "SplitToSequence",
        "StringConcat", "StringNormalizer", "StringSplit", "TfIdfVectorizer", "Unique",
    )
)  # fmt: skip
