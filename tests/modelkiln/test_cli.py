"""The kiln CLI: every command's happy path, and every bad input gives one clear error and no output."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from modelkiln.cli import main


@pytest.fixture()
def image_file(tmp_path):
    path = tmp_path / "image.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(path)
    return path


def run(argv, capsys):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_export_caption_validate_inspect_verify(small_source, tmp_path, image_file, capsys):
    # Exported over a stale folder with --overwrite: one export proves both (each costs seconds).
    out = tmp_path / "art"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    code, _, err = run(["export", "--model", small_source, "--out", out, "--overwrite"], capsys)
    assert code == 0 and "next: kiln validate" in err
    assert not (out / "stale.txt").exists() and (out / "manifest.json").exists()
    code, stdout, err = run(["caption", out, image_file, image_file, "--json", "--num-beams", "2"], capsys)
    assert code == 0
    captions = json.loads(stdout)
    assert len(captions) == 2 and captions[0]["generated_text"] == captions[1]["generated_text"]
    assert err.strip().splitlines()[-1].startswith("next: kiln validate")
    code, stdout, err = run(["validate", out, "--model", small_source, "--num-images", "2", "--json"], capsys)
    assert code == 0 and json.loads(stdout)["passed"]
    code, stdout, _ = run(["inspect", out], capsys)
    assert code == 0 and "vit-gpt2" in stdout and "validation passed" in stdout
    code, _, err = run(["verify", out], capsys)
    assert code == 0 and "files match" in err


def test_sampling_from_cli_is_reproducible(small_artifact, image_file, capsys):
    argv = ["caption", small_artifact, image_file, "--do-sample", "--seed", "3", "--num-beams", "1", "--json"]
    first = run(argv, capsys)[1]
    assert run(argv, capsys)[1] == first


def test_existing_output_is_refused_unless_overwrite(small_source, small_artifact, capsys):
    before = sorted(p.name for p in small_artifact.iterdir())
    code, _, err = run(["export", "--model", small_source, "--out", small_artifact], capsys)
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert sorted(p.name for p in small_artifact.iterdir()) == before


@pytest.mark.parametrize(
    ("model", "message"),
    [("./no/such/dir", "does not exist"), ("/abs/missing", "does not exist")],
)
def test_missing_model_path(model, message, tmp_path, capsys):
    code, _, err = run(["export", "--model", model, "--out", tmp_path / "out"], capsys)
    assert code == 2 and message in err
    assert not (tmp_path / "out").exists()


def test_unsupported_family_names_the_supported_ones(tmp_path, capsys):
    from transformers import BertConfig, BertModel

    BertModel(
        BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    ).save_pretrained(tmp_path / "bert")
    code, _, err = run(["export", "--model", tmp_path / "bert", "--out", tmp_path / "out"], capsys)
    assert code == 2 and "'bert'" in err and "vit-gpt2" in err and "--family" in err
    code, _, err = run(
        ["export", "--model", tmp_path / "bert", "--out", tmp_path / "out", "--family", "nope"], capsys
    )
    assert code == 2 and "unknown family 'nope'" in err and "vit-gpt2" in err


def test_pickle_checkpoint_is_refused_without_allow_pickle(small_source, tmp_path, capsys):
    import torch
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    shutil.copytree(small_source, pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    code, _, err = run(["export", "--model", pickled, "--out", tmp_path / "out"], capsys)
    assert code == 2 and "--allow-pickle" in err
    assert not (tmp_path / "out").exists()


def test_caption_bad_images(small_artifact, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    truncated = tmp_path / "truncated.jpg"
    buffer = tmp_path / "full.jpg"
    Image.new("RGB", (64, 64), "red").save(buffer)
    truncated.write_bytes(buffer.read_bytes()[:200])
    for bad in (corrupt, truncated, tmp_path / "missing.png"):
        code, stdout, err = run(["caption", small_artifact, bad], capsys)
        assert code == 2 and "error:" in err and bad.name in err and stdout == ""


def test_empty_image_list_is_an_error(small_artifact):
    from modelkiln import runtime
    from modelkiln.errors import ImageInputError

    with pytest.raises(ImageInputError, match="No images were given"):
        runtime.load(small_artifact)([])


def test_directory_that_is_not_an_artifact(tmp_path, capsys):
    for command in ("caption", "inspect", "verify"):
        argv = [command, tmp_path] + (["x.png"] if command == "caption" else [])
        code, _, err = run(argv, capsys)
        assert code == 2 and "not a modelkiln artifact" in err


def test_altered_or_missing_file_is_reported(small_artifact, tmp_path, capsys, image_file):
    copy = tmp_path / "copy"
    shutil.copytree(small_artifact, copy)
    data = bytearray((copy / "decoder.onnx.data").read_bytes())
    data[100] ^= 1
    (copy / "decoder.onnx.data").write_bytes(bytes(data))
    code, _, err = run(["verify", copy], capsys)
    assert code == 1 and "changed: decoder.onnx.data" in err
    code, _, err = run(["caption", copy, image_file], capsys)
    assert code == 2 and "does not match its manifest" in err
    (copy / "tokenizer.json").unlink()
    code, _, err = run(["verify", copy], capsys)
    assert code == 1 and "missing: tokenizer.json" in err


def test_failed_export_leaves_nothing_behind(small_source, tmp_path, monkeypatch):
    import modelkiln.exporters.export as export_module
    from modelkiln.exporters.export import export_model

    calls = []

    def fail_on_second(component, *args, **kwargs):
        calls.append(component.name)
        if len(calls) == 2:
            raise RuntimeError("simulated crash mid-export")
        return real(component, *args, **kwargs)

    real = export_module.export_component
    monkeypatch.setattr(export_module, "export_component", fail_on_second)
    with pytest.raises(RuntimeError, match="simulated"):
        export_model(small_source, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # neither the artifact nor a staging folder


def test_kiln_entry_point_is_installed():
    result = subprocess.run(
        [sys.executable, "-m", "modelkiln.cli", "--version"], capture_output=True, text=True
    )
    assert result.returncode == 0 and "modelkiln" in result.stdout
    assert shutil.which("kiln") is not None
