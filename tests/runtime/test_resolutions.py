"""Resolution conformance per text-to-image family: every size the diffusers pipeline takes works in the
artifact and gives diffusers' image; every size diffusers refuses is refused before any graph runs.

Each tiny pipeline is exported once per session (the keys match the family tests', so a full run shares
those exports). Sizes cover odd and even patch / latent counts in both directions, extreme aspect
ratios, the smallest valid size, SD3's pos_embed_max_size limit, odd latent sides for an SD 1.x UNet
(a VAE with SD 1.5's factor 8, so 72 px sides are 9 latents) and Flux's packing and rounding. Two steps
each, from identical latents; PSNR is against diffusers' image.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from conftest import TEXT_LENGTHS
from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline

from modelkiln import runtime
from modelkiln.cli import main
from modelkiln.errors import GenerationConfigError
from modelkiln.metrics import psnr

STEPS = 2
MIN_PSNR = 40.0
SD3_LENGTH = TEXT_LENGTHS["sd3.5-medium"]  # the shared export's T5 length
FLUX_LENGTH = TEXT_LENGTHS["flux-dev"]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The diffusers references are tiny: on a shared 2-core machine, torch's second thread waits more
    than it works (20x slower per call here). Restored for the modules after this one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Family:
    """One exported tiny pipeline with its diffusers reference, loaded once per module."""

    def __init__(self, source, artifact, reference_class, **call_options):
        self.artifact = artifact
        self.pipe = runtime.load(artifact)
        self.reference = reference_class.from_pretrained(source, dtype=torch.float32)
        self.reference.set_progress_bar_config(disable=True)
        self.options = {"num_inference_steps": STEPS, "output_type": "np", **call_options}

    def latents(self, height: int, width: int, seed: int = 0) -> torch.Tensor:
        """Seeded noise in the layout ``latents=`` takes at this size (Flux: packed); both get it."""
        request = self.pipe.request("a red cat", None, STEPS, None, height, width, seed)
        return self.pipe.randn(self.pipe.latent_shape(request), request)

    def both(self, height: int, width: int, latents=None, **options) -> tuple[np.ndarray, np.ndarray]:
        """Our image and diffusers' at one size, from the same latents."""
        latents = self.latents(height, width) if latents is None else latents
        options = {**self.options, "height": height, "width": width, **options}
        ours = self.pipe("a red cat", latents=latents, **options).images
        reference_latents = torch.as_tensor(latents)
        theirs = self.reference("a red cat", latents=reference_latents.clone(), **options).images
        return ours, theirs


def _no_graph_may_run(pipe, monkeypatch) -> None:
    def refuse(name, **feeds):
        raise AssertionError(f"graph {name!r} ran for a request that should have been refused")

    monkeypatch.setattr(pipe, "run", refuse)


def _refused_everywhere(family: Family, monkeypatch, height: int, width: int, message: str) -> None:
    """Diffusers fails on the size; the runtime refuses it, with ``message``, before any graph runs."""
    options = {**family.options, "height": height, "width": width}
    with pytest.raises((ValueError, RuntimeError)):
        family.reference("a red cat", **options)
    _no_graph_may_run(family.pipe, monkeypatch)
    with pytest.raises(GenerationConfigError, match=message) as refused:
        family.pipe("a red cat", **options)
    assert "\n" not in str(refused.value)


# -- SD3 / SD3.5 ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd35(tiny_diffusion):
    """Tiny SD3.5-Medium: VAE factor 2, patch 2 (sides are multiples of 4 px), pos_embed_max_size 32
    (at most 128 px per side)."""
    source, artifact = tiny_diffusion("sd3.5-medium", max_sequence_length=SD3_LENGTH)
    return Family(source, artifact, StableDiffusion3Pipeline, max_sequence_length=SD3_LENGTH)


SD3_SIZES = [
    (4, 4),  # smallest: one patch
    (12, 8),  # 3 x 2 patches: odd rows
    (8, 12),  # 2 x 3: odd columns
    (20, 28),  # 5 x 7: odd both
    (40, 96),  # 10 x 24, 56x64 and 40x40: sizes from the issue
    (56, 64),
    (40, 40),
    (48, 96),  # 12 x 24: even both
    (128, 4),  # pos_embed_max_size rows, one column: the limit and the most extreme aspect ratio
    (4, 128),
    (124, 128),  # 31 x 32: odd just under the limit
    (128, 128),  # the largest size
]


@pytest.mark.parametrize(("height", "width"), SD3_SIZES, ids=[f"{h}x{w}" for h, w in SD3_SIZES])
def test_sd3_every_accepted_size_matches_diffusers(sd35, record_property, height, width):
    ours, theirs = sd35.both(height, width)
    assert ours.shape == theirs.shape == (1, height, width, 3)
    record_property("psnr", psnr(ours, theirs))
    assert psnr(ours, theirs) >= MIN_PSNR


@pytest.mark.parametrize(
    ("height", "width", "message"),
    [
        (50, 32, r"^height 50 is not a positive multiple of 4, .*patch size\)\. Use 48 or 52\.$"),
        (32, 2, r"^width 2 is not a positive multiple of 4, .* Use 4\.$"),
        (-4, 32, r"^height -4 is not a positive multiple of 4, .* Use 4\.$"),
        (130, 32, r"^height 130 is not a positive multiple of 4, .* Use 128\.$"),
        (
            32,
            132,
            r"^width 132 is larger than .*pos_embed_max_size 32 patches\) allows \(128 px .* Use 128\.$",
        ),
    ],
)
def test_sd3_sizes_diffusers_refuses_are_refused_before_any_graph(sd35, monkeypatch, height, width, message):
    _refused_everywhere(sd35, monkeypatch, height, width, message)


def test_sd3_artifact_from_before_the_exact_crop_refuses_odd_patch_counts(sd35, monkeypatch):
    """Older exports crop wrongly at odd patch counts: a clear refusal instead of onnxruntime's error."""
    pipe = runtime.load(sd35.artifact)
    pipe.config = {key: value for key, value in pipe.config.items() if key != "exact_pos_embed_crop"}
    _no_graph_may_run(pipe, monkeypatch)
    with pytest.raises(
        GenerationConfigError, match=r"^height 12 is an odd number of patches.*use 8 or 16\.$"
    ):
        pipe("a cat", height=12, width=8, num_inference_steps=STEPS)
    with pytest.raises(GenerationConfigError, match=r"^width 4 is an odd number of patches.*use 8\.$"):
        pipe("a cat", height=8, width=4, num_inference_steps=STEPS)


def test_generate_cli_refuses_a_size_with_one_line_and_writes_nothing(sd35, tmp_path, capsys):
    out = tmp_path / "fox.png"
    args = ["generate", str(sd35.artifact), "a fox", "--steps", "1", "--height", "132", "--width", "32"]
    assert main([*args, "--out", str(out)]) == 2
    assert "height 132 is larger than" in capsys.readouterr().err and not out.exists()


# -- FLUX.1 ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flux_dev(tiny_diffusion):
    """Tiny FLUX.1-dev: VAE factor 2 and 2x2 packing, so sides are multiples of 4 px (others round)."""
    source, artifact = tiny_diffusion("flux-dev", max_sequence_length=FLUX_LENGTH)
    return Family(source, artifact, FluxPipeline, max_sequence_length=FLUX_LENGTH)


FLUX_SIZES = [
    (4, 4),  # smallest: one packed patch
    (4, 8),  # 1 x 2 patches
    (12, 20),  # 3 x 5: odd both
    (40, 24),  # 10 x 6
    (8, 64),  # 2 x 16: extreme aspect ratios
    (64, 8),
    (64, 64),  # 256 patches: the scheduler's max_image_seq_len
]


@pytest.mark.parametrize(("height", "width"), FLUX_SIZES, ids=[f"{h}x{w}" for h, w in FLUX_SIZES])
def test_flux_every_multiple_matches_diffusers(flux_dev, record_property, height, width):
    ours, theirs = flux_dev.both(height, width)
    assert ours.shape == theirs.shape == (1, height, width, 3)
    record_property("psnr", psnr(ours, theirs))
    assert psnr(ours, theirs) >= MIN_PSNR


@pytest.mark.parametrize(
    ("asked", "generated"),
    [((6, 10), (4, 8)), ((42, 30), (40, 28)), ((7, 7), (4, 4)), ((13, 64), (12, 64))],
    ids=["6x10", "42x30", "7x7", "13x64"],
)
def test_flux_rounds_other_sizes_down_as_diffusers_does(flux_dev, record_property, caplog, asked, generated):
    """FluxPipeline does not refuse these: it warns and generates at the rounded size. So do we."""
    latents = flux_dev.latents(*generated)
    with caplog.at_level(logging.WARNING, logger="modelkiln.runtime.flux"):
        ours, theirs = flux_dev.both(*asked, latents=latents)
    assert ours.shape == theirs.shape == (1, *generated, 3)
    record_property("psnr", psnr(ours, theirs))
    assert psnr(ours, theirs) >= MIN_PSNR
    assert f"generating {generated[0]}x{generated[1]}, as diffusers' FluxPipeline does" in caplog.text


@pytest.mark.parametrize(
    ("height", "width", "message"),
    [
        (3, 8, r"^height 3 is not a positive multiple of 4, .*rounded down to it\)\. Use 4\.$"),
        (42, 2, r"^width 2 is not a positive multiple of 4, .* Use 4\.$"),  # 42 alone would round
        (-8, 8, r"^height -8 is not a positive multiple of 4, .* Use 4\.$"),
    ],
)
def test_flux_sizes_that_round_to_nothing_are_refused_before_any_graph(
    flux_dev, monkeypatch, height, width, message
):
    _refused_everywhere(flux_dev, monkeypatch, height, width, message)


# -- SD 1.x ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd1(tiny_diffusion):
    """Tiny SD 1.x with SD 1.5's VAE factor 8: 72 px sides are 9 latents, which the UNet halves to 5 and
    must upsample back to 9, not 10."""
    source, artifact = tiny_diffusion("sd1")
    return Family(source, artifact, StableDiffusionPipeline)


SD1_SIZES = [
    (8, 8),  # smallest: one latent
    (72, 72),  # 9 x 9 latents: odd, halved to 5 and upsampled back to 9
    (24, 40),  # 3 x 5
    (72, 136),  # 9 x 17
    (64, 48),  # 8 x 6: even, divisible by the UNet's upsampling
    (16, 256),  # 2 x 32: extreme aspect ratio
    (8, 128),
    (128, 8),
]


@pytest.mark.parametrize(("height", "width"), SD1_SIZES, ids=[f"{h}x{w}" for h, w in SD1_SIZES])
def test_sd1_every_multiple_of_8_matches_diffusers(sd1, record_property, height, width):
    ours, theirs = sd1.both(height, width)
    assert ours.shape == theirs.shape == (1, height, width, 3)
    record_property("psnr", psnr(ours, theirs))
    assert psnr(ours, theirs) >= MIN_PSNR


@pytest.mark.parametrize(
    ("height", "width", "message"),
    [
        (12, 8, r"^height 12 is not a positive multiple of 8, .* Use 8 or 16\.$"),
        (8, 4, r"^width 4 is not a positive multiple of 8, .* Use 8\.$"),
        (76, 72, r"^height 76 is not a positive multiple of 8, .* Use 72 or 80\.$"),
    ],
)
def test_sd1_sizes_diffusers_refuses_are_refused_before_any_graph(sd1, monkeypatch, height, width, message):
    _refused_everywhere(sd1, monkeypatch, height, width, message)


# -- latents in any array form --------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind", ["numpy-float32", "numpy-float16", "numpy-float64", "torch-float16", "torch-bfloat16"]
)
def test_latents_as_numpy_or_any_float_dtype_match_diffusers(sd35, record_property, kind):
    """Cast to float32 as diffusers casts ``latents=`` to the pipeline's dtype: the image is diffusers'
    from the same (cast) latents."""
    library, dtype = kind.split("-")
    base = sd35.latents(20, 28, seed=4)
    latents = base.numpy().astype(dtype) if library == "numpy" else base.to(getattr(torch, dtype))
    ours, theirs = sd35.both(20, 28, latents=latents)
    record_property("psnr", psnr(ours, theirs))
    assert psnr(ours, theirs) >= MIN_PSNR


def test_numpy_latents_give_the_image_of_the_same_torch_latents(flux_dev, sd1):
    for family, size in ((flux_dev, (12, 20)), (sd1, (24, 40))):
        latents = family.latents(*size, seed=2)
        options = {**family.options, "height": size[0], "width": size[1]}
        from_numpy = family.pipe("a dog", latents=latents.numpy(), **options).images
        from_torch = family.pipe("a dog", latents=latents, **options).images
        assert np.array_equal(from_numpy, from_torch)


@pytest.mark.parametrize(
    ("latents", "message"),
    [
        (
            np.zeros((1, 4, 10, 12), dtype=np.float32),
            r"^latents have shape \(1, 4, 10, 12\); this request needs \(1, 4, 10, 14\) \(batch, latent "
            r"channels, height / VAE factor, width / VAE factor\)\. Pass latents of that shape",
        ),
        (
            torch.zeros(2, 4, 10, 14),
            r"latents have shape \(2, 4, 10, 14\); this request needs \(1, 4, 10, 14\)",
        ),
        (np.zeros((1, 4, 10, 14), dtype=np.int64), r"numpy array of int64; pass floating-point latents"),
        (torch.zeros(1, 4, 10, 14, dtype=torch.int32), r"torch tensor of torch.int32; pass floating-point"),
        ([[0.0]], r"latents are a list; pass a torch tensor or a numpy array of floats"),
    ],
    ids=["numpy-shape", "torch-batch", "numpy-int", "torch-int", "list"],
)
def test_wrong_latents_are_refused_before_any_graph(sd35, monkeypatch, latents, message):
    _no_graph_may_run(sd35.pipe, monkeypatch)
    with pytest.raises(GenerationConfigError, match=message):
        sd35.pipe("a cat", latents=latents, height=20, width=28, num_inference_steps=STEPS)


def test_flux_latents_shape_error_names_the_packed_layout(flux_dev, monkeypatch):
    _no_graph_may_run(flux_dev.pipe, monkeypatch)
    with pytest.raises(
        GenerationConfigError, match=r"needs \(1, 15, 16\) \(batch, \(height / \(VAE factor x 2\)\)"
    ):
        flux_dev.pipe("a cat", latents=np.zeros((1, 4, 6, 10), np.float32), height=12, width=20)
