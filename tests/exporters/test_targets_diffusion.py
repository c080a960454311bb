"""Export targets for the text-to-image families: SD3.5 and SD 1.x export whole for ``tensorrt`` with
standard ops that TensorRT's parser takes and match diffusers with `kiln validate`'s bars; Flux, whose text
encoders and VAE are the classes SD3.5 covers, exports its transformer for tensorrt and matches its PyTorch
wrapper. A file of its own so that the test workers share the exports (see test_targets.py for the rules).

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

from modelkiln.exporters import flux
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


def test_flux_transformer_exports_for_tensorrt_and_matches_its_pytorch_wrapper(tiny_diffusion, tmp_path):
    """Flux's own graph, the double- and single-stream transformer with guidance, made for tensorrt by
    the export's steps (export_component, then finish_for_target, which refuses a node TensorRT's parser
    cannot take) and run on onnxruntime against its PyTorch wrapper."""
    length = TEXT_LENGTHS["flux-dev"]
    source, _ = tiny_diffusion("flux-dev", max_sequence_length=length)
    target = get_target("tensorrt")
    models = flux.load_model(resolve_source(str(source)), max_sequence_length=length)
    (transformer,) = [c for c in flux.build_components(models, target) if c.name == "transformer"]
    spec = export_component(transformer, tmp_path, opset=18, fuse=target.fuse_attention)
    path = tmp_path / spec.file
    finish_for_target(path, target, "component transformer")
    model = onnx.load(str(path), load_external_data=False)
    assert incompatible_nodes(model, target, tmp_path) == []
    assert not [
        n.op_type for n in model.graph.node if n.domain not in ("", "ai.onnx") or n.op_type == "Constant"
    ]
    feeds = {name: value.numpy() for name, value in transformer.example_inputs.items()}
    (got, *_) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)
    with torch.no_grad():
        expected = transformer.module(*transformer.example_inputs.values())
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-4, rtol=1e-4)
