"""Both graph backends, for every architecture each registers: the fused onnxruntime-genai builder and the
generic torch.onnx.export(dynamo=True).

Per (backend, architecture), on a tiny config with random (seeded) weights: the ONNX model in ONNX Runtime
against the same PyTorch model, batch 2 with unequal prompt lengths, the prompt pass and 16 decode steps
reading the cache: max |logit diff| <= 1e-4 (fp32); and a 32-token greedy continuation identical. Then
onnxruntime-genai itself loads a fused export (genai_config.json beside it) and generates the same tokens.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lora_export.base import load_fp32
from lora_export.errors import BadInput
from lora_export.export import BACKENDS
from lora_export.export.dynamo import build
from lora_export.runtime import OrtCausalLM, TorchCausalLM, generate, greedy
from lora_export.targets import load_target

from .conftest import EMBEDDED, tiered

PROMPTS = [[0, 11, 52, 301, 7, 99, 1500, 42], [5, 6, 7, 8, 9]]


def _config(arch: str, vocab: int, tok):
    import transformers as tf

    small = dict(vocab_size=vocab, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                 pad_token_id=tok.pad_token_id)
    llama_like = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, **small)
    return {
        "GPT2LMHeadModel": lambda: tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, **small),
        "GPTNeoXForCausalLM": lambda: tf.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                       num_attention_heads=4, max_position_embeddings=128,
                                                       rotary_pct=0.5, **small),
        "OPTForCausalLM": lambda: tf.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                               num_attention_heads=4, max_position_embeddings=128,
                                               word_embed_proj_dim=64, **small),
        "LlamaForCausalLM": lambda: tf.LlamaConfig(**llama_like),
        "Qwen2ForCausalLM": lambda: tf.Qwen2Config(**llama_like),
        "MistralForCausalLM": lambda: tf.MistralConfig(sliding_window=None, **llama_like),
        "Qwen3ForCausalLM": lambda: tf.Qwen3Config(head_dim=16, **llama_like),
        "Phi3ForCausalLM": lambda: tf.Phi3Config(original_max_position_embeddings=128, **llama_like),
        "GemmaForCausalLM": lambda: tf.GemmaConfig(head_dim=16, **llama_like),
    }[arch]()


def tiny_model(arch: str, path):
    import transformers as tf
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(EMBEDDED / "base"))
    torch.manual_seed(0)
    model = getattr(tf, arch)(_config(arch, len(tok), tok))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


# default configs of the families each backend was first written for; tests/test_families.py holds every family the
# backends take on configs with their real quirks
DEFAULT_CONFIGS = {
    "genai-builder": ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                      "Phi3ForCausalLM", "GemmaForCausalLM"),
    "torch-dynamo": ("GPT2LMHeadModel", "GPTNeoXForCausalLM", "OPTForCausalLM", "LlamaForCausalLM",
                     "Qwen2ForCausalLM", "MistralForCausalLM"),
}
CASES = [(name, arch) for name in BACKENDS for arch in DEFAULT_CONFIGS[name]]


@pytest.mark.parametrize("backend, arch", tiered(CASES, [f"{b}-{a}" for b, a in CASES], slow={
    f"{b}-{a}" for b, a in CASES if a != "LlamaForCausalLM"}))  # README's tier: each backend on Llama
def test_export_matches_pytorch_with_the_cache(backend, arch, tmp_path):
    base = tiny_model(arch, tmp_path / "base")
    out = tmp_path / "onnx"
    out.mkdir()
    BACKENDS[backend].build(base, out, load_target("ort-cpu-fp32"), out / "build.log")
    ort_model, torch_model = OrtCausalLM(out), TorchCausalLM(load_fp32(base))
    # the fused GroupQueryAttention takes right padding, plain attention the usual left padding
    assert ort_model.padding_side == ("right" if backend == "genai-builder" else "left")
    ref = generate(torch_model, PROMPTS, 17)
    ours = generate(ort_model, PROMPTS, 17, forced=[g.tokens for g in ref])
    diff = max(np.abs(r.logits - o.logits).max() for r, o in zip(ref, ours))
    print(f"{backend} {arch}: max |logit diff| over prompt + 16 cached decode steps, batch 2 padded: {diff:.2e}")
    assert diff <= 1e-4
    assert greedy(ort_model, PROMPTS[0], 32).tokens == greedy(torch_model, PROMPTS[0], 32).tokens


def test_an_architecture_that_is_not_a_causal_lm_is_refused(tmp_path):
    import json

    base = tiny_model("GPT2LMHeadModel", tmp_path / "base")
    cfg = json.loads((base / "config.json").read_text())
    cfg["architectures"] = ["GPT2ForSequenceClassification"]
    (base / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BadInput, match="not a causal LM"):
        build(base, tmp_path, load_target("ort-cpu-fp32"), tmp_path / "log")


@pytest.mark.slow
def test_onnxruntime_genai_loads_an_export_and_generates_the_same_tokens(fp32_export):
    import onnxruntime_genai as og

    prompt, steps = [0, 11, 52, 301, 7, 99, 1500, 42], 24
    model = og.Model(str(fp32_export.out))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + steps, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens([prompt])
    while not generator.is_done():
        generator.generate_next_token()
    theirs = list(generator.get_sequence(0))[len(prompt):]
    ours = greedy(OrtCausalLM(fp32_export.out), prompt, steps).tokens
    assert len(theirs) >= 8  # it generated (it may stop early at an end-of-text token)
    assert theirs == ours[:len(theirs)]
