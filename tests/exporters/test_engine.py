"""`kiln engine` on the CPU side: everything checked before TensorRT's API (parent, precision, profiles,
refit inputs), and the one-line error where TensorRT is missing. Building and running engines is in
tests/runtime/test_tensorrt_gpu.py (marked gpu)."""

from __future__ import annotations

import importlib.util

import pytest

from modelkiln.cli import main
from modelkiln.errors import KilnError
from modelkiln.exporters.engine import EngineConfig, build_engines, read_refit_inputs
from modelkiln.runtime.profiles import parse_profile

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def test_engines_are_built_only_from_tensorrt_target_graphs(small_artifact, tmp_path):
    with pytest.raises(
        KilnError, match=r"artifact for target onnxruntime; .*kiln export --model .* --target tensorrt"
    ):
        build_engines(small_artifact, tmp_path / "e")
    assert not (tmp_path / "e").exists()


def test_precision_and_profiles_are_checked_before_tensorrt(target_artifact, tmp_path):
    _, artifact = target_artifact("vit-gpt2", "tensorrt")
    with pytest.raises(
        KilnError, match=r"--precision int8 does not fit .*int8 engines are built from an int8-static"
    ):
        build_engines(artifact, tmp_path / "e", EngineConfig(precision="int8"))
    with pytest.raises(KilnError, match="--precision tf32: use one of fp32, fp16, bf16, int8"):
        build_engines(artifact, tmp_path / "e", EngineConfig(precision="tf32"))
    bad = parse_profile("decoder:input_ids=4x1,2x1,8x1")
    with pytest.raises(
        KilnError, match=r"--profile decoder:input_ids: every size must satisfy MIN <= OPT <= MAX"
    ):
        build_engines(artifact, tmp_path / "e", EngineConfig(profiles=(bad,)))
    assert not (tmp_path / "e").exists()


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here: the gpu tests build engines")
def test_without_tensorrt_the_build_stops_in_one_line_and_leaves_nothing(target_artifact, tmp_path, capsys):
    _, artifact = target_artifact("vit-gpt2", "tensorrt")
    with pytest.raises(
        KilnError, match=r"TensorRT is not installed here .*pip install 'modelkiln\[tensorrt\]'"
    ):
        build_engines(artifact, tmp_path / "e")
    assert main(["engine", str(artifact), "--out", str(tmp_path / "e"), "--precision", "fp16"]) == 2
    assert "TensorRT is not installed here" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_cli_usage_errors_come_first(target_artifact, tmp_path, capsys):
    _, artifact = target_artifact("vit-gpt2", "tensorrt")
    args = ["engine", str(artifact), "--out", str(tmp_path / "e")]
    assert main([*args, "--profile", "decoder:input_ids"]) == 2
    assert "expected COMPONENT:INPUT=MIN,OPT,MAX" in capsys.readouterr().err
    assert main([*args, "--refit", str(artifact), "--precision", "fp16"]) == 2
    assert "--refit keeps the engines' precision and profiles" in capsys.readouterr().err


def test_refit_takes_refittable_engines_only(target_artifact):
    _, artifact = target_artifact("vit-gpt2", "tensorrt")
    with pytest.raises(KilnError, match=r"holds no refittable TensorRT engines \(kind onnx\)"):
        read_refit_inputs(artifact, artifact)
