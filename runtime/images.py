"""Image loading and preprocessing for the captioning runtime, without PyTorch or transformers.

An artifact ships the model's ``preprocessor_config.json``; this module turns user images into the
``pixel_values`` the exported vision encoder expects, matching transformers' PIL backends
(``ViTImageProcessorPil``, ``BlipImageProcessorPil``) number for number::

    import json
    from modelkiln.runtime.images import ImagePreprocessor, load_images

    config = json.loads((artifact_dir / "preprocessor_config.json").read_text())
    preprocess = ImagePreprocessor.from_config(config)
    pixel_values = preprocess(load_images(["cat.jpg", pil_image, numpy_array]))  # float32 [B, 3, H, W]

``load_images`` checks and decodes every input up front, so a bad file is reported by its index and path
before any model runs. Only numpy, Pillow and the standard library are imported here.

Pillow refuses files of more than ``2 * PIL.Image.MAX_IMAGE_PIXELS`` pixels (about 179 million) as possible
decompression bombs. To caption such a file you trust, set ``PIL.Image.MAX_IMAGE_PIXELS`` in Python, or the
environment variable ``KILN_MAX_IMAGE_PIXELS`` (a pixel count; ``kiln caption`` reads it too), which sets
it for the process whenever a file is opened here.

``read_image_processor_config`` finds a saved folder's image processor settings in either layout
transformers writes; the exporters read checkpoints with it and the runtime reads artifacts with it.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from modelkiln.errors import ArtifactError, ImageInputError, KilnError

__all__ = [
    "IMAGE_PROCESSOR_FILES",
    "MAX_PIXELS_ENV",
    "ImagePreprocessor",
    "PreprocessConfig",
    "PreprocessorConfigError",
    "ResizeTarget",
    "convert_to_rgb",
    "load_images",
    "read_image_processor_config",
]

# What Pillow raises for unreadable, corrupt or truncated files; plugins are not consistent about it.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)
# Environment variable that raises Pillow's decompression-bomb limit (PIL.Image.MAX_IMAGE_PIXELS) for the
# process, so that CLI users, who cannot set it in Python, can open a huge image they trust.
MAX_PIXELS_ENV = "KILN_MAX_IMAGE_PIXELS"


class PreprocessorConfigError(ArtifactError, ValueError):
    """``preprocessor_config.json`` asks for a processor or an option this runtime does not implement."""


# --------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------


def load_images(images: Any) -> list[Image.Image]:
    """Decode one input or a list/tuple of inputs into fully loaded PIL images.

    Each input is a path (``str`` or ``pathlib.Path``), a ``PIL.Image.Image`` or a numpy array: ``HxW``
    grayscale, ``HxWxC`` with 1, 3 or 4 channels, or ``CxHxW`` with 1 or 3 channels when the layout is
    unambiguous; ``uint8`` in [0, 255] or float in [0, 1]. Modes are kept (an RGBA file stays RGBA) so that
    ``ImagePreprocessor`` can apply the model's own RGB conversion. Raises ``ImageInputError`` naming the
    offending item.
    """
    items = list(images) if isinstance(images, (list, tuple)) else [images]
    if not items:
        raise ImageInputError("No images were given: pass at least one image path, PIL image or numpy array.")
    return [_load_one(item, index) for index, item in enumerate(items)]


def _load_one(item: Any, index: int) -> Image.Image:
    if isinstance(item, (str, Path)):
        return _open_path(Path(item), index)
    if isinstance(item, Image.Image):
        return _check_pil_image(item, f"image {index} (a PIL image)")
    if isinstance(item, np.ndarray):
        return _array_to_image(item, f"image {index} (a numpy array of shape {item.shape})")
    raise ImageInputError(
        f"Image {index} is a {type(item).__name__}, which is not supported: pass a file path, a PIL image or "
        "a numpy array (HxW, HxWxC or CxHxW; uint8, or float in [0, 1])."
    )


def _open_path(path: Path, index: int) -> Image.Image:
    where = f"image {index} ({path})"
    if not path.exists():
        raise ImageInputError(f"{_cap(where)} does not exist: check the path.")
    if not path.is_file():
        raise ImageInputError(f"{_cap(where)} is not a file: pass the path of an image file.")
    _apply_pixel_limit()
    try:
        with Image.open(path) as opened:
            # Decode now: Image.open only reads the header, so a truncated file would fail much later.
            opened.load()
            # Same orientation handling as transformers' load_image, so phone photos are upright. It returns
            # a new image that owns its pixels, so no file handle outlives this call.
            return ImageOps.exif_transpose(opened)
    except Image.UnidentifiedImageError as error:
        raise ImageInputError(
            f"{_cap(where)} is not an image Pillow can read, or its header is corrupt ({error}): pass a PNG, "
            "JPEG, WebP, BMP, GIF or TIFF file."
        ) from error
    except Image.DecompressionBombError as error:
        # Not corruption: the header asks for more pixels than Pillow decodes without being told to.
        raise ImageInputError(
            f"{_cap(where)} is over Pillow's decompression-bomb limit ({str(error).rstrip('.')}): if you trust "
            f"the file, raise the limit above its pixel count with the environment variable {MAX_PIXELS_ENV}="
            "PIXELS (or PIL.Image.MAX_IMAGE_PIXELS in Python), or downscale the image."
        ) from error
    except _DECODE_ERRORS as error:
        raise ImageInputError(
            f"{_cap(where)} is corrupt or truncated and cannot be decoded ({error}): re-save or re-download "
            "the file."
        ) from error


def _apply_pixel_limit() -> None:
    """Set Pillow's decompression-bomb limit from MAX_PIXELS_ENV when the user set it."""
    text = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not text:
        return
    if not text.isdigit() or int(text) == 0:
        raise ImageInputError(
            f"{MAX_PIXELS_ENV}={text!r} is not a pixel count: set it to a positive integer, e.g. "
            f"{MAX_PIXELS_ENV}=400000000 for a 20000x20000 image, or unset it."
        )
    Image.MAX_IMAGE_PIXELS = int(text)


def _check_pil_image(image: Image.Image, where: str) -> Image.Image:
    try:
        image.load()  # a lazily opened image may still fail to decode
    except _DECODE_ERRORS as error:
        raise ImageInputError(
            f"{_cap(where)} cannot be decoded ({error}): its file is corrupt or truncated; re-save the file."
        ) from error
    if image.width == 0 or image.height == 0:
        raise ImageInputError(f"{_cap(where)} is empty ({image.width}x{image.height} pixels).")
    return image


def _array_to_image(array: np.ndarray, where: str) -> Image.Image:
    if array.dtype != np.uint8 and not np.issubdtype(array.dtype, np.floating):
        raise ImageInputError(
            f"{_cap(where)} has dtype {array.dtype}, which is not supported: use uint8 in [0, 255] or float "
            "in [0, 1] (e.g. array.astype(np.uint8) after scaling it yourself)."
        )
    pixels = _to_channels_last(array, where)
    if pixels.size == 0:
        raise ImageInputError(f"{_cap(where)} is empty.")
    if pixels.dtype != np.uint8:
        pixels = _float_to_uint8(pixels, where)
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    mode = {2: "L"}.get(pixels.ndim) or {3: "RGB", 4: "RGBA"}[pixels.shape[-1]]
    return Image.fromarray(np.ascontiguousarray(pixels), mode=mode)


def _to_channels_last(array: np.ndarray, where: str) -> np.ndarray:
    if array.ndim == 2:
        return array
    if array.ndim != 3:
        raise ImageInputError(
            f"{_cap(where)} has {array.ndim} dimensions: pass one image as HxW, HxWxC or CxHxW, and a batch "
            "as a list of arrays."
        )
    channels_last = array.shape[-1] in (1, 3, 4)
    channels_first = array.shape[0] in (1, 3)
    if channels_last and channels_first:
        raise ImageInputError(
            f"{_cap(where)} is ambiguous: both its first and last axes could be channels. Convert it to a "
            "PIL image yourself (PIL.Image.fromarray) so the layout is explicit."
        )
    if channels_last:
        return array
    if channels_first:
        return np.moveaxis(array, 0, -1)
    raise ImageInputError(
        f"{_cap(where)} has no channel axis of size 1, 3 or 4 (HxWxC) or 1 or 3 (CxHxW): pass a grayscale, "
        "RGB or RGBA image."
    )


def _float_to_uint8(pixels: np.ndarray, where: str) -> np.ndarray:
    if not np.all(np.isfinite(pixels)):
        raise ImageInputError(f"{_cap(where)} contains NaN or infinite values.")
    low, high = float(pixels.min()), float(pixels.max())
    if low < 0.0 or high > 1.0:
        raise ImageInputError(
            f"{_cap(where)} is float with values in [{low:g}, {high:g}], outside [0, 1]: divide uint8 pixel "
            "values by 255, or pass them as uint8."
        )
    # Round rather than truncate, so float images made as uint8 / 255 come back exactly.
    return np.round(pixels.astype(np.float64) * 255.0).astype(np.uint8)


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


# --------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------


# Where a folder saved by transformers keeps its image processor settings, in transformers' own order of
# priority (ImageProcessingMixin.get_image_processor_dict): the entry transformers 5 nests in a whole
# processor's processor_config.json, then the legacy preprocessor_config.json of its own. A transformers 4
# processor_config.json holds no such entry (only e.g. num_query_tokens) and is passed over.
IMAGE_PROCESSOR_FILES: tuple[tuple[str, str | None], ...] = (
    ("processor_config.json", "image_processor"),
    ("preprocessor_config.json", None),
)


def read_image_processor_config(directory: Path, error: type[KilnError], fix: str) -> dict[str, Any]:
    """The image processor settings saved in ``directory``, from whichever of ``IMAGE_PROCESSOR_FILES``
    holds them first; raises ``error`` ending with ``fix`` when a file is unreadable or none holds them."""
    for name, entry in IMAGE_PROCESSOR_FILES:
        file = directory / name
        if not file.is_file():
            continue
        try:
            config = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as caught:
            raise error(f"{file} is not valid JSON ({caught}): {fix}.") from caught
        found = config.get(entry) if entry is not None and isinstance(config, dict) else config
        if entry is None or isinstance(found, dict):
            return found
    raise error(
        f"{directory} has no preprocessor_config.json (nor an image_processor entry in processor_config.json), "
        f"which holds the image processor settings the runtime needs: {fix}."
    )


@dataclass(frozen=True)
class ResizeTarget:
    """Where ``do_resize`` sends an image: a fixed ``height`` x ``width``, or a shortest-edge rule."""

    # Fixed output height in pixels; set together with width.
    height: int | None = None
    # Fixed output width in pixels; set together with height.
    width: int | None = None
    # Resize so the shorter side has this length, keeping the aspect ratio (rounded down).
    shortest_edge: int | None = None
    # With shortest_edge: cap the longer side at this length (transformers' get_size_with_aspect_ratio).
    longest_edge: int | None = None

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after resizing an image of the given size, exactly as transformers computes it."""
        if self.height is not None and self.width is not None:
            return self.height, self.width
        if self.longest_edge is not None:
            return _size_with_aspect_ratio(height, width, self.shortest_edge, self.longest_edge)
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(self.shortest_edge * long / short)
        return (new_long, self.shortest_edge) if width <= height else (self.shortest_edge, new_long)


def _size_with_aspect_ratio(height: int, width: int, size: int, max_size: int) -> tuple[int, int]:
    # A port of transformers.image_transforms.get_size_with_aspect_ratio, float rounding included.
    raw_size = None
    min_original, max_original = float(min(height, width)), float(max(height, width))
    if max_original / min_original * size > max_size:
        raw_size = max_size * min_original / max_original
        size = round(raw_size)
    if (height <= width and height == size) or (width <= height and width == size):
        return height, width
    if width < height:
        return (int(raw_size * height / width) if raw_size is not None else int(size * height / width)), size
    return size, (int(raw_size * width / height) if raw_size is not None else int(size * width / height))


@dataclass(frozen=True)
class PreprocessConfig:
    """The resolved settings of one image processor: config values over the processor class defaults."""

    # Class name from the config, e.g. "BlipImageProcessor"; only used in messages.
    processor_type: str
    # Convert to RGB with transformers' convert_to_rgb (transparency composited onto white); true unless
    # the config sets it to false.
    do_convert_rgb: bool
    # Resize with Pillow before anything else.
    do_resize: bool
    # Target of the resize.
    size: ResizeTarget
    # Pillow resampling filter (0 nearest, 1 lanczos, 2 bilinear, 3 bicubic, 4 box, 5 hamming).
    resample: int
    # Crop the centre (zero-padding images smaller than the crop), after resizing.
    do_center_crop: bool
    # (height, width) of the centre crop; None when do_center_crop is off.
    crop_size: tuple[int, int] | None
    # Multiply uint8 pixels by rescale_factor.
    do_rescale: bool
    # Usually 1/255.
    rescale_factor: float
    # Subtract image_mean and divide by image_std per channel.
    do_normalize: bool
    # Per-channel mean (R, G, B).
    image_mean: tuple[float, float, float]
    # Per-channel standard deviation (R, G, B).
    image_std: tuple[float, float, float]


_IMAGENET_STANDARD = (0.5, 0.5, 0.5)
_OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_COMMON_DEFAULTS = {
    "do_resize": True,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "do_center_crop": None,
    "crop_size": None,
    "do_pad": None,
    "default_to_square": True,
}
# Class attributes of transformers' PIL backends: a key missing from (or null in) the config takes these.
_PROCESSOR_DEFAULTS: dict[str, dict[str, Any]] = {
    "ViTImageProcessor": {
        **_COMMON_DEFAULTS,
        "do_convert_rgb": None,
        "size": {"height": 224, "width": 224},
        "resample": int(Image.Resampling.BILINEAR),
        "image_mean": _IMAGENET_STANDARD,
        "image_std": _IMAGENET_STANDARD,
    },
    "BlipImageProcessor": {
        **_COMMON_DEFAULTS,
        "do_convert_rgb": True,
        "size": {"height": 384, "width": 384},
        "resample": int(Image.Resampling.BICUBIC),
        "image_mean": _OPENAI_CLIP_MEAN,
        "image_std": _OPENAI_CLIP_STD,
    },
}
_PROCESSOR_ALIASES = {name + suffix: name for name in _PROCESSOR_DEFAULTS for suffix in ("", "Pil")}
# Keys transformers only uses for bookkeeping or at call time; they do not change pixel values here.
_IGNORED_KEYS = frozenset(
    {
        "image_processor_type",
        "feature_extractor_type",
        "processor_class",
        "auto_map",
        "data_format",
        "input_data_format",
        "device",
        "return_tensors",
        "disable_grouping",
        "image_seq_length",
        "pad_size",
    }
)


def _processor_type(config: Mapping[str, Any]) -> str:
    name = config.get("image_processor_type")
    if name is None and isinstance(config.get("feature_extractor_type"), str):
        # transformers maps legacy feature extractors to image processors the same way.
        name = config["feature_extractor_type"].replace("FeatureExtractor", "ImageProcessor")
    if name not in _PROCESSOR_ALIASES:
        raise PreprocessorConfigError(
            f"preprocessor_config.json has image_processor_type={name!r}, which the runtime does not "
            f"implement (supported: {', '.join(sorted(_PROCESSOR_ALIASES))}). Export a supported model."
        )
    return _PROCESSOR_ALIASES[name]


def _resolve_settings(config: Mapping[str, Any], kind: str) -> dict[str, Any]:
    defaults = _PROCESSOR_DEFAULTS[kind]
    for key, value in config.items():
        if key in defaults or key in _IGNORED_KEYS or value is None or value is False:
            continue
        raise PreprocessorConfigError(
            f"preprocessor_config.json sets {key}={value!r}, which the runtime does not implement for "
            f"{kind}. Remove the key if it is not needed, or export the model with a supported processor."
        )
    # transformers replaces a null value with the class default too (BaseImageProcessor._set_attributes).
    settings = {**defaults, **{key: value for key, value in config.items() if value is not None}}
    if settings["do_pad"]:
        raise PreprocessorConfigError(
            "preprocessor_config.json enables do_pad, which the runtime does not implement: set it to false."
        )
    return settings


# --------------------------------------------------------------------------------------------------------
# Config value parsing
# --------------------------------------------------------------------------------------------------------


def _flag(settings: Mapping[str, Any], key: str) -> bool:
    value = settings[key]
    if value is None or isinstance(value, bool):
        return bool(value)
    raise PreprocessorConfigError(f"preprocessor_config.json: {key} must be true or false, got {value!r}.")


def _positive_int(value: Any, key: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    raise PreprocessorConfigError(
        f"preprocessor_config.json: {key} must be a positive integer, got {value!r}."
    )


def _resize_target(size: Any, default_to_square: bool) -> ResizeTarget:
    # Mirrors transformers' get_size_dict: an int is square unless default_to_square is false.
    if isinstance(size, int) and not isinstance(size, bool):
        size = {"height": size, "width": size} if default_to_square else {"shortest_edge": size}
    elif isinstance(size, (list, tuple)) and len(size) == 2:
        size = {"height": size[0], "width": size[1]}
    keys = set(size) if isinstance(size, dict) else None
    if keys == {"height", "width"}:
        return ResizeTarget(
            height=_positive_int(size["height"], "size.height"),
            width=_positive_int(size["width"], "size.width"),
        )
    if keys in ({"shortest_edge"}, {"shortest_edge", "longest_edge"}):
        longest = size.get("longest_edge")
        return ResizeTarget(
            shortest_edge=_positive_int(size["shortest_edge"], "size.shortest_edge"),
            longest_edge=None if longest is None else _positive_int(longest, "size.longest_edge"),
        )
    raise PreprocessorConfigError(
        f"preprocessor_config.json: size={size!r} is not supported; use {{'height', 'width'}}, "
        "{'shortest_edge'} or {'shortest_edge', 'longest_edge'}."
    )


def _crop_size(value: Any) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = {"height": value, "width": value}
    elif isinstance(value, (list, tuple)) and len(value) == 2:
        value = {"height": value[0], "width": value[1]}
    if not isinstance(value, dict) or set(value) != {"height", "width"}:
        raise PreprocessorConfigError(
            "preprocessor_config.json: do_center_crop needs crop_size as {'height', 'width'}, "
            f"got {value!r}."
        )
    return _positive_int(value["height"], "crop_size.height"), _positive_int(
        value["width"], "crop_size.width"
    )


def _channel_values(value: Any, key: str, nonzero: bool = False) -> tuple[float, float, float]:
    # A single number applies to every channel, as in transformers' normalize.
    values = [value] * 3 if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    if (
        not isinstance(values, (list, tuple))
        or len(values) != 3
        or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values
        )
        or (nonzero and any(v == 0 for v in values))
    ):
        rule = "three finite non-zero numbers" if nonzero else "three finite numbers"
        raise PreprocessorConfigError(
            f"preprocessor_config.json: {key} must be {rule} (R, G, B), got {value!r}."
        )
    return float(values[0]), float(values[1]), float(values[2])


def _resample(value: Any) -> int:
    valid = {int(member) for member in Image.Resampling}
    if isinstance(value, int) and not isinstance(value, bool) and value in valid:
        return value
    raise PreprocessorConfigError(
        f"preprocessor_config.json: resample={value!r} is not a Pillow resampling filter (0-5)."
    )


def _rescale_factor(value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    raise PreprocessorConfigError(
        f"preprocessor_config.json: rescale_factor must be a number, got {value!r}."
    )


def _build_config(kind: str, settings: Mapping[str, Any]) -> PreprocessConfig:
    do_center_crop = _flag(settings, "do_center_crop")
    return PreprocessConfig(
        processor_type=kind,
        # Unset (ViT's default) means "any mode": transformers would choke on a grayscale or RGBA image
        # there, but a 3-channel model has one sensible reading of it. Only an explicit false refuses.
        do_convert_rgb=settings["do_convert_rgb"] is None or _flag(settings, "do_convert_rgb"),
        do_resize=_flag(settings, "do_resize"),
        size=_resize_target(settings["size"], _flag(settings, "default_to_square")),
        resample=_resample(settings["resample"]),
        do_center_crop=do_center_crop,
        crop_size=_crop_size(settings["crop_size"]) if do_center_crop else None,
        do_rescale=_flag(settings, "do_rescale"),
        rescale_factor=_rescale_factor(settings["rescale_factor"]),
        do_normalize=_flag(settings, "do_normalize"),
        image_mean=_channel_values(settings["image_mean"], "image_mean"),
        image_std=_channel_values(settings["image_std"], "image_std", nonzero=True),
    )


# --------------------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------------------


class ImagePreprocessor:
    """Turns PIL images into ``pixel_values`` exactly like transformers' PIL image processor backends.

    The steps, in transformers' order: RGB conversion, Pillow resize on uint8, centre crop, rescale
    (computed in float64, stored as float32), then normalisation in float32.
    """

    def __init__(self, config: PreprocessConfig):
        self.config = config

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ImagePreprocessor:
        """Build from the dict of a ``preprocessor_config.json``.

        Raises ``PreprocessorConfigError`` (an ``ArtifactError`` and a ``ValueError``) naming the key when the
        processor type or an enabled option is not implemented.
        """
        if not isinstance(config, Mapping):
            raise PreprocessorConfigError(
                f"preprocessor_config.json must hold a JSON object, got {type(config).__name__}."
            )
        kind = _processor_type(config)
        return cls(_build_config(kind, _resolve_settings(config, kind)))

    @classmethod
    def from_dir(cls, path: str | Path) -> ImagePreprocessor:
        """Build from a directory's image processor settings, in either layout transformers saves (see
        ``read_image_processor_config``)."""
        fix = "re-export the artifact with `kiln export`"
        return cls.from_config(read_image_processor_config(Path(path), ArtifactError, fix))

    def __call__(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Preprocess a batch of PIL images into a float32 array of shape [B, 3, H, W]."""
        if isinstance(images, Image.Image) or not isinstance(images, Sequence) or len(images) == 0:
            raise ImageInputError("ImagePreprocessor needs a non-empty list of PIL images (see load_images).")
        arrays = [self._process(image, index) for index, image in enumerate(images)]
        shapes = sorted({array.shape for array in arrays})
        if len(shapes) > 1:
            raise ImageInputError(
                f"The preprocessed images have different shapes {shapes} and cannot form one batch: this "
                "processor keeps the aspect ratio, so pass images of one size or caption them one by one."
            )
        return np.stack(arrays).astype(np.float32, copy=False)

    def _process(self, image: Image.Image, index: int) -> np.ndarray:
        if not isinstance(image, Image.Image):
            raise ImageInputError(
                f"Image {index} is a {type(image).__name__}, not a PIL image: pass inputs through "
                "load_images."
            )
        config = self.config
        rgb = self._to_rgb(image, index)
        if config.do_resize:
            height, width = config.size.output_size(rgb.height, rgb.width)
            rgb = rgb.resize((width, height), resample=config.resample)
        pixels = np.asarray(rgb).transpose(2, 0, 1)  # CHW uint8, as transformers' PIL backend works
        if config.do_center_crop:
            pixels = _center_crop(pixels, config.crop_size)
        if config.do_rescale:
            # transformers upcasts to float64 before scaling and only then stores float32.
            pixels = (pixels.astype(np.float64) * config.rescale_factor).astype(np.float32)
        if config.do_normalize:
            pixels = _normalize(pixels, config.image_mean, config.image_std)
        return pixels

    def _to_rgb(self, image: Image.Image, index: int) -> Image.Image:
        if not self.config.do_convert_rgb:
            if image.mode != "RGB":
                raise ImageInputError(
                    f"Image {index} has mode {image.mode!r}, but this model's preprocessor_config.json sets "
                    "do_convert_rgb to false, so only RGB images are accepted: convert it first with "
                    "image.convert('RGB')."
                )
            return image
        try:
            return convert_to_rgb(image)
        except _DECODE_ERRORS as error:
            raise ImageInputError(
                f"Image {index} has mode {image.mode!r}, which Pillow cannot convert to RGB ({error}): "
                "convert it to RGB yourself first."
            ) from error


def convert_to_rgb(image: Image.Image) -> Image.Image:
    """transformers' ``convert_to_rgb`` for PIL images: composite any transparency onto white, then RGB.

    Transparency means an alpha band (RGBA, LA, PA, La, RGBa) or a ``transparency`` entry in ``image.info``
    (palette or RGB/L PNGs with a tRNS chunk); everything else is a plain ``image.convert("RGB")``.
    """
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _center_crop(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    # A port of transformers.image_transforms.center_crop for CHW arrays, zero padding included.
    _, height, width = pixels.shape
    crop_height, crop_width = size
    top, left = (height - crop_height) // 2, (width - crop_width) // 2
    if top >= 0 and left >= 0:
        return pixels[:, top : top + crop_height, left : left + crop_width]
    new_height, new_width = max(crop_height, height), max(crop_width, width)
    padded = np.zeros((pixels.shape[0], new_height, new_width), dtype=pixels.dtype)
    top_pad, left_pad = math.ceil((new_height - height) / 2), math.ceil((new_width - width) / 2)
    padded[:, top_pad : top_pad + height, left_pad : left_pad + width] = pixels
    top, left = top + top_pad, left + left_pad
    return padded[
        :, max(0, top) : min(new_height, top + crop_height), max(0, left) : min(new_width, left + crop_width)
    ]


def _normalize(pixels: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    # transformers works in float32 here (uint8 input is cast first), with mean and std cast to float32 too.
    if not np.issubdtype(pixels.dtype, np.floating):
        pixels = pixels.astype(np.float32)
    mean_array = np.asarray(mean, dtype=pixels.dtype)[:, None, None]
    std_array = np.asarray(std, dtype=pixels.dtype)[:, None, None]
    return (pixels - mean_array) / std_array
