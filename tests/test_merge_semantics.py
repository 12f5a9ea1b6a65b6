"""PEFT is the oracle for adapter semantics: one row per kind of adapter users bring.

Each row builds a tiny base from a config (seeded), makes an adapter with PEFT (random A and B, so that it
is not a no-op), saves it, and checks, in this order:
1. the adapter changes the output (max |logit diff| vs the base > 1e-3), so that 2. cannot pass by accident;
2. our streaming merge's logits equal PEFT's unmerged forward within 1e-5 (fp32);
3. where PEFT's own merge_and_unload is right, our tensors are bit-identical to it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lora_export.adapters import load_adapter
from lora_export.base import load_fp32
from lora_export.merge import merge
from lora_export.reference import load_adapted

from .conftest import EMBEDDED, make_base

IDS = torch.tensor([[0, 11, 52, 301, 7, 99, 1500, 42, 8, 640], [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]])
LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

CASES = {  # name: (base kind, LoraConfig arguments)
    "plain": ("llama", dict(r=8, lora_alpha=16, target_modules=LLAMA_LINEAR)),
    "rslora": ("llama", dict(r=16, lora_alpha=8, use_rslora=True, target_modules=LLAMA_LINEAR)),
    "dora": ("llama", dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"])),
    "rank_pattern": ("llama", dict(r=4, lora_alpha=8, target_modules=LLAMA_LINEAR,
                                   rank_pattern={"q_proj": 8, "layers.1.mlp.down_proj": 2})),
    "alpha_pattern": ("llama", dict(r=4, lora_alpha=8, target_modules=LLAMA_LINEAR, alpha_pattern={"v_proj": 64})),
    "modules_to_save": ("llama-untied", dict(r=4, lora_alpha=8, target_modules=["q_proj"],
                                             modules_to_save=["lm_head", "embed_tokens"])),
    "tied-lora-embedding": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"])),
    "tied-saved-lm_head": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"])),
    "gpt2-conv1d": ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)),
    # as other tools write them (TRL/axolotl/Unsloth configs)
    "all-linear": ("llama", dict(r=4, lora_alpha=8, target_modules="all-linear")),
    "target-regex": ("llama", dict(r=4, lora_alpha=8, target_modules=r".*\.(q|v|up)_proj")),
    "layers_to_transform": ("llama", dict(r=4, lora_alpha=8, target_modules=LLAMA_LINEAR, layers_to_transform=[1],
                                          layers_pattern="layers")),
    "exclude_modules": ("llama", dict(r=4, lora_alpha=8, target_modules="all-linear",
                                      exclude_modules=["k_proj", "down_proj"])),
    "regex-rank-alpha-patterns": ("llama", dict(r=4, lora_alpha=8, target_modules=LLAMA_LINEAR,
                                                rank_pattern={r"layers\.0\.self_attn\.(q|k)_proj": 8},
                                                alpha_pattern={r"layers\.[01]\.mlp\.up_proj": 32})),
    "hub-id-base-name": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                       base_model_name_or_path="HuggingFaceTB/SmolLM-135M")),
    # save_pretrained(save_embedding_layers=True) with the embeddings changed in training: the saved copies win
    "save_embedding_layers": ("llama-untied", dict(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                   save_embedding_layers=True)),
}
# Options no merge reproduces here: refused with a message that names them (adapter_config.json, exit 2).
REFUSED = {
    "lora_bias": dict(r=4, lora_alpha=8, target_modules=["q_proj"], lora_bias=True),
    "trainable_token_indices": dict(r=4, lora_alpha=8, target_modules=["q_proj"], trainable_token_indices=[5, 6, 7]),
}
NOT_MERGEABLE_BY_PEFT = {"save_embedding_layers"}  # merge_and_unload keeps the base's embeddings
TIED = {"tied-lora-embedding", "tied-saved-lm_head"}  # the merge must untie: one side changed, the other not
# PEFT's own merge_and_unload is wrong for LoRA on a tied embedding: it adds the delta into the shared
# matrix, so lm_head changes too (measured: logits 155 away from PEFT's own unmerged forward).
PEFT_MERGE_WRONG = {"tied-lora-embedding"}


def _base(kind: str, path):
    if kind == "gpt2":
        from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

        tok = AutoTokenizer.from_pretrained(str(EMBEDDED / "base"))
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
        model.save_pretrained(str(path), max_shard_size="200KB")
        tok.save_pretrained(str(path))
        return path
    return make_base(path, tie_word_embeddings=kind != "llama-untied")


def _make_adapter(base, path, seed=1, **lora):
    from peft import LoraConfig, get_peft_model

    save = {"save_embedding_layers": lora.pop("save_embedding_layers")} if "save_embedding_layers" in lora else {}
    named = lora.pop("base_model_name_or_path", None)  # PEFT writes the local path; other tools write a hub id
    torch.manual_seed(seed)
    model = get_peft_model(load_fp32(base), LoraConfig(init_lora_weights=False, **lora))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".modules_to_save." in name or "trainable_tokens" in name:  # a trained copy differs from the original
                p.add_(torch.randn_like(p) * 0.05)
            elif "lora_B" in name or "lora_embedding_B" in name:
                p.mul_(0.25)  # a fine-tuning-sized change: well above fp32 rounding, well below the logits
            elif save and name.endswith(("embed_tokens.weight", "lm_head.weight")):
                p.add_(torch.randn_like(p) * 0.05)  # embeddings trained beside the LoRA (e.g. new tokens)
    model.save_pretrained(str(path), **save)
    if named:
        config = json.loads((path / "adapter_config.json").read_text())
        (path / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": named}))
    return path


def _logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=IDS).logits.float().numpy()


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return {kind: _base(kind, root / kind) for kind in ("llama", "llama-untied", "gpt2")}


@pytest.mark.parametrize("case", sorted(CASES))
def test_merge_equals_peft_unmerged(case, bases, tmp_path):
    from peft import PeftModel

    kind, lora = CASES[case]
    base = bases[kind]
    adapter_dir = _make_adapter(base, tmp_path / "adapter", **lora)
    unmerged = PeftModel.from_pretrained(load_fp32(base), str(adapter_dir)).eval()
    expected = _logits(unmerged)
    assert np.abs(expected - _logits(load_fp32(base))).max() > 1e-3  # 1. the adapter does something

    result = merge(base, load_adapter(adapter_dir, base), tmp_path / "merged", "original")
    ours = load_fp32(result.checkpoint)
    diff = np.abs(_logits(ours) - expected).max()
    print(f"{case}: max |logit diff| merged vs PEFT unmerged {diff:.2e}, untied={result.untied}, "
          f"shards={result.shards}")
    assert diff <= 1e-5  # 2.

    config = json.loads((result.checkpoint / "config.json").read_text())
    assert "quantization_config" not in config
    assert result.untied == (case in TIED)
    if case in TIED:
        assert config["tie_word_embeddings"] is False
    if case in NOT_MERGEABLE_BY_PEFT:
        return
    if case in PEFT_MERGE_WRONG:
        peft_merged = PeftModel.from_pretrained(load_fp32(base), str(adapter_dir)).merge_and_unload()
        peft_merged.save_pretrained(str(tmp_path / "peft"))
        peft_diff = np.abs(_logits(load_fp32(tmp_path / "peft")) - expected).max()
        print(f"{case}: PEFT merge_and_unload + save_pretrained lands {peft_diff:.2e} away")
        assert peft_diff > 100 * max(diff, 1e-7)
    else:
        peft_merged = PeftModel.from_pretrained(load_fp32(base), str(adapter_dir)).merge_and_unload()
        theirs = peft_merged.state_dict()
        mine = ours.state_dict()
        assert set(mine) == set(theirs)
        same = [k for k in theirs if torch.equal(mine[k], theirs[k])]
        assert len(same) == len(theirs), sorted(set(theirs) - set(same))[:3]  # 3. bit for bit


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_layerwise_reference_equals_peft_unmerged(case, bases, tmp_path):
    """Parity's reference read a layer at a time from disk (lora_export/layerwise.py) is PEFT's unmerged forward bit for
    bit for every kind of adapter (DoRA, modules_to_save, tied embeddings, Conv1D...): tolerance none."""
    from peft import PeftModel

    from lora_export import layerwise

    kind, lora = CASES[case]
    base = bases[kind]
    adapter_dir = _make_adapter(base, tmp_path / "adapter", **lora)
    expected = _logits(PeftModel.from_pretrained(load_fp32(base), str(adapter_dir)).eval())
    streamed = _logits(layerwise.load(base, [load_adapter(adapter_dir, base)]))
    assert np.array_equal(streamed, expected), float(np.abs(streamed - expected).max())


@pytest.mark.parametrize("option", sorted(REFUSED))
def test_options_no_merge_reproduces_are_refused_by_name(option, bases, tmp_path):
    from lora_export.errors import BadInput

    adapter_dir = _make_adapter(bases["llama"], tmp_path / "adapter", **REFUSED[option])
    with pytest.raises(BadInput) as e:
        load_adapter(adapter_dir, bases["llama"])
    assert option in str(e.value) and "adapter_config.json" in str(e.value) and "Fix:" in str(e.value)


def test_a_hub_id_as_base_name_is_said_not_refused(bases, tmp_path):
    from lora_export.adapters import base_name_note

    adapter_dir = _make_adapter(bases["llama"], tmp_path / "adapter", **CASES["hub-id-base-name"][1])
    note = base_name_note(load_adapter(adapter_dir, bases["llama"]), bases["llama"])
    assert "HuggingFaceTB/SmolLM-135M" in note and "checked against --base" in note


def test_two_adapters_combined_linearly(bases, tmp_path):
    base = bases["llama"]
    a = load_adapter(_make_adapter(base, tmp_path / "a", seed=1, r=8, lora_alpha=16, target_modules=LLAMA_LINEAR), base)
    b = load_adapter(_make_adapter(base, tmp_path / "b", seed=2, r=4, lora_alpha=8, use_rslora=True,
                                   target_modules=["q_proj", "v_proj"]), base)
    weights = (0.7, -0.4)
    both = merge(base, [a, b], tmp_path / "ab", "original", weights=weights)
    # the oracle: PEFT's unmerged forward with both adapters active, each output scaled by its weight
    expected = _logits(load_adapted(base, [a, b], weights))
    assert np.abs(expected - _logits(load_adapted(base, a))).max() > 1e-3
    diff = np.abs(_logits(load_fp32(both.checkpoint)) - expected).max()
    assert diff <= 1e-5, diff
    # and the weights are W + 0.7 dW_a - 0.4 dW_b, each dW from a single-adapter merge
    w0 = load_fp32(base).state_dict()
    wa = load_fp32(merge(base, a, tmp_path / "a-only", "original").checkpoint).state_dict()
    wb = load_fp32(merge(base, b, tmp_path / "b-only", "original").checkpoint).state_dict()
    wab = load_fp32(both.checkpoint).state_dict()
    worst = max((wab[k] - (w0[k] + 0.7 * (wa[k] - w0[k]) - 0.4 * (wb[k] - w0[k]))).abs().max().item() for k in w0)
    assert worst <= 1e-6, worst


def test_streaming_is_bit_identical_to_the_in_memory_merge_across_shards(bases, tmp_path):
    """Many small input shards, mirrored by as many output shards: the same bytes as PEFT's merge_and_unload."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(str(bases["llama-untied"])).save_pretrained(str(sharded), max_shard_size="150KB")
    for f in bases["llama-untied"].glob("tokenizer*"):
        (sharded / f.name).write_bytes(f.read_bytes())
    assert len(list(sharded.glob("*.safetensors"))) > 3
    adapter_dir = _make_adapter(sharded, tmp_path / "adapter", r=8, lora_alpha=16, target_modules=LLAMA_LINEAR)
    result = merge(sharded, load_adapter(adapter_dir, sharded), tmp_path / "merged", "original")
    assert result.shards > 3 and (result.checkpoint / "model.safetensors.index.json").is_file()
    theirs = PeftModel.from_pretrained(load_fp32(sharded), str(adapter_dir)).merge_and_unload().state_dict()
    mine = load_fp32(result.checkpoint).state_dict()
    assert set(mine) == set(theirs) and all(torch.equal(mine[k], theirs[k]) for k in theirs)


def test_combining_refuses_dora_and_mismatched_weights(bases, tmp_path):
    from lora_export.errors import BadInput

    base = bases["llama"]
    a = load_adapter(_make_adapter(base, tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj"]), base)
    d = load_adapter(_make_adapter(base, tmp_path / "d", r=4, lora_alpha=8, use_dora=True,
                                   target_modules=["q_proj"]), base)
    with pytest.raises(BadInput, match="DoRA and modules_to_save adapters cannot be combined"):
        merge(base, [a, d], tmp_path / "x", "original")
    with pytest.raises(BadInput, match="1 weights for 2 adapters"):
        merge(base, [a, a], tmp_path / "y", "original", weights=[1.0])
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())
