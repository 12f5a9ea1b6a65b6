"""Batched generation: a padded batch gives each row exactly what it gets alone, in PyTorch and in ONNX Runtime.

Tolerance: 1e-4 on logits (fp32; batching changes summation order in PyTorch's matmuls).
"""

import numpy as np
import pytest

from lora_export.base import load_fp32
from lora_export.errors import BadInput
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


@pytest.mark.parametrize("available, target, run_with, missing", [
    (["CPUExecutionProvider"], ["CPUExecutionProvider"], ("CPUExecutionProvider",), ()),
    (["CPUExecutionProvider"], ["CUDAExecutionProvider"], ("CPUExecutionProvider",), ("CUDAExecutionProvider",)),
    (["CUDAExecutionProvider", "CPUExecutionProvider"], ["TensorrtExecutionProvider", "CUDAExecutionProvider"],
     ("CUDAExecutionProvider",), ("TensorrtExecutionProvider",)),
    (["CPUExecutionProvider"], ["FooExecutionProvider"], ("FooExecutionProvider",), ("FooExecutionProvider",)),
])
def test_parity_providers_stand_the_cpu_in_for_a_missing_gpu_only(available, target, run_with, missing, monkeypatch):
    """A missing CUDA/TensorRT provider: parity runs on what this machine has and names what it lacks; any
    other missing provider is left for check_providers to refuse."""
    import onnxruntime

    from lora_export.runtime import check_providers, parity_providers

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: available)
    assert parity_providers(target) == (run_with, missing)
    if "FooExecutionProvider" in target:
        with pytest.raises(BadInput, match="FooExecutionProvider not available"):
            check_providers(run_with, "model.onnx")


@pytest.mark.parametrize("value, threads", [("1", 1), ("2", 2), ("", 0), ("many", 0), ("0", 0)])
def test_omp_num_threads_caps_the_onnx_runtime_pool(value, threads, fp32_export, monkeypatch):
    """OMP_NUM_THREADS (PyTorch obeys it) sizes ONNX Runtime's intra-op pool too; unset or not a positive count:
    ONNX Runtime's own default (0, a thread per physical core)."""
    monkeypatch.setenv("OMP_NUM_THREADS", value)
    session = OrtCausalLM(fp32_export.out).session
    assert session.get_session_options().intra_op_num_threads == threads
