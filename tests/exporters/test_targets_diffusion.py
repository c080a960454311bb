"""Export targets for the text-to-image families: each tiny pipeline exports for ``tensorrt`` with
standard ops that TensorRT's parser takes and matches diffusers with `kiln validate`'s bars; ``portable``
(the same graphs but for TensorRT's CumSum rewrite, which no diffusion graph has) is checked on SD3.5,
whose onnxruntime graphs differ most from it (fused attention with qk-norm and a dual-attention block).
A file of its own so that the test workers share the exports (see test_targets.py for the rules).
"""

from __future__ import annotations

import pytest
from conftest import TARGET_DIFFUSION
from test_targets import check_target_export


@pytest.mark.parametrize("name", TARGET_DIFFUSION)
def test_every_diffusion_family_exports_for_tensorrt_and_matches_diffusers(target_artifact, name):
    check_target_export(*target_artifact(name, "tensorrt"), "tensorrt")


def test_portable_diffusion_graphs_match_diffusers(target_artifact):
    check_target_export(*target_artifact("sd3.5-medium", "portable"), "portable")
