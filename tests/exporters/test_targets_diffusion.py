"""Export targets for the text-to-image families: SD3.5 exports whole for ``tensorrt`` with standard ops
that TensorRT's parser takes and matches diffusers with `kiln validate`'s bars; Flux and SD 1.x, whose
text encoders and VAE are the classes SD3.5 covers, export their denoiser for tensorrt and match its
PyTorch wrapper. A file of its own so that the test workers share the exports (see test_targets.py).

``portable`` differs from ``tensorrt`` only in TensorRT's CumSum rewrite and parser check
(exporters.target_graphs.finish_for_target). No diffusion graph has a CumSum, so a diffusion pipeline's
portable graphs are its tensorrt graphs node for node: checked here on those graphs instead of a second
export of every pipeline (test_targets.py does the same for BLIP; OPT's positions do take the rewrite).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import TARGET_DIFFUSION, TEXT_LENGTHS
from test_targets import assert_tensorrt_graphs_are_portable_graphs, check_target_export

from modelkiln.exporters import flux, stable_diffusion
from modelkiln.exporters.onnx_export import export_component
from modelkiln.exporters.source import resolve_source
from modelkiln.exporters.target_graphs import finish_for_target, incompatible_nodes
from modelkiln.exporters.targets import get_target


@pytest.mark.parametrize("name", TARGET_DIFFUSION)
def test_every_diffusion_family_exports_for_tensorrt_and_matches_diffusers(target_artifact, name):
    check_target_export(*target_artifact(name, "tensorrt"), "tensorrt")


@pytest.mark.parametrize("name", TARGET_DIFFUSION)
def test_diffusion_tensorrt_graphs_are_portable_graphs(target_artifact, name):
    assert_tensorrt_graphs_are_portable_graphs(target_artifact(name, "tensorrt")[1])


# pipeline -> (exporter module, its denoiser graph, export options): each family's own graph
DENOISERS = {
    "flux-dev": (flux, "transformer", {"max_sequence_length": TEXT_LENGTHS["flux-dev"]}),
    "sd1": (stable_diffusion, "unet", {}),
}


@pytest.mark.parametrize("name", DENOISERS)
def test_denoiser_exports_for_tensorrt_and_matches_its_pytorch_wrapper(tiny_diffusion, tmp_path, name):
    """The graph each of these families adds to the classes SD3.5's whole tensorrt export covers (CLIP,
    T5, AutoencoderKL): Flux's double- and single-stream transformer with guidance, SD 1.x's UNet. Made
    by the export's own steps (export_component, then finish_for_target, which refuses a node TensorRT's
    parser cannot take) and run on onnxruntime against its PyTorch wrapper."""
    exporter, graph, options = DENOISERS[name]
    source, _ = tiny_diffusion(name, **options)
    target = get_target("tensorrt")
    models = exporter.load_model(resolve_source(str(source)), **options)
    (denoiser,) = [c for c in exporter.build_components(models, target) if c.name == graph]
    spec = export_component(denoiser, tmp_path, opset=18, fuse=target.fuse_attention)
    path = tmp_path / spec.file
    finish_for_target(path, target, f"component {graph}")
    model = onnx.load(str(path), load_external_data=False)
    assert incompatible_nodes(model, target, tmp_path) == []
    assert not [
        n.op_type for n in model.graph.node if n.domain not in ("", "ai.onnx") or n.op_type == "Constant"
    ]
    feeds = {name: value.numpy() for name, value in denoiser.example_inputs.items()}
    (got, *_) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)
    with torch.no_grad():
        expected = denoiser.module(*denoiser.example_inputs.values())
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-4, rtol=1e-4)
