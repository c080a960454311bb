"""Parity of modelkiln.runtime.images with transformers' PIL image processors, and its input errors."""

from __future__ import annotations

import io
import json
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from modelkiln.errors import ArtifactError, ImageInputError
from modelkiln.runtime.images import ImagePreprocessor, PreprocessorConfigError, load_images

transformers = pytest.importorskip("transformers")

RNG_SEED = 1234
SIZES = [(1, 1), (7, 3), (31, 17), (64, 64), (95, 130), (257, 40)]  # (width, height)
# Full-size (224, 384) outputs are slow to compare, so the default configs see fewer input sizes.
FULL_SIZE_CONFIGS = {"vit-convert", "blip-default"}

# (processor class, constructor kwargs): sizes, filters, non-square targets, custom statistics, crops.
CONFIGS = {
    "vit-convert": ("ViTImageProcessorPil", {"do_convert_rgb": True}),
    "vit-nearest-nonsquare": (
        "ViTImageProcessorPil",
        {
            "do_convert_rgb": True,
            "size": {"height": 20, "width": 33},
            "resample": 0,
            "image_mean": [0.1, 0.2, 0.3],
            "image_std": [0.9, 0.5, 0.25],
        },
    ),
    "vit-hamming-no-normalize": (
        "ViTImageProcessorPil",
        {"do_convert_rgb": True, "size": {"height": 24, "width": 24}, "resample": 5, "do_normalize": False},
    ),
    "blip-default": ("BlipImageProcessorPil", {}),
    "blip-lanczos-nonsquare": ("BlipImageProcessorPil", {"size": {"height": 40, "width": 28}, "resample": 1}),
    "blip-box-no-rescale": (
        "BlipImageProcessorPil",
        {"size": {"height": 16, "width": 16}, "resample": 4, "do_rescale": False},
    ),
    "blip-bilinear-crop": (
        "BlipImageProcessorPil",
        {"size": {"height": 30, "width": 36}, "resample": 2, "do_center_crop": True, "crop_size": 32},
    ),
    "blip-shortest-edge-crop": (
        "BlipImageProcessorPil",
        {"size": {"shortest_edge": 26}, "do_center_crop": True, "crop_size": {"height": 24, "width": 20}},
    ),
    "vit-shortest-longest-crop": (
        "ViTImageProcessorPil",
        {
            "do_convert_rgb": True,
            "size": {"shortest_edge": 24, "longest_edge": 40},
            "do_center_crop": True,
            "crop_size": {"height": 24, "width": 24},
        },
    ),
}


def _reference(name: str):
    class_name, kwargs = CONFIGS[name]
    return getattr(transformers, class_name)(**kwargs)


def _saved_config(processor, tmp_path: Path) -> dict:
    processor.save_pretrained(tmp_path)
    return json.loads((tmp_path / "preprocessor_config.json").read_text())


def _noise(rng, width: int, height: int, channels: int, dtype=np.uint8, high: int = 256) -> np.ndarray:
    shape = (height, width) if channels == 1 else (height, width, channels)
    return rng.integers(0, high, shape, dtype=dtype)


def _mode_images(rng, width: int, height: int) -> list[Image.Image]:
    """One image per interesting PIL mode, transparency flavours included."""
    rgb = Image.fromarray(_noise(rng, width, height, 3))
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette_transparent = palette.copy()
    palette_transparent.info["transparency"] = 3
    rgb_trns = rgb.copy()
    rgb_trns.info["transparency"] = tuple(int(v) for v in np.asarray(rgb)[0, 0])
    la = Image.fromarray(np.stack([_noise(rng, width, height, 1)] * 2, axis=-1), mode="LA")
    return [
        rgb,
        Image.fromarray(_noise(rng, width, height, 4), mode="RGBA"),
        Image.fromarray(_noise(rng, width, height, 1), mode="L"),
        la,
        palette,
        palette_transparent,
        rgb_trns,
        Image.fromarray(_noise(rng, width, height, 4), mode="CMYK"),
        Image.fromarray(_noise(rng, width, height, 1, np.uint16, 65536)),  # I;16
        Image.fromarray(_noise(rng, width, height, 1, high=2).astype(bool)),
    ]


def _assert_same(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.dtype == np.float32 and actual.shape == expected.shape
    # The runtime is bit-identical today; array_equal is the cheap check, the tolerance a safety margin.
    if not np.array_equal(actual, expected):
        np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-6)


def _assert_parity(reference, ours: ImagePreprocessor, images: list) -> None:
    for image, loaded in zip(images, load_images(images), strict=True):
        _assert_same(ours([loaded]), reference(image, return_tensors="np").pixel_values)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_pil_modes_match_transformers(name, tmp_path):
    reference = _reference(name)
    ours = ImagePreprocessor.from_config(_saved_config(reference, tmp_path))
    rng = np.random.default_rng(RNG_SEED)
    for width, height in SIZES[1::2] if name in FULL_SIZE_CONFIGS else SIZES:
        _assert_parity(reference, ours, _mode_images(rng, width, height))


@pytest.mark.parametrize("name", ["blip-default", "vit-nearest-nonsquare"])
def test_batches_match_transformers(name, tmp_path):
    reference = _reference(name)
    ours = ImagePreprocessor.from_config(_saved_config(reference, tmp_path))
    rng = np.random.default_rng(RNG_SEED)
    images = [Image.fromarray(_noise(rng, w, h, 4), mode="RGBA") for w, h in SIZES]
    expected = reference(images, return_tensors="np").pixel_values
    _assert_same(ours(load_images(images)), expected)


def test_plain_vit_config_accepts_rgb_like_transformers(tmp_path):
    reference = transformers.ViTImageProcessorPil()
    config = _saved_config(reference, tmp_path)
    assert "do_convert_rgb" not in config
    ours = ImagePreprocessor.from_config(config)
    rng = np.random.default_rng(RNG_SEED)
    _assert_parity(reference, ours, [Image.fromarray(_noise(rng, w, h, 3)) for w, h in SIZES])


def test_numpy_inputs_match_transformers(tmp_path):
    reference = _reference("blip-lanczos-nonsquare")
    ours = ImagePreprocessor.from_config(_saved_config(reference, tmp_path))
    rng = np.random.default_rng(RNG_SEED)
    arrays = []
    for width, height in [(31, 17), (64, 64), (95, 130)]:
        arrays += [
            _noise(rng, width, height, 3),
            _noise(rng, width, height, 4),
            _noise(rng, width, height, 1)[..., None],
            np.moveaxis(_noise(rng, width, height, 3), -1, 0),
            _noise(rng, width, height, 1)[None],
        ]
    _assert_parity(reference, ours, arrays)


def test_grayscale_and_float_arrays_equal_their_uint8_form(tmp_path):
    ours = ImagePreprocessor.from_config(_saved_config(_reference("blip-default"), tmp_path))
    rng = np.random.default_rng(RNG_SEED)
    gray = _noise(rng, 40, 30, 1)
    rgb = _noise(rng, 40, 30, 3)
    np.testing.assert_array_equal(ours(load_images(gray)), ours(load_images(gray[..., None])))
    for dtype in (np.float16, np.float32, np.float64):
        as_float = (rgb / 255).astype(dtype)
        np.testing.assert_array_equal(ours(load_images(as_float)), ours(load_images(rgb)))
        chw = np.moveaxis(as_float, -1, 0)
        np.testing.assert_array_equal(ours(load_images(chw)), ours(load_images(rgb)))


def _save_bytes(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def test_files_match_transformers_on_the_same_file(tmp_path):
    reference = _reference("blip-lanczos-nonsquare")
    ours = ImagePreprocessor.from_config(_saved_config(reference, tmp_path))
    rng = np.random.default_rng(RNG_SEED)
    images = _mode_images(rng, 45, 33)
    paths = []
    for index, image in enumerate(images[:7]):  # the modes PNG can store, transparency chunks included
        paths.append(tmp_path / f"image{index}.png")
        image.save(paths[-1])
    paths.append(tmp_path / "cmyk.jpg")
    images[7].save(paths[-1])
    for path, loaded in zip(paths, load_images(paths), strict=True):
        with Image.open(path) as original:
            expected = reference(original, return_tensors="np").pixel_values
        _assert_same(ours([loaded]), expected)


def test_exif_orientation_is_applied_to_files(tmp_path):
    image = Image.fromarray(_noise(np.random.default_rng(RNG_SEED), 40, 20, 3))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif)
    (loaded,) = load_images(str(path))
    assert loaded.size == (20, 40)


def test_accepts_single_items_tuples_and_paths(tmp_path):
    image = Image.new("RGB", (5, 4), "red")
    image.save(tmp_path / "red.png")
    loaded = load_images((image, tmp_path / "red.png", str(tmp_path / "red.png")))
    assert [item.size for item in loaded] == [(5, 4)] * 3
    assert len(load_images(image)) == 1


def test_legacy_feature_extractor_config_with_int_size():
    reference = transformers.ViTImageProcessorPil(size=24, do_convert_rgb=True)
    config = {
        "feature_extractor_type": "ViTFeatureExtractor",
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "resample": 2,
        "size": 24,
        "do_rescale": None,  # null falls back to the class default, as in transformers
    }
    ours = ImagePreprocessor.from_config(config)
    assert (ours.config.size.height, ours.config.size.width) == (24, 24)
    _assert_parity(reference, ours, _mode_images(np.random.default_rng(RNG_SEED), 50, 30))


# ---------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.fixture
def good_png_bytes() -> bytes:
    return _save_bytes(Image.fromarray(_noise(np.random.default_rng(RNG_SEED), 64, 64, 3)), "PNG")


@pytest.fixture
def good_jpeg_bytes() -> bytes:
    return _save_bytes(Image.fromarray(_noise(np.random.default_rng(RNG_SEED), 64, 64, 3)), "JPEG")


def test_truncation_is_not_tolerated_globally():
    # These tests rely on Pillow's default; if something flipped it, truncated files would decode silently.
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_empty_list_is_rejected():
    with pytest.raises(ImageInputError, match="No images were given"):
        load_images([])


def test_missing_file_and_directory_are_rejected(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(ImageInputError, match=r"Image 1 \(.*nope\.png\) does not exist"):
        load_images([Image.new("RGB", (2, 2)), missing])
    with pytest.raises(ImageInputError, match=r"Image 0 .* is not a file"):
        load_images(tmp_path)


def test_non_image_and_corrupt_files_are_rejected(tmp_path, good_png_bytes, good_jpeg_bytes):
    text = _write(tmp_path / "notes.png", b"these are not pixels\n" * 10)
    with pytest.raises(ImageInputError, match=r"Image 0 \(.*notes\.png\) is not an image Pillow can read"):
        load_images([text])
    garbage = _write(tmp_path / "garbage.png", good_png_bytes[:40] + bytes(range(256)) * 2)
    with pytest.raises(ImageInputError, match=re.escape(str(garbage))):
        load_images(garbage)
    flipped = (
        good_jpeg_bytes[:100] + bytes(b ^ 0xFF for b in good_jpeg_bytes[100:300]) + good_jpeg_bytes[300:]
    )
    flipped_path = _write(tmp_path / "flipped.jpg", flipped)
    with pytest.raises(ImageInputError, match=r"Image 0 \(.*flipped\.jpg\) is corrupt or truncated"):
        load_images(flipped_path)


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height RGB pixels but holds none: small on disk, huge once decoded."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + header
    ihdr = struct.pack(">I", len(header)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    end = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    return b"\x89PNG\r\n\x1a\n" + ihdr + end


def test_decompression_bomb_limit_is_named_with_how_to_raise_it(tmp_path):
    path = _write(tmp_path / "huge.png", _png_header(20000, 20000))  # 400 Mpx, over 2x Pillow's limit
    with pytest.raises(
        ImageInputError, match=r"Image 0 \(.*huge\.png\) is over Pillow's decompression-bomb"
    ) as caught:
        load_images(path)
    message = str(caught.value)
    assert "KILN_MAX_IMAGE_PIXELS=" in message and "PIL.Image.MAX_IMAGE_PIXELS" in message
    assert "corrupt" not in message and "\n" not in message


def test_pixel_limit_environment_variable_raises_pillows_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # restored after the test, whatever the code sets
    path = tmp_path / "small.png"
    Image.new("RGB", (20, 20), "red").save(path)  # 400 pixels: over twice a limit of 50
    monkeypatch.delenv("KILN_MAX_IMAGE_PIXELS", raising=False)
    with pytest.raises(ImageInputError, match="decompression-bomb limit"):
        load_images(path)
    monkeypatch.setenv("KILN_MAX_IMAGE_PIXELS", "400")
    assert load_images(path)[0].size == (20, 20)
    monkeypatch.setenv("KILN_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(ImageInputError, match=r"KILN_MAX_IMAGE_PIXELS='lots' is not a pixel count"):
        load_images(path)


@pytest.mark.parametrize("suffix", ["png", "jpg"])
def test_truncated_files_are_rejected(tmp_path, good_png_bytes, good_jpeg_bytes, suffix):
    data = good_png_bytes if suffix == "png" else good_jpeg_bytes
    path = _write(tmp_path / f"cut.{suffix}", data[: len(data) // 2])
    with pytest.raises(ImageInputError, match=r"Image 2 \(.*cut\.\w+\) is corrupt or truncated"):
        load_images([Image.new("RGB", (2, 2)), np.zeros((2, 2), np.uint8), path])


def test_lazily_opened_truncated_pil_image_is_rejected(tmp_path, good_png_bytes):
    path = _write(tmp_path / "cut.png", good_png_bytes[: len(good_png_bytes) // 2])
    with (
        Image.open(path) as lazy,
        pytest.raises(ImageInputError, match=r"Image 0 \(a PIL image\) cannot be decoded"),
    ):
        load_images([lazy])


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((4, 4, 3), np.int32), "dtype int32"),
        (np.zeros((4, 4), bool), "dtype bool"),
        (np.zeros((1, 4, 4, 3), np.uint8), "4 dimensions"),
        (np.zeros((4,), np.uint8), "1 dimensions"),
        (np.zeros((3, 8, 3), np.uint8), "ambiguous"),
        (np.zeros((5, 6, 7), np.uint8), "no channel axis"),
        (np.zeros((6, 5, 2), np.uint8), "no channel axis"),
        (np.zeros((0, 5, 3), np.uint8), "empty"),
        (np.full((4, 4, 3), 1.5, np.float32), r"outside \[0, 1\]"),
        (np.full((4, 4, 3), -0.1), r"outside \[0, 1\]"),
        (np.full((4, 4), np.nan, np.float32), "NaN"),
    ],
)
def test_bad_arrays_are_rejected(array, message):
    with pytest.raises(ImageInputError, match=rf"Image 1 \(a numpy array of shape .*{message}"):
        load_images([np.zeros((4, 4, 3), np.uint8), array])


@pytest.mark.parametrize("item", [42, b"\x89PNG", {"path": "x.png"}, None])
def test_unsupported_objects_are_rejected(item):
    with pytest.raises(ImageInputError, match=rf"Image 0 is a {type(item).__name__}, which is not supported"):
        load_images([item])


def test_non_rgb_image_with_convert_rgb_false_is_rejected():
    ours = ImagePreprocessor.from_config(transformers.ViTImageProcessorPil(do_convert_rgb=False).to_dict())
    with pytest.raises(ImageInputError, match=r"Image 1 has mode 'L'.*do_convert_rgb to false"):
        ours([Image.new("RGB", (3, 3)), Image.new("L", (3, 3))])


def test_unset_convert_rgb_accepts_any_mode_like_convert_rgb_true():
    unset = ImagePreprocessor.from_config(transformers.ViTImageProcessorPil().to_dict())
    explicit = ImagePreprocessor.from_config(transformers.ViTImageProcessorPil(do_convert_rgb=True).to_dict())
    images = [Image.new("L", (5, 7), 90), Image.new("RGBA", (6, 4), (10, 20, 30, 40)), Image.new("P", (3, 3))]
    np.testing.assert_array_equal(unset(images), explicit(images))


def test_mixed_output_shapes_are_rejected():
    ours = ImagePreprocessor.from_config(
        transformers.BlipImageProcessorPil(size={"shortest_edge": 8}).to_dict()
    )
    with pytest.raises(ImageInputError, match="different shapes"):
        ours([Image.new("RGB", (8, 8)), Image.new("RGB", (16, 8))])


def test_preprocessor_rejects_empty_and_non_pil_input():
    ours = ImagePreprocessor.from_config({"image_processor_type": "BlipImageProcessor"})
    with pytest.raises(ImageInputError, match="non-empty list"):
        ours([])
    with pytest.raises(ImageInputError, match="Image 0 is a ndarray, not a PIL image"):
        ours([np.zeros((3, 3, 3), np.uint8)])


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"image_processor_type": "CLIPImageProcessor"}, "image_processor_type='CLIPImageProcessor'"),
        ({}, "image_processor_type=None"),
        ({"image_processor_type": "BlipImageProcessor", "do_pad": True}, "do_pad"),
        ({"image_processor_type": "BlipImageProcessor", "do_reduce_labels": True}, "do_reduce_labels"),
        ({"image_processor_type": "BlipImageProcessor", "resample": 9}, "resample=9"),
        ({"image_processor_type": "BlipImageProcessor", "size": {"max_height": 9, "max_width": 9}}, "size="),
        ({"image_processor_type": "ViTImageProcessor", "do_center_crop": True}, "crop_size"),
        ({"image_processor_type": "ViTImageProcessor", "image_std": [0.5, 0, 0.5]}, "image_std"),
        ({"image_processor_type": "ViTImageProcessor", "image_mean": [0.5, 0.5]}, "image_mean"),
        ({"image_processor_type": "ViTImageProcessor", "do_resize": "yes"}, "do_resize"),
    ],
)
def test_unsupported_configs_are_rejected(config, message):
    with pytest.raises(PreprocessorConfigError, match=re.escape(message)) as caught:
        ImagePreprocessor.from_config(config)
    assert isinstance(caught.value, ArtifactError) and isinstance(caught.value, ValueError)


def test_from_dir_reads_preprocessor_or_processor_config(tmp_path):
    vit_dir, blip_dir = tmp_path / "vit", tmp_path / "blip"
    transformers.ViTImageProcessorPil(size={"height": 20, "width": 30}).save_pretrained(vit_dir)
    assert ImagePreprocessor.from_dir(vit_dir).config.size.width == 30
    # transformers 5 saves a whole BlipProcessor as processor_config.json with a nested image_processor.
    blip_dir.mkdir()
    image_processor = transformers.BlipImageProcessorPil(size={"height": 12, "width": 14}).to_dict()
    (blip_dir / "processor_config.json").write_text(json.dumps({"image_processor": image_processor}))
    assert ImagePreprocessor.from_dir(blip_dir).config.size.width == 14
    with pytest.raises(ArtifactError, match=r"has no preprocessor_config\.json"):
        ImagePreprocessor.from_dir(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text("{oops")
    with pytest.raises(ArtifactError, match="is not valid JSON"):
        ImagePreprocessor.from_dir(tmp_path)


def test_harmless_keys_are_accepted():
    config = {
        "image_processor_type": "BlipImageProcessor",
        "processor_class": "Blip2Processor",
        "do_pad": False,
        "some_future_flag": False,
        "data_format": "channels_first",
    }
    assert ImagePreprocessor.from_config(config).config.resample == 3


def test_importing_the_runtime_does_not_import_torch_or_transformers():
    code = (
        "import sys, modelkiln.runtime.images, modelkiln.runtime.text\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
