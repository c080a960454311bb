"""SD3 / SD3.5 text-to-image on ONNX Runtime, step for step as diffusers' StableDiffusion3Pipeline.

    pipe = modelkiln.runtime.load("out/sd35-medium")
    pipe("a red cat", num_inference_steps=28, guidance_scale=7.0, height=1024, width=768, seed=0).images[0]

Conditioning: both CLIP encoders' penultimate states side by side, zero-padded to T5's width and
followed by T5's states (zeros when the artifact has no T5, as diffusers does); pooled embeddings of
both CLIPs concatenated. Classifier-free guidance runs negative and positive in one batch.
"""

from __future__ import annotations

import numpy as np
import torch

from modelkiln.errors import GenerationConfigError

from .diffusion import Request, TextToImagePipeline

CLIP_LENGTH = 77


class SD3Pipeline(TextToImagePipeline):
    # StableDiffusion3Pipeline.check_inputs: sides divide by the VAE factor times the patch size; the
    # transformer's PatchEmbed refuses more patches per side than pos_embed_max_size.
    size_reason = "VAE downsampling times the transformer's patch size"

    def size_multiple(self) -> int:
        return self.config["vae_scale_factor"] * self.config["patch_size"]

    def largest_side(self) -> int | None:
        limit = self.config.get("pos_embed_max_size")
        return None if limit is None else limit * self.size_multiple()

    def largest_reason(self) -> str:
        limit = self.config["pos_embed_max_size"]
        return f"this transformer's position embedding (pos_embed_max_size {limit} patches)"

    def check_side(self, side: str, value: int) -> None:
        super().check_side(side, value)
        exact = self.config.get("exact_pos_embed_crop") or self.config.get("pos_embed_max_size") is None
        multiple = self.size_multiple()
        if not exact and (value // multiple) % 2:
            largest = self.largest_side() or value + multiple
            even = [str(v) for v in (value - multiple, value + multiple) if 0 < v <= largest]
            raise GenerationConfigError(
                f"{side} {value} is an odd number of patches, which this artifact's transformer graph cannot "
                f"crop its position embedding for (exported before modelkiln fixed that). Re-export it, or "
                f"use {' or '.join(even)}."
            )

    def _encode_texts(self, texts: list[str], length: int) -> tuple[np.ndarray, np.ndarray]:
        pooled, hidden = [], []
        # As diffusers: both CLIP prompts are padded to the first tokenizer's model_max_length (77 for
        # CLIP-L; shorter for a model trained with a shorter context, as the shipped shapes pipeline).
        clip_length = self.tokenizer("tokenizer").model_max_length
        for encoder, tokenizer in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
            pooled_embeds, states = self.run(encoder, input_ids=self.tokenize(tokenizer, texts, clip_length))
            pooled.append(pooled_embeds)
            hidden.append(states)
        clip = np.concatenate(hidden, axis=-1)  # [B, clip_length, D_L + D_G]
        if self.config["has_t5"]:
            (t5,) = self.run("text_encoder_3", input_ids=self.tokenize("tokenizer_3", texts, length))
        else:
            t5 = np.zeros((len(texts), length, self.config["joint_attention_dim"]), dtype=np.float32)
        # As torch.nn.functional.pad in diffusers: zero-pad to T5's width (a negative pad would crop).
        clip = clip[..., : t5.shape[-1]]
        clip = np.pad(clip, ((0, 0), (0, 0), (0, t5.shape[-1] - clip.shape[-1])))
        return np.concatenate([clip, t5], axis=1), np.concatenate(pooled, axis=-1)  # [B, 77 + L, D], [B, P]

    def encode(self, request: Request) -> dict[str, np.ndarray]:
        texts = self.guided_texts(request)
        states, pooled = self._encode_texts(texts, request.max_sequence_length)
        copies = request.images_per_prompt
        return {
            "encoder_hidden_states": np.repeat(states, copies, axis=0),
            "pooled_projections": np.repeat(pooled, copies, axis=0),
        }

    def initial_latents(self, request: Request) -> torch.Tensor:
        return self.checked_latents(request, self.latent_shape(request))

    def timesteps(self, request: Request, latents: torch.Tensor) -> torch.Tensor:
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
            calculate_shift,
            retrieve_timesteps,
        )

        options = {}
        scheduler = self.scheduler.config
        if scheduler.get("use_dynamic_shifting", None):
            patch = self.config["patch_size"]
            seq_len = (latents.shape[2] // patch) * (latents.shape[3] // patch)
            options["mu"] = calculate_shift(
                seq_len,
                scheduler.get("base_image_seq_len", 256),
                scheduler.get("max_image_seq_len", 4096),
                scheduler.get("base_shift", 0.5),
                scheduler.get("max_shift", 1.16),
            )
        timesteps, _ = retrieve_timesteps(self.scheduler, request.steps, "cpu", **options)
        return timesteps

    def step(self, request: Request, condition: dict, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        model_input = self.guided_input(request, latents)
        (noise,) = self.run(
            "transformer",
            hidden_states=model_input.numpy(),
            timestep=np.full(model_input.shape[0], float(t), dtype=np.float32),
            **condition,
        )
        noise = self.apply_guidance(request, torch.from_numpy(noise))
        return self.scheduler.step(noise, t, latents, return_dict=False)[0]
