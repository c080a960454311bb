"""FLUX.1 text-to-image on ONNX Runtime, step for step as diffusers' FluxPipeline.

    pipe = modelkiln.runtime.load("out/flux-schnell")
    pipe("a red cat", num_inference_steps=4, guidance_scale=0.0, height=768, width=1024, seed=0).images[0]

Conditioning: CLIP-L's pooled embedding and T5's hidden states, with all-zero text position ids.
Latents live packed as 2x2 patches, [B, (H/2)*(W/2), 4*C] (the layout diffusers' ``latents=`` takes),
and are unpacked only for the VAE. FLUX.1-dev's ``guidance_scale`` feeds the transformer's guidance
embedding; schnell has none and ignores it, as diffusers does. Neither runs a negative prompt.

Image sizes: FluxPipeline does not refuse sides that miss its multiple (VAE factor x 2, 16 px for
FLUX.1); it logs a warning and generates at the sides rounded down to it. Matching diffusers is the
promise, so this runtime does the same, warning with the size it will generate (the image it returns
has that size, as diffusers' does); sides that round down to nothing fail in diffusers and are refused
here, before any graph runs.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from modelkiln.errors import GenerationConfigError

from .diffusion import Request, TextToImagePipeline

LOGGER = logging.getLogger(__name__)
CLIP_LENGTH = 77
MAX_SEQUENCE_LENGTH = 512  # diffusers refuses longer T5 prompts for Flux


def _diffusers_flux():
    """diffusers' FluxPipeline class, whose static helpers keep this runtime's numerics identical."""
    from diffusers import FluxPipeline as DiffusersFluxPipeline

    return DiffusersFluxPipeline


class FluxPipeline(TextToImagePipeline):
    """FLUX.1-dev (guidance embedding) and FLUX.1-schnell artifacts; the manifest says which."""

    size_reason = "VAE downsampling times the 2x2 latent packing; larger sides are rounded down to it"
    latent_layout = (
        "batch, (height / (VAE factor x 2)) x (width / (VAE factor x 2)) patches, 4 x latent channels"
    )

    def size_multiple(self) -> int:
        # The VAE's downsampling times the 2x2 packing of latents into patches.
        return self.config["vae_scale_factor"] * 2

    def image_size(self, height: int, width: int) -> tuple[int, int]:
        """diffusers' FluxPipeline rounding: sides down to the multiple, with a warning (see the top)."""
        multiple = self.size_multiple()
        # A side under the multiple has nothing to round to: check() refuses it, as diffusers fails on it.
        rounded = tuple(side // multiple * multiple if side >= multiple else side for side in (height, width))
        if rounded != (height, width) and min(rounded) >= multiple:
            LOGGER.warning(
                "%dx%d (height x width) is not a multiple of %d; generating %dx%d, as diffusers' FluxPipeline "
                "does. Ask for that size to silence this.", height, width, multiple, *rounded,
            )  # fmt: skip
        return rounded

    def check(self, request: Request) -> None:
        super().check(request)
        if any(request.negatives):
            # diffusers only uses a negative prompt for "true CFG" (true_cfg_scale > 1), which this
            # runtime does not run; dropping it silently would hand back an image it did not shape.
            raise GenerationConfigError(
                "Flux artifacts do not run negative_prompt: diffusers uses it only for true CFG "
                "(true_cfg_scale > 1, two transformer passes a step), which this runtime lacks. FLUX.1's "
                "guidance is distilled (dev: raise guidance_scale; schnell: none). Drop negative_prompt."
            )
        if request.max_sequence_length > MAX_SEQUENCE_LENGTH:
            raise GenerationConfigError(
                f"max_sequence_length {request.max_sequence_length} is above Flux's {MAX_SEQUENCE_LENGTH} "
                f"T5 tokens. Use at most {MAX_SEQUENCE_LENGTH}."
            )

    def encode(self, request: Request) -> dict[str, np.ndarray]:
        """Text conditioning plus the inputs that stay fixed over the steps (position ids, guidance)."""
        length = request.max_sequence_length
        (pooled,) = self.run(
            "text_encoder", input_ids=self.tokenize("tokenizer", request.prompts, CLIP_LENGTH)
        )
        (states,) = self.run(
            "text_encoder_2", input_ids=self.tokenize("tokenizer_2", request.prompts, length)
        )
        copies = request.images_per_prompt
        height, width = self.latent_size(request)
        image_ids = _diffusers_flux()._prepare_latent_image_ids(
            request.batch, height // 2, width // 2, "cpu", torch.float32
        )
        condition = {
            "encoder_hidden_states": np.repeat(states, copies, axis=0),  # [B, L, D]
            "pooled_projections": np.repeat(pooled, copies, axis=0),  # [B, P]
            "txt_ids": np.zeros((states.shape[1], 3), dtype=np.float32),  # [L, 3]
            "img_ids": image_ids.numpy(),  # [S_img, 3]
        }
        if self.config["guidance_embeds"]:
            # FLUX.1-dev: the guidance value itself is an input, the same for every image and step.
            guidance = torch.full([1], request.guidance_scale, dtype=torch.float32).expand(request.batch)
            condition["guidance"] = guidance.numpy()
        return condition

    def latent_size(self, request: Request) -> tuple[int, int]:
        """Unpacked latent height and width (even, so they split into 2x2 patches)."""
        factor = self.config["vae_scale_factor"] * 2
        return 2 * (request.height // factor), 2 * (request.width // factor)

    def latent_shape(self, request: Request) -> tuple[int, ...]:
        """Packed: [B, (H/2)*(W/2) latent patches, 4 * latent channels], as diffusers' ``latents=``."""
        height, width = self.latent_size(request)
        return (request.batch, (height // 2) * (width // 2), self.config["in_channels"])

    def initial_latents(self, request: Request) -> torch.Tensor:
        height, width = self.latent_size(request)
        channels = self.config["in_channels"] // 4
        if request.latents is not None:
            return self.checked_latents(request, self.latent_shape(request))
        # Noise is drawn unpacked, then packed, so a seed gives diffusers' exact latents.
        noise = self.randn((request.batch, channels, height, width), request)
        return _diffusers_flux()._pack_latents(
            noise, request.batch, channels, height, width
        )  # [B, S_img, 4C]

    def timesteps(self, request: Request, latents: torch.Tensor) -> torch.Tensor:
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

        scheduler = self.scheduler.config
        sigmas = np.linspace(1.0, 1 / request.steps, request.steps)
        if scheduler.get("use_flow_sigmas", False):
            sigmas = None
        mu = calculate_shift(
            latents.shape[1],
            scheduler.get("base_image_seq_len", 256),
            scheduler.get("max_image_seq_len", 4096),
            scheduler.get("base_shift", 0.5),
            scheduler.get("max_shift", 1.15),
        )
        timesteps, _ = retrieve_timesteps(self.scheduler, request.steps, "cpu", sigmas=sigmas, mu=mu)
        self.scheduler.set_begin_index(0)
        return timesteps

    def step(self, request: Request, condition: dict, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # As diffusers: the timestep in the latents' dtype, divided by 1000 before the call.
        timestep = (t.expand(latents.shape[0]).to(latents.dtype) / 1000).numpy()
        (noise,) = self.run("transformer", hidden_states=latents.numpy(), timestep=timestep, **condition)
        return self.scheduler.step(torch.from_numpy(noise), t, latents, return_dict=False)[0]

    def decode(self, request: Request, latents: torch.Tensor) -> np.ndarray:
        latents = _diffusers_flux()._unpack_latents(
            latents, request.height, request.width, self.config["vae_scale_factor"]
        )
        return self.vae_decode(latents)  # from [B, C, H/f, W/f]
