"""Export targets for the text-to-image families: each tiny pipeline exports for ``tensorrt`` with
standard ops that TensorRT's parser takes and matches diffusers with `kiln validate`'s bars.
A file of its own so that the test workers share the exports (see test_targets.py for the rules).

``portable`` differs from ``tensorrt`` only in TensorRT's CumSum rewrite and parser check
(exporters.target_graphs.finish_for_target). No diffusion graph has a CumSum, so a diffusion pipeline's
portable graphs are its tensorrt graphs node for node: checked here on those graphs instead of a second
export of every pipeline (the captioners, whose OPT positions do take the rewrite, export both).
"""

from __future__ import annotations

import dataclasses

import onnx
import pytest
from conftest import TARGET_DIFFUSION
from test_targets import check_target_export

from modelkiln.exporters.target_graphs import incompatible_nodes
from modelkiln.exporters.targets import TARGETS
from modelkiln.manifest import read_manifest


@pytest.mark.parametrize("name", TARGET_DIFFUSION)
def test_every_diffusion_family_exports_for_tensorrt_and_matches_diffusers(target_artifact, name):
    check_target_export(*target_artifact(name, "tensorrt"), "tensorrt")


def test_portable_and_tensorrt_shape_graphs_alike_but_for_the_tensorrt_rewrite():
    def graph_shaping(name: str) -> dict:
        fields = dataclasses.asdict(TARGETS[name])
        return {k: v for k, v in fields.items() if k not in ("name", "description", "schemes", "refused_why")}

    assert graph_shaping("portable") == {**graph_shaping("tensorrt"), "tensorrt_ops": False}


@pytest.mark.parametrize("name", TARGET_DIFFUSION)
def test_diffusion_tensorrt_graphs_are_portable_graphs(target_artifact, name):
    _, artifact = target_artifact(name, "tensorrt")
    for component, spec in read_manifest(artifact).components.items():
        model = onnx.load(str(artifact / spec.file), load_external_data=False)
        # The rewrite turns an integer CumSum into a float one between Casts: none here, none rewritten.
        assert "CumSum" not in {node.op_type for node in model.graph.node}, component
        assert incompatible_nodes(model, TARGETS["portable"], artifact) == [], component
