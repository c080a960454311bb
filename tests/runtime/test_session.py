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
