"""The text-to-image benchmark: the denoising step of every variant against the diffusers pipeline."""
