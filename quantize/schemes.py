"""The quantization scheme registry: a plain dict from scheme name to how it is applied.

scheme = get_scheme("int8-dynamic")
stats = scheme.apply(model, out_path, options, exclude, external_data)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from modelkiln.errors import KilnError

from .onnx_int4 import ALGORITHMS, quantize_int4_weight
from .onnx_int8 import quantize_int8_dynamic


@dataclass(frozen=True)
class Scheme:
    """One way to make a lower-precision variant of an ONNX graph."""

    name: str  # registry key, recorded in the manifest
    precision: str  # what the quantized weights are stored as
    description: str  # one line for help texts and reports
    apply: Callable[..., dict]  # (model, out_path, options, exclude, external_data) -> stats
    options: dict  # option name -> default; anything else is refused


SCHEMES: dict[str, Scheme] = {
    "int8-dynamic": Scheme(
        name="int8-dynamic",
        precision="int8",
        description="onnxruntime dynamic quantization: int8 per-channel weights, activations quantized per call",
        apply=quantize_int8_dynamic,
        options={"per_channel": True},
    ),
    "int4-weight": Scheme(
        name="int4-weight",
        precision="int4",
        description=f"MatMulNBits weight-only int4, block-wise ({'/'.join(ALGORITHMS)}), accuracy_level 4",
        apply=quantize_int4_weight,
        options={"block_size": 32, "symmetric": True, "accuracy_level": 4, "algorithm": "rtn"},
    ),
}


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
    if scheme.name == "int4-weight":
        if options["block_size"] not in (16, 32, 64, 128, 256):
            raise KilnError(f"block_size {options['block_size']} is not supported: use 32, 64 or 128.")
        if options["algorithm"] not in ALGORITHMS:
            raise KilnError(
                f"algorithm {options['algorithm']!r} is not offered: use {' or '.join(ALGORITHMS)}."
            )
    return options


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
