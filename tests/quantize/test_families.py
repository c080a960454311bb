"""Every scheme on BLIP and BLIP-2 too: variants load, run with and without a prompt, and count nodes.

ViT-GPT2 is covered in depth by test_quantize.py and test_bnb.py; this file proves the schemes are not
tied to one family's graph shapes or prompt handling.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from modelkiln import runtime
from modelkiln.quantize.graph_prep import count_ops
from modelkiln.quantize.quantize import QuantizeConfig, quantize_artifact

# family -> (builder, sizes, a prompt the family takes)
FAMILIES = {  # family -> (tiny config, prompt)
    "blip": ("b", "a photography of"),
    "blip-2": ("a", "Question: what is it? Answer:"),
}
# ONNX schemes with options that fit the tiny widths, and the node type each must leave in the graphs.
ONNX_SCHEMES = {
    "int8-dynamic": ({}, "MatMulInteger"),
    "int8-static": ({}, "DequantizeLinear"),
    "int4-weight": ({"block_size": 16}, "MatMulNBits"),
    "fp16": ({}, "Cast"),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_artifact(request, captioner_export):
    """(family, source, artifact, prompt): the exports test_blip.py / test_blip_2.py also use."""
    config, prompt = FAMILIES[request.param]
    return request.param, *captioner_export(request.param, config), prompt


def _images():
    rng = np.random.default_rng(3)
    return [
        rng.integers(0, 255, (40, 30, 3), dtype=np.uint8),
        rng.integers(0, 255, (25, 50, 3), dtype=np.uint8),
    ]


@pytest.mark.parametrize("scheme", sorted(ONNX_SCHEMES))
def test_onnx_scheme_on_family(family_artifact, tmp_path, scheme):
    family, _, artifact, prompt = family_artifact
    options, node_type = ONNX_SCHEMES[scheme]
    # No empty-caption gate: which tokens a random int8/int4 model emits depends on the CPU's int8 path.
    config = QuantizeConfig(scheme, options=options, num_images=2, num_calibration=2, max_new_empty=None)
    try:
        manifest = quantize_artifact(artifact, tmp_path / "variant", config)
    except Exception as error:  # a gate may refuse a tiny random model; the refusal must say why
        pytest.fail(f"{family} {scheme}: {error}")
    for name, stats in manifest.quantization["nodes"].items():
        graph = onnx.load(
            str(tmp_path / "variant" / manifest.components[name].file), load_external_data=False
        )
        assert stats["quantized_nodes"] > 0 and count_ops(graph).get(node_type, 0) > 0, (name, stats)
    pipe = runtime.load(tmp_path / "variant")
    for text in (None, prompt):
        captions = pipe(_images(), prompt=text, max_new_tokens=4)
        assert all(isinstance(c[0]["generated_text"], str) for c in captions)
        if text is not None:
            assert all(c[0]["generated_text"].lower().startswith(text.lower()) for c in captions)


@pytest.mark.parametrize("scheme", ["bnb-int8", "bnb-nf4", "bnb-fp4"])
def test_bnb_scheme_on_family(family_artifact, tmp_path, scheme):
    family, _, artifact, prompt = family_artifact
    manifest = quantize_artifact(artifact, tmp_path / "bnb", QuantizeConfig(scheme, num_images=2))
    assert manifest.kind == "torch" and manifest.family == family
    pipe = runtime.load(tmp_path / "bnb")
    onnx_pipe = runtime.load(artifact)
    pixels = pipe.preprocess(runtime.images.load_images(_images()))
    for text in (None, prompt):
        ids, tokens = pipe.generate_tokens(pixels, text, max_new_tokens=4)
        onnx_ids, _ = onnx_pipe.generate_tokens(pixels, text, max_new_tokens=4)
        np.testing.assert_array_equal(ids, onnx_ids)  # the same prompt handling as the ONNX runtime
        assert all(len(row) <= 4 for row in tokens)
        assert len(pipe(_images(), prompt=text, max_new_tokens=4)) == 2
