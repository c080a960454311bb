"""Backend registry: unknown keys and missing providers give errors that say what to do."""

from __future__ import annotations

import pytest

from modelkiln.errors import KilnError
from modelkiln.runtime.session import BACKENDS, providers_for


def test_cpu_backend_providers():
    assert providers_for("cpu") == ["CPUExecutionProvider"]


def test_unknown_backend_lists_valid_ones():
    with pytest.raises(KilnError, match=r"unknown backend 'metal'. Valid backends: cpu, cuda, tensorrt"):
        providers_for("metal")


@pytest.mark.parametrize("backend", [name for name in BACKENDS if name != "cpu"])
def test_gpu_backend_without_its_provider_names_the_install(backend, monkeypatch):
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(KilnError, match=r"pip install|onnxruntime-gpu"):
        providers_for(backend)


def test_captioner_encoder_threads_do_not_spin(small_artifact):
    """The encoder runs once, right before the decoder's first step: its idle threads must not
    busy-wait on the cores that step needs. The decoder, called step after step, keeps spinning."""
    from modelkiln import runtime

    def spinning(session) -> str:
        try:
            return session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
        except RuntimeError:  # not set: onnxruntime's default, spinning
            return "default"

    sessions = runtime.load(small_artifact).sessions
    assert spinning(sessions["encoder"]) == "0"
    assert spinning(sessions["decoder"]) == "default"


def test_graph_with_external_data_outside_its_folder_is_refused_before_onnxruntime(tmp_path, monkeypatch):
    """Any caller of create_session (quantizers, benchmarks), not only runtime.load, is guarded."""
    import numpy as np
    import onnx
    import onnxruntime
    from onnx import TensorProto, helper, numpy_helper

    from modelkiln.errors import ArtifactError
    from modelkiln.runtime.session import RuntimeOptions, create_session

    weight = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    value = helper.make_tensor_value_info
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [value("x", TensorProto.FLOAT, [1, 4])], [value("y", TensorProto.FLOAT, [1, 4])], [weight],
    )  # fmt: skip
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph), path, save_as_external_data=True, location="w.bin", size_threshold=0)
    assert create_session(path, RuntimeOptions()).run(None, {"x": np.ones((1, 4), np.float32)})
    model = onnx.load(path, load_external_data=False)
    model.graph.initializer[0].external_data[0].value = "../w.bin"  # onnx.save itself refuses '..'
    path.write_bytes(model.SerializeToString())

    def never(*args, **kwargs):
        raise AssertionError("onnxruntime opened the graph")

    monkeypatch.setattr(onnxruntime, "InferenceSession", never)
    with pytest.raises(ArtifactError, match=r"g.onnx: its external data names '../w.bin', which is refused"):
        create_session(path, RuntimeOptions())
