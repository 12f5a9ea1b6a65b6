"""QLoRA training on a 4-bit NF4 base: the loss goes down, the adapter is plain PEFT, the manifest is complete."""

import json

import pytest
import torch

from lora_export.errors import BadInput
from lora_export.train import MANIFEST, TrainConfig, train

from .conftest import EMBEDDED


def test_adapter_is_peft_and_manifest_is_complete(tiny_adapter, tiny_base):
    assert (tiny_adapter / "adapter_config.json").is_file()
    assert (tiny_adapter / "adapter_model.safetensors").is_file()
    assert not list(tiny_adapter.glob("*.bin"))
    m = json.loads((tiny_adapter / MANIFEST).read_text())
    assert m["kind"] == "qlora"
    assert m["quantization"]["quant_type"] == "nf4" and m["quantization"]["double_quant"] is True
    assert len(m["quantization"]["quantized_modules"]) == 14  # 7 linear layers x 2 blocks; lm_head stays
    assert m["base"]["weights_sha256"]["model.safetensors"]
    assert m["data"]["examples"] > 0 and len(m["data"]["sha256"]) == 64
    assert m["training"]["final_loss"] < m["training"]["first_loss"]


def test_trained_adapter_loads_in_plain_peft_on_the_4bit_base(tiny_adapter, tiny_base):
    from peft import PeftModel

    from lora_export.base import Nf4Settings, load_nf4

    model = PeftModel.from_pretrained(load_nf4(tiny_base, Nf4Settings()), str(tiny_adapter))
    b = [m for n, m in model.named_modules() if n.endswith("q_proj.lora_B.default")][0]
    assert b.weight.abs().max() > 0  # trained, not the zero initialisation


def test_bad_inputs_write_nothing(tiny_base, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(BadInput) as e:
        train(TrainConfig(base=tiny_base, data=EMBEDDED / "demo" / "train.jsonl", out=out, rank=0, steps=0))
    assert len(e.value.problems) == 2
    with pytest.raises(BadInput, match="match no linear layer"):
        train(TrainConfig(base=tiny_base, data=EMBEDDED / "demo" / "train.jsonl", out=out,
                          target_modules="q_proj,not_a_layer", steps=1))
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_training_is_deterministic_under_a_seed(tiny_base, tmp_path):
    from safetensors.torch import load_file

    outs = []
    for i in range(2):
        out = tmp_path / f"a{i}"
        train(TrainConfig(base=tiny_base, data=EMBEDDED / "demo" / "train.jsonl", out=out, steps=5, seed=3))
        outs.append(load_file(str(out / "adapter_model.safetensors")))
    assert outs[0].keys() == outs[1].keys()
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
