"""The reference is defined by numbers: no bitsandbytes kernel runs in it, on any machine.

bitsandbytes picks kernels by hardware (bf16 through gemv_4bit on CPUs with AVX512-BF16 at inference, a
batch-1 kernel on CUDA). The spy below records every bitsandbytes Python function and every
``torch.ops.bitsandbytes`` op, so these tests fail if any such path runs while the reference computes,
whichever path this CPU would have taken.
"""

import os
import sys
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lora_export.adapters import load_adapter
from lora_export.base import load_nf4
from lora_export.quantized_base import quantization_of
from lora_export.reference import load_adapted, load_base_as_trained
from lora_export.runtime import TorchCausalLM, greedy_tokens, teacher_forced


@contextmanager
def bitsandbytes_spy():
    import bitsandbytes

    root = os.path.dirname(bitsandbytes.__file__)
    calls: list[str] = []

    def profile(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.startswith(root):
            calls.append(frame.f_code.co_name)

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "bitsandbytes":
                calls.append(str(func))
            return func(*args, **(kwargs or {}))

    sys.setprofile(profile)
    try:
        with Ops():
            yield calls
    finally:
        sys.setprofile(None)


PROMPTS = [[1, 5, 9, 200, 31], [1, 7, 7]]


def test_the_spy_sees_bitsandbytes_compute(tiny_base, tiny_adapter):
    """Without this, the next test could pass with a spy that sees nothing."""
    model = TorchCausalLM(load_nf4(tiny_base, quantization_of(load_adapter(tiny_adapter, tiny_base))[1]))
    with bitsandbytes_spy() as calls:
        greedy_tokens(model, PROMPTS, 3)
    assert any("gemm_4bit" in c or "gemv_4bit" in c for c in calls), calls[:10]


def test_no_bitsandbytes_kernel_runs_in_the_reference(tiny_base, tiny_adapter):
    adapter = load_adapter(tiny_adapter, tiny_base)
    assert adapter.trained_on_4bit
    model = TorchCausalLM(load_adapted(tiny_base, adapter))
    with bitsandbytes_spy() as calls:
        tokens = greedy_tokens(model, PROMPTS, 4)
        rows = dict(teacher_forced(model, [p + t[:-1] for p, t in zip(PROMPTS, tokens)], budget_rows=64))
    assert calls == []
    assert rows[0].dtype == np.float32 and rows[0].shape[0] == len(PROMPTS[0]) + 3
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.model.parameters())


def test_dequantized_weights_are_bit_for_bit_what_bitsandbytes_fp32_path_multiplies_with(tiny_base, tiny_adapter):
    """Each 4-bit layer of the model the trainer trained (loaded as the trainer loads it), run on bitsandbytes'
    fp32 path with the identity as input, returns its weight transposed, exactly: those are the numbers
    training computed with. The reference's fp32 weight must equal them bit for bit."""
    import bitsandbytes as bnb

    adapter = load_adapter(tiny_adapter, tiny_base)
    modules, nf4 = quantization_of(adapter)
    trained = load_nf4(tiny_base, nf4)
    reference = dict(load_base_as_trained(tiny_base, adapter).named_modules())
    checked = 0
    for name, layer in trained.named_modules():
        if isinstance(layer, bnb.nn.Linear4bit):
            layer.train()  # the training path: dequantize, then linear in fp32
            with torch.no_grad():
                seen = layer(torch.eye(layer.in_features)).t()
            assert torch.equal(seen, reference[name].weight), name
            checked += 1
    assert checked == len(modules) > 0


def test_the_nf4_base_is_pinned_to_the_fp32_path_on_every_cpu(tiny_base, tiny_adapter):
    """On AVX512-BF16 CPUs bitsandbytes would repack the weights and compute in bf16 at inference; the loader
    switches that off for every 4-bit layer, so training's eval loss and anything else see the trained model."""
    import bitsandbytes as bnb

    model = load_nf4(tiny_base, quantization_of(load_adapter(tiny_adapter, tiny_base))[1])
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.support_avx512bf16_for_cpu is False for m in layers)
    with bitsandbytes_spy() as calls:
        greedy_tokens(TorchCausalLM(model), PROMPTS, 2)
    assert not [c for c in calls if "gemv_4bit" in c or "packed_for_cpu" in c]


@pytest.mark.parametrize("avx512bf16", [True, False])
def test_the_reference_does_not_depend_on_the_cpu_feature(tiny_base, tiny_adapter, monkeypatch, avx512bf16):
    """Whatever bitsandbytes believes about the CPU, the reference's logits are the same."""
    import bitsandbytes.nn.modules as modules

    monkeypatch.setattr(modules, "has_avx512bf16", lambda: avx512bf16)
    adapter = load_adapter(tiny_adapter, tiny_base)
    rows = dict(teacher_forced(TorchCausalLM(load_adapted(tiny_base, adapter)), PROMPTS, budget_rows=64))
    monkeypatch.undo()
    again = dict(teacher_forced(TorchCausalLM(load_adapted(tiny_base, adapter)), PROMPTS, budget_rows=64))
    assert all(np.array_equal(rows[i], again[i]) for i in rows)


def test_the_as_trained_base_the_merge_writes_is_the_in_memory_one_bit_for_bit(tiny_base, tiny_adapter, tmp_path):
    """export loads the reference's base from the file the merge wrote in the same pass; same numbers."""
    from lora_export.base import load_fp32
    from lora_export.merge import merge

    adapter = load_adapter(tiny_adapter, tiny_base)
    result = merge(tiny_base, adapter, tmp_path / "merged", "nf4", as_trained_dir=tmp_path / "as-trained")
    on_disk = dict(load_fp32(result.as_trained).named_parameters())
    in_memory = dict(load_base_as_trained(tiny_base, adapter).named_parameters())
    assert on_disk.keys() == in_memory.keys()
    assert all(torch.equal(on_disk[k], in_memory[k]) for k in in_memory)
    rounded = set(quantization_of(adapter)[0])
    original = dict(load_fp32(tiny_base).named_parameters())
    assert all(not torch.equal(on_disk[f"{m}.weight"], original[f"{m}.weight"]) for m in rounded)
