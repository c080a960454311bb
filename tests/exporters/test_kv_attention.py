"""The decoder attention ops: their PyTorch reference, their onnxruntime kernels with the cache buffer
bound as both past and present, and the runtime's buffer cache (beam reorders, capacity)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from modelkiln.exporters.decoding import buffer_step, causal_mask, merge_heads, split_heads
from modelkiln.exporters.kv_attention import buffer_attention, cross_attention
from modelkiln.exporters.onnx_export import Component, export_component
from modelkiln.manifest import TensorSpec
from modelkiln.runtime.captioning import BufferCache
from modelkiln.runtime.session import IoBoundSession

HEADS, HEAD_DIM, CAPACITY = 2, 8, 7
WIDTH = HEADS * HEAD_DIM
SCALE = HEAD_DIM**-0.5


class SelfAttention(nn.Module):
    """One buffered self-attention and one cross-attention, as a decoder step uses them."""

    def forward(self, query, key, value, attention_mask, past_key, past_value, cross_key, cross_value):
        step = buffer_step(attention_mask, query.shape[1])
        out, key, value = buffer_attention(query, key, value, past_key, past_value, *step, HEADS, SCALE)
        return out + cross_attention(out, cross_key, cross_value, HEADS, SCALE), key, value


def _plain(query, key, value, attention_mask, past_key, past_value, cross_key, cross_value):
    """The same step with a growing past and standard attention: what the ops must equal."""
    keys = torch.cat([past_key, split_heads(key, HEADS)], dim=2)
    values = torch.cat([past_value, split_heads(value, HEADS)], dim=2)
    mask = causal_mask(attention_mask, query.shape[1], past_key.shape[2])
    scores = split_heads(query, HEADS) @ keys.transpose(-1, -2) * SCALE + mask
    out = merge_heads(scores.softmax(-1) @ values)
    cross = merge_heads(
        (split_heads(out, HEADS) @ cross_key.transpose(-1, -2) * SCALE).softmax(-1) @ cross_value
    )
    return out + cross, keys, values


def _inputs(batch: int, new: int, past: int, padded: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(new * 10 + past)
    draw = lambda *shape: torch.randn(*shape, generator=generator)  # noqa: E731
    mask = torch.ones(batch, past + new, dtype=torch.int64)
    mask[1, :padded] = 0  # row 1 is left padded
    return {
        "query": draw(batch, new, WIDTH),
        "key": draw(batch, new, WIDTH),
        "value": draw(batch, new, WIDTH),
        "attention_mask": mask,
        "past_key": draw(batch, HEADS, past, HEAD_DIM),
        "past_value": draw(batch, HEADS, past, HEAD_DIM),
        "cross_key": draw(batch, HEADS, 5, HEAD_DIM),
        "cross_value": draw(batch, HEADS, 5, HEAD_DIM),
    }


def _buffered(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inputs with the past in a CAPACITY buffer whose unfilled rows hold garbage (never read)."""
    out = dict(inputs)
    for name in ("past_key", "past_value"):
        past = inputs[name]
        buffer = torch.full((*past.shape[:2], CAPACITY, HEAD_DIM), 1e4)
        buffer[:, :, : past.shape[2]] = past
        out[name] = buffer
    return out


@pytest.mark.parametrize(("new", "past", "padded"), [(3, 0, 0), (1, 4, 0), (3, 0, 2), (1, 3, 2)])
def test_reference_equals_plain_attention_and_writes_only_the_new_positions(new, past, padded):
    inputs = _inputs(2, new, past, padded)
    expected, keys, values = _plain(**inputs)
    got, present_key, present_value = SelfAttention()(**_buffered(inputs))
    real = inputs["attention_mask"][:, -new:].bool()  # a padding query's output is never read
    torch.testing.assert_close(got[real], expected[real])
    torch.testing.assert_close(present_key[:, :, : past + new], keys)
    torch.testing.assert_close(present_value[:, :, : past + new], values)
    assert bool((present_key[:, :, past + new :] == 1e4).all())  # rows beyond the tokens are untouched


@pytest.fixture(scope="module")
def attention_graph(tmp_path_factory) -> IoBoundSession:
    inputs = _buffered(_inputs(2, 3, 2))
    axes = {"query": {0: "b", 1: "s"}, "key": {0: "b", 1: "s"}, "value": {0: "b", 1: "s"}}
    axes |= {"attention_mask": {0: "b", 1: "t"}, "past_key": {0: "b"}, "past_value": {0: "b"}}
    component = Component("attention", SelfAttention(), inputs, ("out", "present_key", "present_value"), axes)
    folder = tmp_path_factory.mktemp("attention")
    spec = export_component(component, folder, opset=18)
    graph = onnx.load(str(folder / spec.file))
    assert {node.op_type for node in graph.graph.node} >= {"GroupQueryAttention", "MultiHeadAttention"}
    return IoBoundSession(
        ort.InferenceSession(str(folder / spec.file), providers=["CPUExecutionProvider"]), "cpu"
    )


def test_onnxruntime_updates_the_bound_buffer_in_place_step_after_step(attention_graph):
    """Prompt, then two single tokens, the buffer bound as past and present: outputs equal the plain
    attention over the growing past, and the buffer holds exactly its keys and values."""
    batch = 2
    arrays = {name: np.zeros((batch, HEADS, CAPACITY, HEAD_DIM), np.float32) for name in ("key", "value")}
    values = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in arrays.items()}
    past = {
        "past_key": torch.zeros(batch, HEADS, 0, HEAD_DIM),
        "past_value": torch.zeros(batch, HEADS, 0, HEAD_DIM),
    }
    filled = 0
    for new, padded in ((3, 1), (1, 1), (1, 1)):
        inputs = _inputs(batch, new, filled, padded) | past
        expected, keys, values_ = _plain(**inputs)
        feeds = {name: ort.OrtValue.ortvalue_from_numpy(tensor.numpy()) for name, tensor in inputs.items()}
        feeds |= {"past_key": values["key"], "past_value": values["value"]}
        bound = {"present_key": values["key"], "present_value": values["value"]}
        (out, *_) = attention_graph.run_with_ort_values(["out", "present_key", "present_value"], feeds, bound)
        filled += new
        real = inputs["attention_mask"][:, -new:].bool().numpy()  # a padding query's output is never read
        np.testing.assert_allclose(out.numpy()[real], expected.numpy()[real], atol=1e-5)
        np.testing.assert_allclose(arrays["key"][:, :, :filled], keys.numpy(), atol=1e-6)
        np.testing.assert_allclose(arrays["value"][:, :, :filled], values_.numpy(), atol=1e-6)
        assert not arrays["key"][:, :, filled:].any()
        past = {"past_key": keys, "past_value": values_}


def _buffer_cache(batch: int) -> BufferCache:
    spec = TensorSpec(
        name="past_key_values.0.key", dtype="float32", shape=["batch", HEADS, "capacity", HEAD_DIM]
    )
    cache = BufferCache([spec], capacity=CAPACITY, device="cpu")
    cache.reset(batch)
    return cache


def test_beam_reorder_copies_moved_rows_up_to_the_filled_positions():
    cache = _buffer_cache(4)
    array = cache.arrays["past_key_values.0.key"]
    array[:] = np.arange(4, dtype=np.float32)[:, None, None, None]  # every row holds its own index
    cache.update({}, total=3)
    cache.reorder(np.array([0, 0, 3, 1]))
    assert array[:, 0, :3, 0].tolist() == [[0, 0, 0], [0, 0, 0], [3, 3, 3], [1, 1, 1]]
    assert array[:, 0, 3:, 0].tolist() == [[0] * 4, [1] * 4, [2] * 4, [3] * 4]  # beyond the filled: as it was
    assert cache.bound()["present.0.key"] is cache.values["past_key_values.0.key"]  # bound as both


def test_a_step_past_the_capacity_is_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"needs 8 cache positions but the buffers hold 7.*max_new_tokens"):
        _buffer_cache(1).inputs(total=8)
