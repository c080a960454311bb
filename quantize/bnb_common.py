"""What the bitsandbytes paths share: the scheme table's config makers, the source a variant is made
from, and how a variant records its parent, modules and library version.

``quantize.bnb`` (captioners, and the dispatch) and ``quantize.bnb_diffusion`` both import it; it
imports neither, so the two stay free of cycles.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelkiln.manifest import MANIFEST_NAME, Manifest, artifact_hash

from .schemes import get_scheme
from .variant import read_onnx_parent, relative_parent

# Module classes bitsandbytes puts in place of nn.Linear; counted into the manifest.
QUANTIZED_MODULES = ("Linear8bitLt", "Linear4bit")


def int8_config(options: dict) -> dict[str, Any]:
    """BitsAndBytesConfig arguments of bnb-int8 (LLM.int8: int8 weights, fp outliers above threshold)."""
    return {"load_in_8bit": True, "llm_int8_threshold": float(options["llm_int8_threshold"])}


def _four_bit(quant_type: str) -> Callable[[dict], dict[str, Any]]:
    def config(options: dict) -> dict[str, Any]:
        # CPU kernels compute in float32; the fp16 default is meant for GPUs.
        return {
            "load_in_4bit": True,
            "bnb_4bit_quant_type": quant_type,
            "bnb_4bit_use_double_quant": bool(options["double_quant"]),
            "bnb_4bit_compute_dtype": "float32",
        }

    return config


nf4_config = _four_bit("nf4")
fp4_config = _four_bit("fp4")


@dataclass(frozen=True)
class BnbSource:
    """What a bitsandbytes variant is made from."""

    model: str  # source model (hub id or save_pretrained directory) the weights are loaded from
    parent_dir: Path | None  # ONNX artifact it was given as, None when the model was given directly
    parent: Manifest | None  # that artifact's manifest


def resolve_bnb_source(given: str | os.PathLike) -> BnbSource:
    """An ONNX artifact (its manifest names the source model) or a source model given directly."""
    path = Path(given)
    if not (path / MANIFEST_NAME).is_file():
        return BnbSource(str(given), None, None)
    refusal = (
        "{path} is already a {kind} variant ({precision}). Pass its ONNX parent or the original model "
        "({source})."
    )
    parent_dir, manifest = read_onnx_parent(path, refusal)
    return BnbSource(manifest.source.model, parent_dir, manifest)


def bnb_config_dict(scheme: str, options: dict) -> dict[str, Any]:
    return get_scheme(scheme).load_apply()(options)


def torch_bnb_kwargs(scheme: str, options: dict) -> dict[str, Any]:
    """The scheme's BitsAndBytesConfig arguments, the compute dtype as the torch dtype the configs take."""
    import torch

    settings = bnb_config_dict(scheme, options)
    if "bnb_4bit_compute_dtype" in settings:
        settings = {**settings, "bnb_4bit_compute_dtype": getattr(torch, settings["bnb_4bit_compute_dtype"])}
    return settings


def module_counts(model) -> dict[str, int]:
    """How many modules of each quantized class (and plain Linear) the model holds."""
    counts = Counter(type(module).__name__ for module in model.modules())
    return {name: counts[name] for name in (*QUANTIZED_MODULES, "Linear") if counts[name]}


def parent_record(given: BnbSource, out: str | os.PathLike) -> dict[str, Any] | None:
    if given.parent is None:
        return None
    return {
        "path": relative_parent(given.parent_dir, out),
        "artifact_sha256": artifact_hash(given.parent),
        "precision": given.parent.precision,
        "kind": given.parent.kind,
    }


def bnb_version() -> dict[str, str]:
    from importlib import metadata

    return {"bitsandbytes": metadata.version("bitsandbytes")}


BNB_4BIT_BLOCK = 64  # weights per bitsandbytes 4-bit quantization block along a row (its default)
BNB_CPU_PACK_ROWS = 32  # output rows bitsandbytes' AVX512-BF16 CPU kernel packs together


def unpackable_for_4bit(model) -> list[str]:
    """Module paths of the Linear layers bitsandbytes' 4-bit CPU path cannot repack.

    On CPUs with AVX512-BF16 it repacks 4-bit weights on the first forward, in blocks of 64 inputs and
    32 outputs, and fails on a layer of other widths (``shape '[96, 0]' is invalid``, ``N must be
    divisible by block_n``): a variant made on another CPU would crash there. Real checkpoints have no
    such layer; small models do, so 4-bit schemes keep these in full precision on every CPU.
    """
    import torch

    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
        and (module.in_features % BNB_4BIT_BLOCK or module.out_features % BNB_CPU_PACK_ROWS)
    ]
