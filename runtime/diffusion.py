"""Text-to-image on ONNX Runtime with diffusers' own schedulers: the loop the SD3, Flux and SD 1.x
pipelines share.

    pipe = modelkiln.runtime.load("out/sd35")
    result = pipe("a red cat", num_inference_steps=28, guidance_scale=7.0, height=512, width=768, seed=0)
    result.images[0].save("cat.png")

The call takes diffusers' arguments. Family files (``sd3.py``, ``flux.py``, ``stable_diffusion.py``)
say how prompts become conditioning, how latents are laid out and how one step calls the denoiser
graph; this module owns the rest: sessions, tokenizers, the scheduler (the diffusers class named in
the shipped scheduler config), seeds, the NaN/Inf check, VAE decoding and PIL output. Latents,
randomness and scheduler arithmetic are torch's and diffusers', as in the diffusers pipeline, so the
same seed (or the same ``latents``) reproduces the PyTorch pipeline's image.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from modelkiln.errors import GenerationConfigError, NonFiniteOutputError
from modelkiln.manifest import Manifest

from .session import RuntimeOptions, create_session


@dataclass
class TextToImageOutput:
    """What a text-to-image pipeline returns, shaped like diffusers' output."""

    images: (
        list[Image.Image] | np.ndarray
    )  # PIL images, or [N, H, W, 3] floats in [0, 1] for output_type="np"


@dataclass(frozen=True)
class Request:
    """One call's settings after defaults are applied and checked."""

    prompts: list[str]  # one per prompt in the batch
    negatives: list[str]  # negative prompt per prompt ("" when none was given)
    steps: int  # denoising steps
    guidance_scale: float  # classifier-free guidance weight (Flux-dev: the distilled guidance value)
    height: int  # output pixels
    width: int  # output pixels
    images_per_prompt: int  # copies per prompt, each from its own noise
    generator: torch.Generator | None  # source of the initial noise
    latents: torch.Tensor | None  # caller's initial latents instead of noise: float32, CPU, shape checked
    max_sequence_length: int  # T5 prompt length in tokens

    @property
    def batch(self) -> int:
        return len(self.prompts) * self.images_per_prompt


def load_scheduler(folder: Path):
    """The diffusers scheduler class the shipped config names, configured from it."""
    import diffusers

    config = json.loads((folder / "scheduler_config.json").read_text())
    name = config.get("_class_name", "")
    scheduler_class = getattr(diffusers.schedulers, name, None)
    if scheduler_class is None:
        raise GenerationConfigError(
            f"{folder} names scheduler {name!r}, which this diffusers ({diffusers.__version__}) lacks. "
            "Upgrade diffusers, or re-export with a pipeline whose scheduler it has."
        )
    return scheduler_class.from_config(config)


def as_latents(latents: Any) -> torch.Tensor | None:
    """Caller's latents as a float32 CPU tensor: a torch tensor or numpy array of any float dtype, cast
    as diffusers casts ``latents=`` to the pipeline's dtype (fp32 here)."""
    if latents is None:
        return None
    if isinstance(latents, np.ndarray):
        if not np.issubdtype(latents.dtype, np.floating):
            raise GenerationConfigError(
                f"latents are a numpy array of {latents.dtype}; pass floating-point latents (float16/32/64)."
            )
        return torch.from_numpy(np.ascontiguousarray(latents, dtype=np.float32))
    if isinstance(latents, torch.Tensor):
        if not latents.is_floating_point():
            raise GenerationConfigError(
                f"latents are a torch tensor of {latents.dtype}; pass floating-point latents "
                "(float16/32/64 or bfloat16)."
            )
        return latents.detach().to(device="cpu", dtype=torch.float32)
    raise GenerationConfigError(
        f"latents are a {type(latents).__name__}; pass a torch tensor or a numpy array of floats."
    )


def to_pil(images: np.ndarray) -> list[Image.Image]:
    """[N, H, W, 3] floats in [0, 1] -> PIL images, rounding as diffusers' image processor does."""
    return [Image.fromarray((image * 255).round().astype("uint8")) for image in images]


class TextToImagePipeline(abc.ABC):
    """Base of the text-to-image runtimes; subclasses implement the family hooks below."""

    task = "text-to-image"
    size_multiple_key = "vae_scale_factor"  # runtime-config key(s) whose product the image sides divide by

    def __init__(self, directory: Path, manifest: Manifest, options: RuntimeOptions):
        self.directory = Path(directory)
        self.manifest = manifest
        self.config = manifest.runtime
        self.options = options
        self.sessions = {
            name: create_session(self.directory / spec.file, options)
            for name, spec in manifest.components.items()
        }
        self.scheduler = load_scheduler(self.directory / "scheduler")
        self._tokenizers: dict[str, Any] = {}
        # Validation sets a dict here to capture the first feeds of every graph (realistic inputs).
        self.recorder: dict[str, dict[str, np.ndarray]] | None = None

    # -- the call ---------------------------------------------------------------------------------

    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        num_images_per_prompt: int = 1,
        latents: torch.Tensor | np.ndarray | None = None,
        max_sequence_length: int | None = None,
        output_type: str = "pil",
        callback: Callable[[int, int], None] | None = None,
    ) -> TextToImageOutput:
        """Generate images; ``callback(step, total)`` is called after every denoising step.

        ``latents`` may be a torch tensor or a numpy array of any float dtype, in the layout the
        diffusers pipeline's ``latents=`` takes; sizes and latents are checked before any graph runs.
        """
        request = self.request(
            prompt, negative_prompt, num_inference_steps, guidance_scale, height, width, seed,
            generator, num_images_per_prompt, latents, max_sequence_length,
        )  # fmt: skip
        images = self.generate(request, callback)
        return TextToImageOutput(images if output_type == "np" else to_pil(images))

    def generate(self, request: Request, callback: Callable[[int, int], None] | None = None) -> np.ndarray:
        """[N, H, W, 3] floats in [0, 1] for a resolved request."""
        # 1. Encode the prompts (and negatives, when the family guides with them).
        condition = self.encode(request)
        # 2. Start from noise (or the given latents) and the scheduler's timesteps for this size.
        state = self.initial_latents(request)
        timesteps = self.timesteps(request, state)
        # 3. Denoise.
        for i, t in enumerate(timesteps):
            state = self.step(request, condition, state, t)
            if callback is not None:
                callback(i + 1, len(timesteps))
        # 4. Decode to pixels.
        return self.decode(request, state)

    def request(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        height: int | None = None,
        width: int | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        per_prompt: int = 1,
        latents: torch.Tensor | np.ndarray | None = None,
        length: int | None = None,
    ) -> Request:
        """The checked settings of a call, defaults filled in (validation uses it to draw latents)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = self._negatives(negative_prompt, len(prompts))
        if seed is not None and generator is not None:
            raise GenerationConfigError("pass seed or generator, not both.")
        if seed is not None:
            generator = torch.Generator().manual_seed(seed)
        default_size = self.config["default_sample_size"] * self.config["vae_scale_factor"]
        height, width = self.image_size(height or default_size, width or default_size)
        request = Request(
            prompts=prompts,
            negatives=negatives,
            steps=steps or self.config["default_steps"],
            guidance_scale=self.config["default_guidance_scale"] if guidance is None else guidance,
            height=height,
            width=width,
            images_per_prompt=per_prompt,
            generator=generator,
            latents=as_latents(latents),
            max_sequence_length=length or self.config.get("max_sequence_length", 0),
        )
        self.check(request)
        return request

    def _negatives(self, negative_prompt, count: int) -> list[str]:
        if negative_prompt is None:
            return [""] * count
        negatives = [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != count:
            raise GenerationConfigError(
                f"negative_prompt has {len(negatives)} entries for {count} prompts; pass one per prompt."
            )
        return negatives

    def check(self, request: Request) -> None:
        """What the diffusers pipeline would refuse, refused before any graph runs; families add limits."""
        for side, value in (("height", request.height), ("width", request.width)):
            self.check_side(side, value)
        if request.steps < 1 or request.images_per_prompt < 1 or not request.prompts:
            raise GenerationConfigError(
                "num_inference_steps, num_images_per_prompt and the prompts must be >= 1."
            )
        if request.latents is not None:
            expected = self.latent_shape(request)
            if tuple(request.latents.shape) != expected:
                raise GenerationConfigError(
                    f"latents have shape {tuple(request.latents.shape)}; this request needs {expected} "
                    f"({self.latent_layout}). Pass latents of that shape, or none to draw them from the seed."
                )

    def check_side(self, side: str, value: int) -> None:
        """One image side against the diffusers pipeline's rule: a positive multiple, at most the largest."""
        multiple, largest = self.size_multiple(), self.largest_side()
        if value <= 0 or value % multiple:
            raise GenerationConfigError(
                f"{side} {value} is not a positive multiple of {multiple}, which this model needs "
                f"({self.size_reason}). Use {self.nearest_sides(value)}."
            )
        if largest is not None and value > largest:
            raise GenerationConfigError(
                f"{side} {value} is larger than {self.largest_reason()} allows ({largest} px per side). "
                f"Use {self.nearest_sides(value)}."
            )

    def nearest_sides(self, value: int) -> str:
        """The valid sides next to ``value``: the multiples around it, kept within the smallest and largest."""
        multiple, largest = self.size_multiple(), self.largest_side()
        around = (value // multiple * multiple, -(-value // multiple) * multiple)
        sides = {max(side, multiple) for side in around}
        if largest is not None:
            sides = {min(side, largest) for side in sides}
        return " or ".join(str(side) for side in sorted(sides))

    # -- size and latent hooks --------------------------------------------------------------------

    size_reason = "VAE downsampling"  # why sides must divide by size_multiple(), for the error message
    latent_layout = "batch, latent channels, height / VAE factor, width / VAE factor"  # for the error

    def size_multiple(self) -> int:
        """What the diffusers pipeline requires the image sides to divide by."""
        return self.config["vae_scale_factor"]

    def largest_side(self) -> int | None:
        """The largest image side the model takes, or None when only memory limits it."""
        return None

    def largest_reason(self) -> str:
        """What sets largest_side(), for the error message."""
        return "this model"

    def image_size(self, height: int, width: int) -> tuple[int, int]:
        """The size a request for ``height`` x ``width`` generates: as asked, unless diffusers rounds it."""
        return height, width

    def latent_shape(self, request: Request) -> tuple[int, ...]:
        """Initial latents' shape in the layout the denoiser loop and diffusers' ``latents=`` use."""
        factor = self.config["vae_scale_factor"]
        channels = self.config["latent_channels"]
        return (request.batch, channels, request.height // factor, request.width // factor)

    # -- helpers for the families -----------------------------------------------------------------

    # Classifier-free guidance as SD3 and SD 1.x run it: negative and positive prompts in one batch,
    # the two predictions combined after the call (Flux-dev takes guidance as an embedding instead).
    def guided(self, request: Request) -> bool:
        return request.guidance_scale > 1

    def guided_texts(self, request: Request) -> list[str]:
        """The prompts the text encoders see: negatives first when guided."""
        return request.negatives + request.prompts if self.guided(request) else request.prompts

    def guided_input(self, request: Request, latents: torch.Tensor) -> torch.Tensor:
        """The latents once per prompt half: [2B, ...] when guided, else as they are."""
        return torch.cat([latents] * 2) if self.guided(request) else latents

    def apply_guidance(self, request: Request, noise: torch.Tensor) -> torch.Tensor:
        """One prediction from the (negative, positive) halves of a guided call."""
        if not self.guided(request):
            return noise
        uncond, text = noise.chunk(2)
        return uncond + request.guidance_scale * (text - uncond)

    def tokenizer(self, folder: str):
        """The shipped tokenizer in ``folder``, loaded once."""
        if folder not in self._tokenizers:
            from transformers import AutoTokenizer

            self._tokenizers[folder] = AutoTokenizer.from_pretrained(self.directory / folder)
        return self._tokenizers[folder]

    def tokenize(self, folder: str, texts: list[str], length: int) -> np.ndarray:
        """Token ids padded and truncated to ``length``, as the diffusers pipelines tokenize."""
        tokens = self.tokenizer(folder)(texts, padding="max_length", max_length=length, truncation=True)
        return np.asarray(tokens["input_ids"], dtype=np.int64)

    def run(self, name: str, **feeds: np.ndarray) -> list[np.ndarray]:
        """Run one graph and refuse NaN/Inf, which would otherwise surface as a black image."""
        feeds = {key: np.ascontiguousarray(value) for key, value in feeds.items()}
        if self.recorder is not None and name not in self.recorder:
            self.recorder[name] = {key: value.copy() for key, value in feeds.items()}
        outputs = self.sessions[name].run(None, feeds)
        for spec, value in zip(self.sessions[name].get_outputs(), outputs, strict=True):
            if not np.isfinite(value).all():
                raise NonFiniteOutputError(
                    f"graph {name!r} produced NaN/Inf in {spec.name!r} (precision "
                    f"{self.manifest.components[name].precision}). The image would be black or noise. "
                    "If this is an fp16 or quantized variant, keep this component in fp32 "
                    "(kiln quantize --exclude / --components) or use the fp32 artifact."
                )
        return outputs

    def randn(self, shape: tuple[int, ...], request: Request) -> torch.Tensor:
        from diffusers.utils.torch_utils import randn_tensor

        return randn_tensor(shape, generator=request.generator, dtype=torch.float32)

    def checked_latents(self, request: Request, shape: tuple[int, ...]) -> torch.Tensor:
        """The request's latents (converted and shape-checked by request()), or noise of ``shape``."""
        if request.latents is None:
            return self.randn(shape, request)
        return request.latents.clone()  # the loop must not write into the caller's tensor

    def vae_decode(self, latents: torch.Tensor) -> np.ndarray:
        """Unscaled latents -> [N, H, W, 3] floats in [0, 1]."""
        scaled = latents / self.config["scaling_factor"] + self.config["shift_factor"]
        (images,) = self.run("vae_decoder", latents=scaled.numpy())
        return np.clip(images / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)

    # -- family hooks -----------------------------------------------------------------------------

    @abc.abstractmethod
    def encode(self, request: Request) -> dict[str, np.ndarray]:
        """Prompt conditioning the denoiser graph takes, for the whole (guided) batch."""

    @abc.abstractmethod
    def initial_latents(self, request: Request) -> torch.Tensor:
        """Starting latents in the family's layout: noise from the request's generator, or its latents."""

    @abc.abstractmethod
    def timesteps(self, request: Request, latents: torch.Tensor) -> torch.Tensor:
        """The scheduler's timesteps for this request (sets the scheduler up as the diffusers pipeline does)."""

    @abc.abstractmethod
    def step(self, request: Request, condition: dict, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """One denoising step: the denoiser graph, guidance, then ``scheduler.step``."""

    def decode(self, request: Request, latents: torch.Tensor) -> np.ndarray:
        return self.vae_decode(latents)
