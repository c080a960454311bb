"""Backend "cuda" keeps the decoder's KV cache on the device with IO binding: the binding itself is
checked on the CPU device here; on CUDA (marked gpu) the cache outputs are CUDA values and the captions
match the CPU backend's."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from modelkiln import runtime
from modelkiln.runtime.captioning import PRESENT_PREFIX
from modelkiln.runtime.session import DEVICE_RESIDENT_PREFIX, IoBoundSession


def _session() -> ort.InferenceSession:
    value = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [2, 3])  # noqa: E731
    graph = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["present.0.key"]), helper.make_node("Abs", ["x"], ["logits"])],
        "step",
        [value("x")],
        [value("present.0.key"), value("logits")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_bound_outputs_are_the_plain_run_and_the_cache_is_bound_to_the_device():
    assert DEVICE_RESIDENT_PREFIX == PRESENT_PREFIX  # the names the captioning decoder feeds back
    x = np.arange(6, dtype=np.float32).reshape(2, 3) - 2
    session = IoBoundSession(_session(), "cpu")
    cache, logits = session.run_with_ort_values(
        ["present.0.key", "logits"], {"x": ort.OrtValue.ortvalue_from_numpy(x)}
    )
    assert np.array_equal(cache.numpy(), -x) and np.array_equal(logits.numpy(), np.abs(x))
    assert [o.name for o in session.get_outputs()] == ["present.0.key", "logits"]
    assert np.array_equal(session.run(["logits"], {"x": x})[0], np.abs(x))


@pytest.mark.gpu
@pytest.mark.skipif(
    "CUDAExecutionProvider" not in ort.get_available_providers(),
    reason="this onnxruntime has no CUDA execution provider (install onnxruntime-gpu on a CUDA machine)",
)
def test_cuda_backend_keeps_the_cache_on_the_gpu_and_captions_like_cpu(small_artifact):
    images = [np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8) for i in range(2)]
    pipe = runtime.load(small_artifact, backend="cuda")
    decoder = pipe.make_decoder(pipe.preprocess(images), capacity=9)
    ids = np.full((2, 1), pipe.manifest.runtime["decoder_start_token_id"], dtype=np.int64)
    decoder.step(ids, np.ones_like(ids))
    assert {value.device_name().lower() for value in decoder.cache.values.values()} == {"cuda"}
    for beams in (1, 4):
        options = {"num_beams": beams, "max_new_tokens": 8}
        assert pipe(images, **options) == runtime.load(small_artifact)(images, **options)
