"""Merge: PEFT is the oracle. First the adapter must change the output, then merged must equal unmerged.

Tolerances (fp32): merged into the original weights vs PEFT's unmerged forward on those weights, 1e-5;
merged into dequant(NF4(W)) vs the 4-bit base + adapter as trained, 1e-4.
"""

import numpy as np
import pytest
import torch

from lora_export.adapters import load_adapter
from lora_export.base import load_fp32
from lora_export.merge import merge
from lora_export.nf4math import round_trip
from lora_export.reference import load_adapted

IDS = torch.tensor([[0, 11, 52, 301, 7, 99, 1500, 42, 8, 640]])


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits.float().numpy()


@pytest.fixture(scope="module")
def adapter(tiny_base, tiny_adapter):
    return load_adapter(tiny_adapter, tiny_base)


def test_adapter_changes_the_output(tiny_base, adapter):
    base = _logits(load_fp32(tiny_base))
    adapted = _logits(load_adapted(tiny_base, adapter))
    assert np.abs(adapted - base).max() > 1e-2


def test_merge_into_original_equals_peft_unmerged(tiny_base, adapter, tmp_path):
    from peft import PeftModel

    merged = merge(tiny_base, adapter, tmp_path / "m", "original")
    assert len(merged.changed) == len(adapter.targeted) > 0
    unmerged = PeftModel.from_pretrained(load_fp32(tiny_base), str(adapter.path)).eval()
    diff = np.abs(_logits(load_fp32(merged.checkpoint)) - _logits(unmerged)).max()
    assert diff <= 1e-5, diff


def test_nf4_merge_base_reproduces_the_trained_model(tiny_base, adapter, tmp_path):
    trained = _logits(load_adapted(tiny_base, adapter))  # 4-bit base + adapter, as the trainer ran it
    nf4 = _logits(load_fp32(merge(tiny_base, adapter, tmp_path / "nf4", "nf4").checkpoint))
    original = _logits(load_fp32(merge(tiny_base, adapter, tmp_path / "orig", "original").checkpoint))
    nf4_diff, original_diff = np.abs(nf4 - trained).max(), np.abs(original - trained).max()
    print(f"max |logit diff| vs trained model: nf4 base {nf4_diff:.2e}, original base {original_diff:.2e}")
    assert nf4_diff <= 1e-4
    assert original_diff > 10 * nf4_diff  # the quantization error the original base adds back


def test_merged_config_has_no_quantization_config(tiny_base, adapter, tmp_path):
    import json

    out = merge(tiny_base, adapter, tmp_path / "m", "nf4").checkpoint
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert list(out.glob("*.safetensors")) and not list(out.glob("*.bin"))


def test_nf4_round_trip_is_bit_exact_to_what_bitsandbytes_trains_on(tiny_base):
    import bitsandbytes.functional as bnbf

    from lora_export.base import Nf4Settings, load_nf4

    model = load_fp32(tiny_base)
    name = "model.layers.1.mlp.down_proj"
    w0 = dict(model.named_modules())[name].weight.detach().clone()
    ours = round_trip(w0, Nf4Settings())
    q = dict(load_nf4(tiny_base, Nf4Settings()).named_modules())[name].weight
    theirs = bnbf.dequantize_4bit(q.data, q.quant_state)
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, w0)  # and it is lossy: this is the error merging into W would add back
