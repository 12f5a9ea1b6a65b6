"""Batched generation: a padded batch gives each row exactly what it gets alone, in PyTorch and in ONNX Runtime.

Tolerance: 1e-4 on logits (fp32; batching changes summation order in PyTorch's matmuls).
"""

import numpy as np
import pytest

from lora_export.base import load_fp32
from lora_export.runtime import OrtCausalLM, TorchCausalLM, generate, greedy

PROMPTS = [[0, 11, 52, 301, 7, 99, 1500, 42], [0, 77, 5, 6], [0, 9]]


@pytest.fixture(scope="module", params=["torch", "onnx"])
def model(request, tiny_base, fp32_export):
    return TorchCausalLM(load_fp32(tiny_base)) if request.param == "torch" else OrtCausalLM(fp32_export.out)


def test_padded_batch_equals_each_row_alone(model):
    batch = generate(model, PROMPTS, 6)
    for prompt, row in zip(PROMPTS, batch):
        alone = greedy(model, prompt, 6)
        assert row.tokens == alone.tokens
        assert row.logits.shape == alone.logits.shape == (len(prompt) + 5, 2048)
        assert np.abs(row.logits - alone.logits).max() <= 1e-4


def test_forced_tokens_are_fed(model):
    forced = [[5, 6, 7], [8, 9, 10], [11, 12, 13]]
    out = generate(model, PROMPTS, 3, forced=forced)
    assert [g.tokens for g in out] == forced


def test_a_graph_without_the_kv_cache_contract_is_refused(fp32_export, tmp_path):
    """An ONNX model whose I/O is not the decoder contract gets a clear error, not a KeyError."""
    import onnx
    from onnx import TensorProto, helper

    from lora_export.errors import BadInput

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), str(tmp_path / "model.onnx"))
    with pytest.raises(BadInput, match="the graph lacks .*past_key_values.0.key"):
        OrtCausalLM(tmp_path)


def test_io_binding_gives_the_same_logits(fp32_export):
    """The KV cache kept in ONNX Runtime's buffers between steps: bit-identical to copying it through numpy."""
    plain = generate(OrtCausalLM(fp32_export.out), PROMPTS, 8)
    bound_model = OrtCausalLM(fp32_export.out, io_binding=True)
    bound = generate(bound_model, PROMPTS, 8)
    for a, b in zip(plain, bound):
        assert a.tokens == b.tokens and np.array_equal(a.logits, b.logits)
    _, past = bound_model.step(np.array([[1, 2]]), np.ones((1, 2)), None)
    assert type(past[0]).__name__ == "OrtValue"  # the cache did not come back through numpy
