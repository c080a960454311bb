"""Resolve a ``--model`` source (hub id or local directory) to a local folder, safely.

Hub ids and local directories take the same path: a hub id is first fetched into the local cache
with ``huggingface_hub`` and then read like any directory saved with ``save_pretrained``. Pickle
checkpoints (``.bin``, ``.pt``) are refused unless ``allow_pickle`` is set, because unpickling runs
arbitrary code::

    source = resolve_source("nlpconnect/vit-gpt2-image-captioning", allow_pickle=False)
    source.path, source.config, source.weights_sha256
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelkiln.errors import SourceModelError
from modelkiln.manifest import sha256_file
from modelkiln.runtime.images import read_image_processor_config

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
SAFE_WEIGHTS = ("*.safetensors",)
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
# Everything but weights that from_pretrained and the runtime may read.
SIDE_FILES = ("*.json", "*.txt", "*.model", "*.tiktoken")
# A diffusers pipeline directory is described by this file instead of config.json.
PIPELINE_INDEX = "model_index.json"


@dataclass(frozen=True)
class Source:
    """A model source resolved to a local folder."""

    model: str  # what the user passed to --model
    path: Path  # local folder holding config.json (or a pipeline's model_index.json) and the weights
    config: dict[str, Any]  # parsed config.json, or model_index.json for a diffusers pipeline
    weight_files: tuple[str, ...]  # weight files relative to path, sorted
    uses_pickle: bool  # True when the weights are pickle checkpoints (only with allow_pickle)

    @property
    def weights_sha256(self) -> str:
        """sha256 over every weight file's name and content hash: one id for the exported weights."""
        digest = hashlib.sha256()
        for name in self.weight_files:
            digest.update(f"{name}\0{sha256_file(self.path / name)}\n".encode())
        return digest.hexdigest()


def _weight_patterns(side_files: Path, allow_pickle: bool) -> list[str]:
    patterns = [*SAFE_WEIGHTS, *(PICKLE_WEIGHTS if allow_pickle else ())]
    if not (side_files / PIPELINE_INDEX).is_file():
        return patterns
    # Pipeline repos also ship a multi-GB single-file checkpoint at the top and fp16 duplicates in
    # every component folder; the components' full-precision weights are all an export reads.
    return [f"*/{pattern}" for pattern in patterns]


def _fetch_from_hub(model: str, allow_pickle: bool) -> Path:
    try:
        from huggingface_hub import snapshot_download

        side_files = Path(snapshot_download(model, allow_patterns=list(SIDE_FILES)))
        patterns = [*SIDE_FILES, *_weight_patterns(side_files, allow_pickle)]
        return Path(snapshot_download(model, allow_patterns=patterns, ignore_patterns=["*.fp16.*"]))
    except Exception as exc:
        raise SourceModelError(
            f"could not fetch {model!r} from the Hugging Face Hub ({type(exc).__name__}: {exc}). "
            "Check the id and your network, or pass a local directory saved with save_pretrained."
        ) from exc


def _local_path(model: str, allow_pickle: bool) -> Path:
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise SourceModelError(
                f"--model {model} is a file. Pass the directory saved with save_pretrained."
            )
        return path.absolute()
    if not _HUB_ID.match(model) or model.startswith((".", "/", "~")):
        raise SourceModelError(
            f"--model {model} does not exist. Pass an existing directory saved with save_pretrained, "
            "or a Hugging Face Hub id such as nlpconnect/vit-gpt2-image-captioning."
        )
    return _fetch_from_hub(model, allow_pickle)


def _weight_files(path: Path, patterns: tuple[str, ...]) -> tuple[str, ...]:
    found = {p.relative_to(path).as_posix() for pattern in patterns for p in path.rglob(pattern)}
    return tuple(sorted(found))


def resolve_source(model: str, allow_pickle: bool = False) -> Source:
    """Find config and weights for ``model``; refuse pickle weights unless ``allow_pickle``."""
    path = _local_path(model, allow_pickle)
    config_path = path / "config.json"
    if not config_path.is_file():
        config_path = path / PIPELINE_INDEX
    if not config_path.is_file():
        raise SourceModelError(
            f"{path} has neither config.json nor {PIPELINE_INDEX}. Pass a directory written by "
            "save_pretrained: a transformers model's folder, or a whole diffusers pipeline's folder."
        )
    config = json.loads(config_path.read_text())
    safe = _weight_files(path, SAFE_WEIGHTS)
    pickled = _weight_files(path, PICKLE_WEIGHTS)
    if safe:
        return Source(model, path, config, safe, uses_pickle=False)
    if pickled and not allow_pickle:
        raise SourceModelError(
            f"{path} holds only pickle weights ({', '.join(pickled[:3])}). Loading pickle runs arbitrary "
            "code; convert the model to safetensors, or pass --allow-pickle if you trust its origin."
        )
    if not pickled:
        raise SourceModelError(
            f"{path} has no weight files (*.safetensors). Save the model with save_pretrained."
        )
    return Source(model, path, config, pickled, uses_pickle=True)


def refuse_bitsandbytes(source: Source) -> None:
    """A bitsandbytes checkpoint (a model, or a pipeline's component) holds packed int8/4-bit weights the
    ONNX exporters cannot trace."""
    configs = [source.config]
    if (source.path / PIPELINE_INDEX).is_file():
        configs += [json.loads(path.read_text()) for path in sorted(source.path.glob("*/config.json"))]
    methods = {(config.get("quantization_config") or {}).get("quant_method") for config in configs}
    if "bitsandbytes" in methods:
        raise SourceModelError(
            f"{source.path} is quantized with bitsandbytes; ONNX export needs float weights. Dequantize "
            "first: load it with from_pretrained, call model.dequantize(), then model.save_pretrained(DIR) "
            "and export DIR (or export the original float model)."
        )


def image_processor_config(source: Source) -> dict[str, Any]:
    """The source's image processor settings, from either layout transformers saves: a legacy
    ``preprocessor_config.json``, or transformers 5's ``processor_config.json`` with the image processor
    nested in it, read with the same priority as transformers' ``AutoImageProcessor``."""
    fix = (
        "save the model's processor (or its image processor) next to it, e.g. "
        f"processor.save_pretrained({str(source.path)!r})"
    )
    return read_image_processor_config(source.path, SourceModelError, fix)


def save_image_processor_config(source: Source, directory: Path) -> None:
    """Write the source's image processor settings as the artifact's ``preprocessor_config.json``: one
    file for the runtime, whichever layout the checkpoint has."""
    text = json.dumps(image_processor_config(source), indent=2, sort_keys=True) + "\n"
    (directory / "preprocessor_config.json").write_text(text, encoding="utf-8")


def check_model_class(source: Source, model_class) -> None:
    """Refuse a checkpoint of another architecture before loading it: from_pretrained would only warn and
    build ``model_class`` from random weights (what a forced --family on a foreign config used to export)."""
    expected = model_class.config_class.model_type
    found = source.config.get("model_type")
    if found != expected:
        raise SourceModelError(
            f"{source.path} holds a {found!r} model (config.json model_type), but {model_class.__name__} loads "
            f"{expected!r} checkpoints and would start from random weights. Drop --family to detect the "
            f"family, or pass a {expected!r} checkpoint."
        )


def load_pretrained(source: Source, model_class, trust_remote_code: bool = False, **kwargs):
    """``model_class.from_pretrained`` in fp32 eval mode, under the source's pickle decision."""
    import torch

    check_model_class(source, model_class)
    return model_class.from_pretrained(
        source.path,
        use_safetensors=not source.uses_pickle,
        trust_remote_code=trust_remote_code,
        dtype=torch.float32,
        **kwargs,
    ).eval()
