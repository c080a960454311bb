"""The validation layer: an artifact against the PyTorch model it came from, one module per task.

validate_artifact(artifact, model, ValidateConfig())          # captioners (image-to-text)
validate_diffusion(artifact, model, DiffusionValidateConfig())  # text-to-image
"""

from modelkiln.validation.captioning import ValidateConfig, validate_artifact, validation_images
from modelkiln.validation.text_to_image import DiffusionValidateConfig, validate_diffusion

__all__ = [
    "DiffusionValidateConfig",
    "ValidateConfig",
    "validate_artifact",
    "validate_diffusion",
    "validation_images",
]
