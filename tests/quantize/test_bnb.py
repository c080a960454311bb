"""bitsandbytes schemes on a tiny ViT-GPT2: torch artifacts that save, reload identically, run and shrink.

Uses the tiny config "b" (widths 64): config "a" (widths 32/48) loses so much at 4 bits that fp4 gives
empty captions, which the quality gate rightly refuses.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import TINY_VIT_GPT2, save_tiny_vit_gpt2

from modelkiln import runtime
from modelkiln.cli import main
from modelkiln.errors import KilnError, SourceModelError, ValidationFailedError
from modelkiln.exporters.export import export_model
from modelkiln.exporters.source import resolve_source
from modelkiln.manifest import artifact_hash, extra_files, read_manifest, verify_files
from modelkiln.quantize.bnb import load_quantized, make_bnb_artifact
from modelkiln.quantize.quantize import QuantizeConfig, quantize_artifact
from modelkiln.quantize.schemes import SCHEMES
from modelkiln.registry import get_family
from modelkiln.runtime.images import load_images

# Every torch (bitsandbytes) scheme with the precision it records and the module class it puts in place.
TESTED_TORCH_SCHEMES = {
    "bnb-int8": ("int8", "Linear8bitLt"),
    "bnb-nf4": ("nf4", "Linear4bit"),
    "bnb-fp4": ("fp4", "Linear4bit"),
}
NUM_IMAGES = 4
WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    """(source dir, ONNX artifact dir) of the tiny config "b". Its own export: bitsandbytes loads the
    source folder, which the shared wide_artifact fixture does not expose."""
    source = save_tiny_vit_gpt2(tmp_path_factory.mktemp("bnb-src"), TINY_VIT_GPT2["b"])
    artifact = tmp_path_factory.mktemp("bnb-art") / "artifact"
    export_model(source, artifact)
    return source, artifact


@pytest.fixture(scope="module", params=sorted(TESTED_TORCH_SCHEMES))
def variant(request, parent, tmp_path_factory):
    """(scheme, variant dir, manifest) made from the ONNX parent, once per scheme."""
    out = tmp_path_factory.mktemp(request.param) / "variant"
    manifest = quantize_artifact(parent[1], out, QuantizeConfig(request.param, num_images=NUM_IMAGES))
    return request.param, out, manifest


def _images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (40, 30, 3), dtype=np.uint8) for _ in range(3)]


def test_every_torch_scheme_is_registered_as_torch():
    torch_schemes = {name for name, scheme in SCHEMES.items() if scheme.kind == "torch"}
    assert torch_schemes == set(TESTED_TORCH_SCHEMES)


def test_variant_manifest_records_kind_scheme_precision_and_hashes(variant, parent):
    scheme, out, manifest = variant
    assert manifest == read_manifest(out)
    assert manifest.kind == "torch" and manifest.components == {}
    assert manifest.precision == TESTED_TORCH_SCHEMES[scheme][0] == SCHEMES[scheme].precision
    assert manifest.quantization["scheme"] == scheme
    assert manifest.quantization["bitsandbytes_config"]["quant_method"] == "bitsandbytes"
    assert manifest.quantization["modules"][TESTED_TORCH_SCHEMES[scheme][1]] > 0
    assert manifest.parent["artifact_sha256"] == artifact_hash(read_manifest(parent[1]))
    assert {WEIGHTS, "config.json", "tokenizer.json", "preprocessor_config.json"} <= set(manifest.files)
    assert verify_files(out, manifest) == [] and extra_files(out, manifest) == []


def test_variant_runs_through_runtime_load(variant):
    _, out, _ = variant
    pipe = runtime.load(out)
    captions = pipe(_images(), max_new_tokens=6)
    assert len(captions) == 3 and all(isinstance(c[0]["generated_text"], str) for c in captions)
    assert isinstance(pipe(_images()[0])[0]["generated_text"], str)  # one image in, one result out


def test_reloaded_variant_decodes_like_the_in_memory_model(variant, parent):
    scheme, out, manifest = variant
    source = resolve_source(str(parent[0]))
    in_memory = load_quantized(source, get_family("vit-gpt2"), scheme, manifest.quantization["options"])
    pipe = runtime.load(out)
    module_class = TESTED_TORCH_SCHEMES[scheme][1]
    assert any(type(m).__name__ == module_class for m in pipe.model.modules())
    pixel_values = pipe.preprocess(load_images(_images()))
    _, tokens = pipe.generate_tokens(pixel_values, max_new_tokens=8, num_beams=1)
    start = manifest.runtime["decoder_start_token_id"]
    with torch.no_grad():
        expected = in_memory.generate(
            pixel_values=torch.from_numpy(pixel_values),
            decoder_input_ids=torch.full((3, 1), start),
            max_new_tokens=8,
            num_beams=1,
            do_sample=False,
        )
    eos = pipe.settings().eos_token_ids
    for row, got in zip(expected.tolist(), tokens, strict=True):
        new = row[1:]
        cut = next((i + 1 for i, t in enumerate(new) if t in eos), len(new))
        assert got == new[:cut]


def test_weight_files_shrink_against_the_fp32_source(variant, parent):
    _, out, _ = variant
    ratio = (out / WEIGHTS).stat().st_size / (parent[0] / WEIGHTS).stat().st_size
    assert ratio < 0.75  # the embeddings and lm_head stay fp32 on a tiny model; Linear weights shrink


def test_quality_figures_are_computed(variant):
    _, _, manifest = variant
    quality = manifest.quantization["quality"]
    assert quality["images"] == NUM_IMAGES and manifest.quantization["gate"] == []
    assert {"agreement", "token_agreement", "bleu_vs_parent", "empty_captions"} <= set(quality)
    assert 0.0 <= quality["agreement"] <= 1.0 and 0.0 <= quality["token_agreement"] <= 1.0


def test_gate_above_what_the_variant_reaches_fails_and_leaves_nothing(
    variant, parent, tmp_path, measured_figures
):
    scheme, _, _ = variant
    measured_figures(agreement=0.5)  # bitsandbytes' CPU kernels differ between CPUs too: set the figure
    config = QuantizeConfig(scheme, num_images=NUM_IMAGES, min_agreement=0.51)
    with pytest.raises(ValidationFailedError, match=r"agreement 0.500 < --min-agreement 0.51"):
        quantize_artifact(parent[1], tmp_path / "gated", config)
    assert list(tmp_path.iterdir()) == []


def test_a_source_model_given_directly_is_measured_against_fp32_torch(parent, tmp_path):
    manifest = make_bnb_artifact(
        parent[0], tmp_path / "nf4", "bnb-nf4", QuantizeConfig("bnb-nf4", num_images=2)
    )
    assert manifest.parent is None and manifest.source.model == str(parent[0])
    assert manifest.quantization["quality"]["images"] == 2


def test_onnx_export_of_a_bitsandbytes_save_is_refused(variant, tmp_path):
    _, out, _ = variant
    with pytest.raises(
        SourceModelError, match=r"quantized with bitsandbytes.*Dequantize first.*model\.dequantize\(\)"
    ):
        export_model(out, tmp_path / "onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            QuantizeConfig("bnb-nf4", components=("decoder",)),
            "--components and --exclude apply to ONNX schemes",
        ),
        (
            QuantizeConfig("bnb-int8", options={"block_size": 32}),
            r"has no option block_size. Its options: llm_int8",
        ),
    ],
)
def test_bad_bnb_requests_say_what_to_do(parent, tmp_path, config, message):
    with pytest.raises(KilnError, match=message):
        quantize_artifact(parent[1], tmp_path / "out", config)
    assert not (tmp_path / "out").exists()


def test_a_torch_variant_is_no_parent_for_more_quantization(variant, tmp_path):
    _, out, _ = variant
    with pytest.raises(KilnError, match="is a torch artifact; scheme int8-dynamic quantizes ONNX graphs"):
        quantize_artifact(out, tmp_path / "q8", QuantizeConfig("int8-dynamic"))
    with pytest.raises(KilnError, match="is already a torch variant"):
        quantize_artifact(out, tmp_path / "nf4", QuantizeConfig("bnb-nf4"))


def test_cli_quantize_bnb(parent, tmp_path, capsys):
    out = tmp_path / "nf4"
    code = main(["quantize", str(parent[1]), "--scheme", "bnb-nf4", "--out", str(out), "--num-images", "2"])
    err = capsys.readouterr().err
    assert code == 0 and "Linear4bit modules" in err and "next: kiln caption" in err
    assert read_manifest(out).kind == "torch"
