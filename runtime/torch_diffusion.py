"""Text-to-image of ``torch`` artifacts: a diffusers pipeline saved with bitsandbytes layers, run by diffusers.

    pipe = modelkiln.runtime.load("out/sd35-nf4")        # manifest kind "torch", task text-to-image
    pipe("a red cat", num_inference_steps=28, guidance_scale=7.0, height=512, width=512, seed=0).images[0]

The call is the ONNX runtime's (:class:`~modelkiln.runtime.diffusion.TextToImagePipeline`): diffusers'
argument names plus ``seed=`` and ``callback=(step, total)``, with the same defaults, the same checks
and the same initial latents, because the family's ONNX class supplies ``request()``, ``check()`` and
``initial_latents()``; only the denoising loop is the diffusers pipeline's own. Quality code can thus
hand an ONNX parent and its bitsandbytes variant identical latents.

``load_diffusers`` also serves ``quantize.bnb_diffusion``, which quantizes while loading. Imports
torch and diffusers, so ``runtime.load`` imports this module only for torch artifacts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modelkiln.errors import KilnError, NonFiniteOutputError
from modelkiln.manifest import Manifest
from modelkiln.registry import TorchDiffusion, declared_torch_runtime, get_family

from .diffusion import Request, TextToImagePipeline
from .session import RuntimeOptions

# diffusers' bitsandbytes quantizer classes, whose GPU-only environment check is lifted while loading.
_DIFFUSERS_QUANTIZERS = ("BnB4BitDiffusersQuantizer", "BnB8BitDiffusersQuantizer")
# What bitsandbytes logs on every Linear8bitLt call with fp32 inputs: expected on CPU, and thousands
# of lines per image.
_INT8_CAST_MESSAGE = "MatMul8bitLt: inputs will be cast"


def torch_diffusion_family(family: str) -> TorchDiffusion:
    """The family's diffusers loading rules (its registry declaration), or an error naming the families
    that have them."""
    return declared_torch_runtime(
        family, TorchDiffusion, "text-to-image runtime", "int8-dynamic, int4-weight, fp16"
    )


def require_bitsandbytes(what: str) -> None:
    """bitsandbytes layers need the bitsandbytes package, and the diffusers/transformers loaders accelerate."""
    try:
        import accelerate  # noqa: F401
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise KilnError(
            f"{what} needs the bitsandbytes and accelerate packages ({exc}). Install them: "
            "pip install 'modelkiln[bnb]'."
        ) from exc


def _environment_checked_elsewhere(self, *args: Any, **kwargs: Any) -> None:
    """Stand-in for diffusers' check: packages are checked by require_bitsandbytes, the device is the CPU."""


@contextlib.contextmanager
def bitsandbytes_on_cpu() -> Iterator[None]:
    """Let diffusers load bitsandbytes layers without a GPU for the duration of the block.

    diffusers (0.42) refuses bitsandbytes unless CUDA, XPU or MPS is present, although bitsandbytes
    >= 0.48 runs Linear8bitLt and Linear4bit on CPU and transformers loads the same layers there.
    Only that check is replaced, on the two quantizer classes, and restored on exit; loading, the
    saved format and the layers are diffusers' own, so the artifact also loads with plain diffusers
    on a GPU machine. Not thread-safe: the classes are shared by the process while the block runs.
    """
    from unittest import mock

    from diffusers.quantizers.bitsandbytes import bnb_quantizer

    with contextlib.ExitStack() as stack:
        for name in _DIFFUSERS_QUANTIZERS:
            quantizer = getattr(bnb_quantizer, name, None)
            if quantizer is None or not hasattr(quantizer, "validate_environment"):
                raise KilnError(
                    f"this diffusers has no {name}.validate_environment, which modelkiln relaxes to load "
                    "bitsandbytes layers on CPU. Install the diffusers version pyproject.toml pins."
                )
            stack.enter_context(
                mock.patch.object(quantizer, "validate_environment", _environment_checked_elsewhere)
            )
        yield


@contextlib.contextmanager
def quiet_int8_casts() -> Iterator[None]:
    """Drop bitsandbytes' per-call fp16 cast message on its own logger while the block runs."""
    logger = logging.getLogger("bitsandbytes.autograd._functions")

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_INT8_CAST_MESSAGE)

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def load_diffusers(
    folder: Path, family: str, runtime_config: dict, quantization=None, use_safetensors: bool = True
):
    """The diffusers pipeline saved in ``folder``, fp32 on CPU, without the components the ONNX runtime
    leaves out; with ``quantization`` (a ``diffusers.PipelineQuantizationConfig``) quantized as it loads.
    A folder saved with bitsandbytes layers reloads them from its components' config.json."""
    import diffusers

    rules = torch_diffusion_family(family)
    left_out = {name: None for name in (*runtime_config.get("without", ()), *rules.dropped)}
    left_out |= absent_components(folder)
    if "safety_checker" in left_out:
        left_out["requires_safety_checker"] = False  # dropped on purpose; diffusers would warn otherwise
    with bitsandbytes_on_cpu():
        pipe = getattr(diffusers, rules.pipeline_class).from_pretrained(
            folder,
            dtype=torch.float32,
            # Without a device map diffusers' quantizers pick the current CUDA device.
            device_map="cpu",
            use_safetensors=use_safetensors,
            quantization_config=quantization,
            **left_out,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def absent_components(folder: str | os.PathLike) -> dict[str, None]:
    """The components a pipeline folder's model_index.json names as ``[null, null]``, each mapped to None.

    diffusers drops such entries and then refuses a pipeline that lacks a component it does not list
    as optional (an SD3 pipeline saved without its T5, as its model card suggests for less memory),
    unless ``from_pretrained`` is told the component is None: every loader of a source passes these."""
    index = json.loads((Path(folder) / "model_index.json").read_text())
    return {
        name: None
        for name, entry in index.items()
        if isinstance(entry, list) and len(entry) == 2 and entry[0] is None and entry[1] is None
    }


def _step_callback(callback: Callable[[int, int], None]) -> Callable:
    """diffusers' callback_on_step_end calling ``callback(step, total)`` as the ONNX runtime does."""

    def on_step_end(pipe, index: int, timestep, tensors: dict) -> dict:
        callback(index + 1, pipe.num_timesteps)
        return tensors

    return on_step_end


class TorchTextToImagePipeline(TextToImagePipeline):
    """``pipe(prompt, **settings)`` -> images, from a bitsandbytes diffusers pipeline; combined with the
    family's ONNX class by :func:`torch_pipeline_class`, which supplies request() and initial_latents()."""

    def __init__(self, directory: Path, manifest: Manifest, options: RuntimeOptions):
        if options.backend != "cpu":
            raise KilnError(
                f"torch artifacts run on the cpu backend here, not {options.backend!r}. Pass backend='cpu' "
                "(--backend cpu), or use an ONNX variant for GPU backends."
            )
        require_bitsandbytes(f"torch artifact {directory}")
        if options.threads is not None:
            torch.set_num_threads(options.threads)  # process-wide in torch: there is no per-model setting
        # No graphs in a torch artifact, so no sessions; the scheduler copy serves initial_latents().
        super().__init__(directory, manifest, options)
        self.pipe = load_diffusers(self.directory, manifest.family, manifest.runtime)

    def generate(self, request: Request, callback: Callable[[int, int], None] | None = None) -> np.ndarray:
        """diffusers' own loop with the settings the ONNX runtime resolved (latent shape checked too)."""
        if request.latents is not None:
            self.initial_latents(request)
        with torch.no_grad(), quiet_int8_casts():
            images = self.pipe(**self.diffusers_arguments(request, callback)).images
        # NaN/Inf would otherwise come back as a black image.
        if not np.isfinite(images).all():
            raise NonFiniteOutputError(
                f"the {self.manifest.precision} pipeline in {self.directory} produced NaN/Inf; the image would "
                "be black. Quantize the denoiser alone (no text encoder in --components), try bnb-int8, "
                "or use the fp32 artifact."
            )
        return images

    def diffusers_arguments(self, request: Request, callback: Callable[[int, int], None] | None) -> dict:
        """The diffusers pipeline's call arguments for a resolved request."""
        arguments = {
            "prompt": request.prompts,
            # diffusers reads None as "" for every prompt (and Flux's check() refuses negatives).
            "negative_prompt": request.negatives if any(request.negatives) else None,
            "num_inference_steps": request.steps,
            "guidance_scale": request.guidance_scale,
            "height": request.height,
            "width": request.width,
            "num_images_per_prompt": request.images_per_prompt,
            "generator": request.generator,
            "latents": request.latents,
            "output_type": "np",  # checked for NaN/Inf before any conversion
        }
        if request.max_sequence_length:  # the T5 families; SD 1.x's call has no such argument
            arguments["max_sequence_length"] = request.max_sequence_length
        if callback is not None:
            arguments["callback_on_step_end"] = _step_callback(callback)
        return arguments


def torch_pipeline_class(family: str) -> type:
    """TorchTextToImagePipeline with the family's request(), check() and initial_latents()."""
    torch_diffusion_family(family)  # a clear error for families without a torch runtime
    family_class = get_family(family).load_pipeline_class()
    name = f"Torch{family_class.__name__}"
    return type(name, (TorchTextToImagePipeline, family_class), {"__module__": __name__})
