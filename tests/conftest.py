"""Shared fixtures: tiny Llama models built from configs with a fixed seed, trained and exported once per run.

Nothing is downloaded: the tokenizer is the embedded one, the weights are random (seeded), and the
adapter is QLoRA-trained here on the embedded demo data for a few dozen steps.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

EMBEDDED = Path(__file__).resolve().parents[1] / "lora_export" / "embedded"
TINY_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True)


def make_base(path: Path, seed: int = 0, **overrides) -> Path:
    """A tiny Llama with the embedded tokenizer, random weights (seeded), saved as safetensors."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(EMBEDDED / "base"))
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, **{**TINY_SHAPE, **overrides})
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # give the random model a larger weight scale so that logits are not all ~0
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(str(path), safe_serialization=True)
    tok.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    return make_base(tmp_path_factory.mktemp("tiny") / "base")


@pytest.fixture(scope="session")
def tiny_adapter(tiny_base, tmp_path_factory) -> Path:
    from lora_export.train import TrainConfig, train

    out = tmp_path_factory.mktemp("adapter") / "adapter"
    train(TrainConfig(base=tiny_base, data=EMBEDDED / "demo" / "train.jsonl", out=out, steps=40, lr=3e-3,
                      rank=8, alpha=16, batch_size=8))
    return out


@pytest.fixture(scope="session")
def fp32_export(tiny_base, tiny_adapter, tmp_path_factory):
    from lora_export.pipeline import ExportRequest, export

    out = tmp_path_factory.mktemp("export") / "fp32"
    return export(ExportRequest(base=tiny_base, adapter=tiny_adapter, target="ort-cpu-fp32", out=out))


def tiered(cases: list, ids: list[str], slow: set[str]) -> list:
    """The rows of a parametrized table, the ones named in ``slow`` marked so that README's command leaves them
    to `.ci/run` (one row of each kind of case stays in README's tier). A tuple row is its arguments, anything else
    a single argument."""
    unknown = slow - set(ids)
    assert not unknown, f"no such row: {sorted(unknown)}"  # a renamed row must not silently move tiers
    assert len(ids) == len(set(ids)) == len(cases), "one distinct id per row"  # an added row must not be dropped
    return [pytest.param(*(case if isinstance(case, tuple) else (case,)), id=i,
                         marks=[pytest.mark.slow] if i in slow else []) for case, i in zip(cases, ids, strict=True)]


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
