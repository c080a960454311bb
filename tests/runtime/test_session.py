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
