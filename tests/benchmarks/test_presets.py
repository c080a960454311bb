"""Family presets of `kiln bench`: one table per family that the registry names, sources the family's
exporter accepts, the eager stages each captioner declares, and the step FLOPs of Flux and the UNet.

The full presets are checked by their sizes only (building them takes minutes); the tiny ones are
built and run.
"""

from __future__ import annotations

import json

import pytest

from modelkiln.benchmarks.captioning.blip_presets import BLIP_2_PRESETS, BLIP_PRESETS
from modelkiln.benchmarks.captioning.runners import EagerRunner
from modelkiln.benchmarks.core.source import build_preset_source, family_presets
from modelkiln.benchmarks.text_to_image.flux_presets import FLUX_PRESETS, build_flux_pipeline
from modelkiln.benchmarks.text_to_image.measure import step_flops_of
from modelkiln.benchmarks.text_to_image.roofline import flux_step_flops, unet_step_flops
from modelkiln.benchmarks.text_to_image.runners import Generation
from modelkiln.benchmarks.text_to_image.sd1_presets import SD1_PRESETS, build_sd1_pipeline
from modelkiln.cli import main
from modelkiln.exporters.source import resolve_source
from modelkiln.fixtures import shapes
from modelkiln.registry import FAMILIES, detect_family

NEW_FAMILIES = ("blip", "blip-2", "flux", "stable-diffusion")


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family_names_a_preset_table_with_its_presets(name):
    bench = FAMILIES[name].bench
    assert bench is not None and tuple(family_presets(name)) == bench.presets


def test_full_presets_keep_the_real_widths():
    blip, blip_2 = BLIP_PRESETS["full"], BLIP_2_PRESETS["full"]
    assert (blip.image_size, blip.patch_size, blip.vision_layers, blip.text_layers) == (384, 16, 12, 12)
    assert (blip_2.opt_hidden, blip_2.opt_ffn, blip_2.opt_heads, blip_2.vocab_size) == (
        2560,
        10240,
        32,
        50272,
    )
    assert blip_2.opt_layers >= 8 and blip_2.vision_hidden == 1408
    for name, guidance in (("full", True), ("full-schnell", False)):
        flux = FLUX_PRESETS[name]
        assert (flux.heads, flux.head_dim, flux.size, flux.guidance_embeds) == (24, 128, 512, guidance)
    sd1 = SD1_PRESETS["full"]
    assert (sd1.unet_channels, sd1.layers_per_block, sd1.size) == ((320, 640, 1280, 1280), 2, 512)
    assert sd1.guidance_scale > 1  # classifier-free guidance: batch-2 UNet calls


@pytest.mark.parametrize(
    ("family", "preset"), [(f, "tiny") for f in NEW_FAMILIES] + [("flux", "tiny-schnell")]
)
def test_tiny_presets_save_a_source_of_their_family_and_are_reused(tmp_path, family, preset):
    directory = build_preset_source(family, preset, tmp_path)
    assert detect_family(resolve_source(str(directory)).config).name == family
    marker = (directory / "preset.json").stat().st_mtime_ns
    assert build_preset_source(family, preset, tmp_path) == directory  # same sizes: not rebuilt
    assert (directory / "preset.json").stat().st_mtime_ns == marker


def test_an_unknown_preset_lists_the_familys_own(tmp_path, capsys):
    argv = ["bench", "--preset", "tiny-schnell", "--family", "stable-diffusion", "--out", str(tmp_path)]
    assert main(argv) != 0
    error = capsys.readouterr().err.replace("\n", " ")
    assert "--preset tiny-schnell: unknown for --family stable-diffusion. Valid presets: tiny, full." in error


@pytest.mark.parametrize("family", ["blip", "blip-2"])
def test_eager_captioners_report_encoder_and_per_token_stages(tmp_path, family):
    source = build_preset_source(family, "tiny", tmp_path)
    job = EagerRunner(str(source), threads=1, max_new_tokens=3).run(shapes.draw(0)[0])
    # Exactly the new tokens (min_new_tokens = max_new_tokens): BLIP-2's generate also echoes its prompt
    # of image tokens and BOS, which must not count, or token agreement with ONNX is misaligned.
    assert len(job.tokens) == 3
    assert {"encoder", "first_token", "decode_per_token"} <= set(job.stages)
    assert all(seconds > 0 for seconds in job.stages.values())


def test_flux_step_flops_match_torchs_flop_counter():
    """The linear part equals what torch counts; torch counts no FLOPs for CPU flash attention."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    transformer = build_flux_pipeline(FLUX_PRESETS["tiny"]).transformer
    config, image, text = dict(transformer.config), 6 * 4, 24
    inputs = {
        "hidden_states": torch.randn(1, image, config["in_channels"]),
        "encoder_hidden_states": torch.randn(1, text, config["joint_attention_dim"]),
        "pooled_projections": torch.randn(1, config["pooled_projection_dim"]),
        "timestep": torch.tensor([0.9]),
        "guidance": torch.tensor([3.5]),
        "img_ids": torch.zeros(image, 3),
        "txt_ids": torch.zeros(text, 3),
    }
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        transformer(**inputs)
    flops = flux_step_flops(config, latent_height=12, latent_width=8, text_tokens=text, batch=1)
    assert flops["linear"] == counter.get_total_flops()
    assert flops["attention"] == 4 * 2 * (image + text) ** 2 * 32  # two blocks, 32 wide


def test_unet_step_flops_count_convolutions_and_attention():
    """Torch counts no FLOPs for CPU flash attention, so the real UNet's count is the linear part."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    unet = build_sd1_pipeline(SD1_PRESETS["tiny"]).unet
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(torch.randn(1, 4, 16, 16), torch.tensor([500.0]), encoder_hidden_states=torch.randn(1, 77, 32))
    flops = unet_step_flops(dict(unet.config), latent_height=16, latent_width=16, text_tokens=77, batch=2)
    assert flops["linear"] == 2 * counter.get_total_flops()
    assert flops["attention"] > 0 and flops["batch"] == 2


def test_flux_steps_are_batch_1_over_t5_tokens_only(tmp_path):
    source = build_preset_source("flux", "tiny", tmp_path)
    settings = Generation(steps=2, guidance_scale=3.5, height=32, width=32, max_sequence_length=24)
    flops = step_flops_of(str(source), {"settings": settings, "family": "flux"})
    # Guidance is an embedding input, not a second batch; Flux's CLIP gives only a pooled vector.
    assert (flops["batch"], flops["text_tokens"], flops["image_tokens"]) == (1, 24, 8 * 8)
    config = json.loads((source / "transformer" / "config.json").read_text())
    assert flops == flux_step_flops(config, latent_height=16, latent_width=16, text_tokens=24, batch=1)
