"""Export targets for the text-to-image families: each tiny pipeline exports for ``tensorrt`` with
standard ops that TensorRT's parser takes and matches diffusers with `kiln validate`'s bars.
A file of its own so that the test workers share the exports (see test_targets.py for the rules).

``portable`` differs from ``tensorrt`` only in TensorRT's CumSum rewrite and parser check
(exporters.target_graphs.finish_for_target). No diffusion graph has a CumSum, so a diffusion pipeline's
portable graphs are its tensorrt graphs node for node: checked here on those graphs instead of a second
export of every pipeline (test_targets.py does the same for BLIP; OPT's positions do take the rewrite).
"""

from __future__ import annotations

import pytest
from conftest import TARGET_DIFFUSION
from test_targets import assert_tensorrt_graphs_are_portable_graphs, check_target_export


@pytest.mark.parametrize("name", TARGET_DIFFUSION)
def test_every_diffusion_family_exports_for_tensorrt_and_matches_diffusers(target_artifact, name):
    check_target_export(*target_artifact(name, "tensorrt"), "tensorrt")


@pytest.mark.parametrize("name", TARGET_DIFFUSION)
def test_diffusion_tensorrt_graphs_are_portable_graphs(target_artifact, name):
    assert_tensorrt_graphs_are_portable_graphs(target_artifact(name, "tensorrt")[1])
