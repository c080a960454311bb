"""SD 1.x / 2.x text-to-image on ONNX Runtime, step for step as diffusers' StableDiffusionPipeline.

    pipe = modelkiln.runtime.load("out/sd15-dreambooth")
    pipe("a photo of sks dog", num_inference_steps=50, guidance_scale=7.5, height=512, width=640, seed=0).images[0]

Conditioning: CLIP's last hidden states of the prompt and, for classifier-free guidance (scale > 1),
of the negative prompt ("" by default), run as one batch. The scheduler is the diffusers class the
artifact ships (PNDM, DDIM, Euler, DPM-Solver...), with its prediction type (epsilon or v-prediction
for SD 2.x) and the ``eta``/``generator`` step arguments it accepts, as diffusers passes them.
"""

from __future__ import annotations

import inspect

import numpy as np
import torch

from .diffusion import Request, TextToImagePipeline

CLIP_LENGTH = 77
ETA = 0.0  # diffusers' default eta; only DDIM-like schedulers take it


class StableDiffusionPipeline(TextToImagePipeline):
    size_reason = "diffusers' StableDiffusionPipeline rule"

    def size_multiple(self) -> int:
        # diffusers' rule, recorded by the export. Artifacts from before it lack the key: their UNet graph
        # was traced on latents that divide by its upsampling and takes no other size.
        multiple = self.config.get("image_size_multiple")
        return multiple or self.config["vae_scale_factor"] * self.config["unet_size_multiple"]

    def encode(self, request: Request) -> dict[str, np.ndarray]:
        texts = self.guided_texts(request)
        (states,) = self.run("text_encoder", input_ids=self.tokenize("tokenizer", texts, CLIP_LENGTH))
        # Negatives then prompts, each repeated per image, as diffusers concatenates them.
        return {"encoder_hidden_states": np.repeat(states, request.images_per_prompt, axis=0)}

    def initial_latents(self, request: Request) -> torch.Tensor:
        latents = self.checked_latents(request, self.latent_shape(request))
        # diffusers sets the timesteps before scaling the noise: Euler-type schedulers' init_noise_sigma
        # depends on them. Given latents are scaled too, as diffusers' ``latents=`` path does.
        self.timesteps(request, latents)
        return latents * self.scheduler.init_noise_sigma

    def timesteps(self, request: Request, latents: torch.Tensor) -> torch.Tensor:
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps

        timesteps, _ = retrieve_timesteps(self.scheduler, request.steps, "cpu")
        return timesteps

    def step_kwargs(self, request: Request) -> dict:
        """The extra ``scheduler.step`` arguments this scheduler accepts, as diffusers' prepare_extra_step_kwargs."""
        accepted = inspect.signature(self.scheduler.step).parameters
        candidates = {"eta": ETA, "generator": request.generator}
        return {name: value for name, value in candidates.items() if name in accepted}

    def step(self, request: Request, condition: dict, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        model_input = self.guided_input(request, latents)
        if hasattr(self.scheduler, "scale_model_input"):
            model_input = self.scheduler.scale_model_input(model_input, t)
        (noise,) = self.run(
            "unet",
            sample=model_input.numpy(),
            timestep=np.full(model_input.shape[0], float(t), dtype=np.float32),
            **condition,
        )
        noise = self.apply_guidance(request, torch.from_numpy(noise))
        return self.scheduler.step(noise, t, latents, **self.step_kwargs(request), return_dict=False)[0]
