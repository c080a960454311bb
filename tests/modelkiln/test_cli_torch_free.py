"""The CLI in the runtime-only install: torch, transformers, diffusers and onnx cannot be imported.

`caption`, `inspect`, `verify`, `families` and `--help` work there; a command that needs the export
tools says in one line which install brings them, and exits 2.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from torch_free import kiln_without_torch


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "image.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(path)
    return path


def test_help_and_families(tmp_path):
    result = kiln_without_torch(["--help"], tmp_path)
    assert result.returncode == 0 and "caption" in result.stdout
    result = kiln_without_torch(["families", "--json"], tmp_path)
    assert result.returncode == 0
    assert {row["name"] for row in json.loads(result.stdout)} >= {"vit-gpt2", "blip", "sd3"}


def test_caption_inspect_verify(small_artifact, image_file, tmp_path):
    result = kiln_without_torch(
        ["caption", small_artifact, image_file, "--json", "--max-new-tokens", "4"], tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert isinstance(json.loads(result.stdout)[0]["generated_text"], str)
    result = kiln_without_torch(["inspect", small_artifact], tmp_path)
    assert result.returncode == 0 and "vit-gpt2" in result.stdout
    result = kiln_without_torch(["inspect", small_artifact, "--json"], tmp_path)
    assert result.returncode == 0 and json.loads(result.stdout)["family"] == "vit-gpt2"
    result = kiln_without_torch(["verify", small_artifact, "--json"], tmp_path)
    assert result.returncode == 0 and json.loads(result.stdout)["problems"] == []


@pytest.mark.parametrize(
    "argv",
    [
        ["export", "--model", "m", "--out", "o"],
        ["quantize", "ART", "--scheme", "int8-dynamic", "--out", "o"],
        ["validate", "ART", "--model", "m"],
        ["demo", "--out", "o"],
        ["bench", "--preset", "tiny", "--out", "o"],
    ],
)
def test_commands_that_need_the_export_tools_say_which_install(small_artifact, tmp_path, argv):
    argv = [str(small_artifact) if a == "ART" else a for a in argv]
    result = kiln_without_torch(argv, tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error:") and "pip install 'modelkiln[export]'" in lines[0]
    assert f"kiln {argv[0]} needs the export tools (" in lines[0] and "is not installed" in lines[0]
    assert not (tmp_path / "o").exists()
