"""The quantization scheme registry: a plain dict from scheme name to how it is applied.

A leaf: it imports nothing heavier than the standard library, so the CLI can list schemes and check
options before onnx or torch is loaded. Each scheme names the function that makes it by import path::

    scheme = get_scheme("int8-dynamic")
    stats = scheme.load_apply()(model, out_path, options, exclude, external_data)   # kind "onnx"
    bnb_kwargs = scheme.load_apply()(options)                                        # kind "torch"
    part, part_opts = component_scheme(get_scheme("mixed-int8-int4"), "decoder", options)  # mixed

A mixed scheme names, per graph, the uniform scheme that quantizes it; its options are its parts'
options prefixed with the graph's name (``decoder.block_size``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from modelkiln.errors import KilnError

INT4_ALGORITHMS = ("rtn", "hqq")  # GPTQ needs calibration data through onnxruntime's own reader; not offered


@dataclass(frozen=True)
class Scheme:
    """One way to make a lower-precision variant: of ONNX graphs, or of the PyTorch model (bitsandbytes)."""

    name: str  # registry key, recorded in the manifest
    precision: str  # what the quantized weights are stored as
    description: str  # one line for help texts and reports
    # "module:function" that makes it. onnx: (model, out_path, options, exclude, external_data) -> stats;
    # torch: options -> BitsAndBytesConfig kwargs. Imported on use, so listing schemes stays cheap.
    apply: str
    options: dict  # option name -> default; anything else is refused
    choices: dict[str, tuple] = field(default_factory=dict)  # option name -> the values it accepts
    calibrated: bool = False  # apply also takes recorded input feeds (static activation ranges)
    kind: str = "onnx"  # "onnx" rewrites the parent's graphs; "torch" makes a torch artifact (quantize.bnb)
    notes: str = ""  # when to use it, for the README's scheme table (markdown)
    # Mixed schemes: graph name -> the uniform scheme that quantizes it (``apply`` is then unused, and
    # ``options`` holds the parts' options as "graph.option"). Empty for a uniform scheme.
    parts: dict[str, str] = field(default_factory=dict)

    def load_apply(self) -> Callable[..., dict]:
        module, _, name = self.apply.partition(":")
        return getattr(importlib.import_module(module), name)


SCHEMES: dict[str, Scheme] = {
    "int8-dynamic": Scheme(
        name="int8-dynamic",
        precision="int8",
        description="onnxruntime dynamic quantization: int8 per-channel weights, activations quantized per call",
        apply="modelkiln.quantize.onnx_int8:quantize_int8_dynamic",
        options={"per_channel": True, "quantize_embeddings": True},
        notes="fastest on CPUs without VNNI for decoders",
    ),
    "int4-weight": Scheme(
        name="int4-weight",
        precision="int4",
        description=f"MatMulNBits weight-only int4, 128-weight blocks ({'/'.join(INT4_ALGORITHMS)}), accuracy_level 4",
        apply="modelkiln.quantize.onnx_int4:quantize_int4_weight",
        options={
            # One fp32 scale per 128 weights: 0.53 bytes a weight against 0.63 at 32, which is what
            # brings a full ViT-GPT2 to 18% of its fp32 size (20.2% at 32) with the same agreement on
            # the shipped captioner; onnxruntime's own default too.
            "block_size": 128,
            "symmetric": True,
            "accuracy_level": 4,
            "algorithm": "rtn",
            "quantize_embeddings": True,
        },
        # MatMulNBits takes power-of-two blocks of at least 16 weights.
        choices={"block_size": (16, 32, 64, 128, 256), "algorithm": INT4_ALGORITHMS},
        notes="`accuracy_level=4` by default: without it int4 is no faster than fp32 on this class of CPU",
    ),
    "int8-static": Scheme(
        name="int8-static",
        precision="int8",
        description="QDQ int8 of matmuls and convolutions, activation ranges calibrated on recorded inputs",
        apply="modelkiln.quantize.onnx_int8:quantize_int8_static",
        # Convolutions too: QLinearConv ran 1.58x the fp32 Conv here, and an SD 1.x UNet's 98 convolutions
        # are 55% of its step's FLOPs (MatMul-only int8 left the step at 1.37x eager).
        options={"per_channel": True, "symmetric_activations": False, "convolutions": True},
        calibrated=True,
        notes="`--calibration-images DIR`; symmetric (zero point 0) for `--target tensorrt` artifacts",
    ),
    "fp16": Scheme(
        name="fp16",
        precision="fp16",
        description="float16 with LayerNorm/Softmax and --exclude nodes kept fp32; fp32 inputs/outputs (GPU format)",
        apply="modelkiln.quantize.onnx_fp16:convert_fp16",
        options={"keep_fp32_ops": True},
        notes="a GPU format: onnxruntime on CPU runs it slower than fp32",
    ),
    "bnb-int8": Scheme(
        name="bnb-int8",
        precision="int8",
        description="bitsandbytes LLM.int8 (Linear8bitLt): a PyTorch variant run with transformers",
        apply="modelkiln.quantize.bnb_common:int8_config",
        options={"llm_int8_threshold": 6.0},
        kind="torch",
        notes="needs `modelkiln[bnb]`; a PyTorch variant (`save_pretrained`), manifest kind `torch`",
    ),
    "bnb-nf4": Scheme(
        name="bnb-nf4",
        precision="nf4",
        description="bitsandbytes 4-bit NormalFloat (Linear4bit): a PyTorch variant run with transformers",
        apply="modelkiln.quantize.bnb_common:nf4_config",
        options={"double_quant": False},
        kind="torch",
        notes="needs `modelkiln[bnb]`; layers too narrow for bitsandbytes' 4-bit CPU packing stay fp32",
    ),
    "bnb-fp4": Scheme(
        name="bnb-fp4",
        precision="fp4",
        description="bitsandbytes 4-bit float (Linear4bit): a PyTorch variant run with transformers",
        apply="modelkiln.quantize.bnb_common:fp4_config",
        options={"double_quant": False},
        kind="torch",
        notes="needs `modelkiln[bnb]`; layers too narrow for bitsandbytes' 4-bit CPU packing stay fp32",
    ),
}


def mixed_scheme(name: str, description: str, parts: dict[str, str], notes: str) -> Scheme:
    """A scheme that quantizes each graph with its own uniform scheme. Its options are the parts' own
    (defaults included) prefixed with the graph's name, so the two can never drift apart."""
    options = {
        f"{graph}.{key}": value
        for graph, part in parts.items()
        for key, value in SCHEMES[part].options.items()
    }
    precision = "+".join(SCHEMES[part].precision for part in parts.values())
    return Scheme(name, precision, description, apply="", options=options, notes=notes, parts=parts)


# The encoder is a few large GEMMs, compute-bound: int8 GEMM is the fastest (int8-static's QDQ 1.10x and
# MatMulNBits 1.5x slower on the full ViT); one decode step reads every decoder weight once,
# bandwidth-bound: int4 in 128-weight blocks (int4-weight's default) with the tied lm_head int4 too was
# the fastest per token (32: 1.2x, 64: 1.1x slower; lm_head int8 1.1x, fp32 1.4x). Measured on the full
# ViT-GPT2: benchmarks/results/vit-gpt2-full/mixed-recipe.md.
SCHEMES["mixed-int8-int4"] = mixed_scheme(
    "mixed-int8-int4",
    "captioners: encoder int8-dynamic, decoder int4-weight (MatMulNBits, 128-weight blocks)",
    parts={"encoder": "int8-dynamic", "decoder": "int4-weight"},
    notes="encoder + decoder captioners; options per graph: `--option decoder.block_size=64`",
)


def get_scheme(name: str) -> Scheme:
    if name not in SCHEMES:
        raise KilnError(f"unknown scheme {name!r}. Valid schemes: {', '.join(SCHEMES)}.")
    return SCHEMES[name]


def resolve_options(scheme: Scheme, given: dict) -> dict:
    """The scheme's defaults with the caller's values; unknown or invalid options are refused."""
    unknown = sorted(set(given) - set(scheme.options))
    if unknown:
        raise KilnError(
            f"scheme {scheme.name} has no option {', '.join(unknown)}. Its options: {', '.join(scheme.options)}."
        )
    options = {**scheme.options, **given}
    for key, allowed in scheme.choices.items():
        if options[key] not in allowed:
            raise KilnError(
                f"scheme {scheme.name}: {key} {options[key]!r} is not supported. "
                f"Use one of {', '.join(map(str, allowed))}."
            )
    for graph in scheme.parts:
        component_scheme(scheme, graph, options)  # each part checks its own options
    return options


def part_options(options: dict, graph: str) -> dict:
    """A mixed scheme's options for one graph, without the ``graph.`` prefix."""
    prefix = f"{graph}."
    return {key.removeprefix(prefix): value for key, value in options.items() if key.startswith(prefix)}


def component_scheme(scheme: Scheme, graph: str, options: dict) -> tuple[Scheme, dict]:
    """The uniform scheme and resolved options that quantize ``graph``: the scheme itself unless mixed."""
    if not scheme.parts:
        return scheme, options
    if graph not in scheme.parts:
        raise KilnError(
            f"scheme {scheme.name} quantizes {', '.join(scheme.parts)}, not {graph}: choose --components "
            "among those, or use a uniform scheme for this artifact."
        )
    part = get_scheme(scheme.parts[graph])
    return part, resolve_options(part, part_options(options, graph))


def base_schemes(scheme: Scheme) -> tuple[Scheme, ...]:
    """The uniform schemes that run when ``scheme`` is applied: its parts, or itself."""
    return tuple(get_scheme(name) for name in scheme.parts.values()) or (scheme,)


def parse_option(pair: str) -> tuple[str, Any]:
    """``"block_size=64"`` -> ("block_size", 64), typed like the default of any scheme that has the key."""
    key, sep, text = pair.partition("=")
    defaults = {k: v for scheme in SCHEMES.values() for k, v in scheme.options.items()}
    if not sep or key not in defaults:
        raise KilnError(
            f"--option {pair!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(defaults))}."
        )
    default = defaults[key]
    if isinstance(default, bool):
        if text.lower() not in {"true", "false"}:
            raise KilnError(f"--option {key} takes true or false, got {text!r}.")
        return key, text.lower() == "true"
    try:
        return key, type(default)(text)
    except ValueError:
        raise KilnError(f"--option {key} takes a {type(default).__name__}, got {text!r}.") from None
