"""Decode latency of the merged export against what a user would otherwise run, in one interleaved run.

    python benchmarks/decode_vs_peers.py     # writes benchmarks/results/decode_vs_peers.{json,md}

Model: the 135M Llama shape of FACTS.md (hidden 576, 30 layers, 9 heads, 3 KV heads, intermediate 1536,
vocab 49152, tied embeddings), built from a config with seeded random weights, and a rank-8 LoRA on all
linear layers with random (non-zero) B. Variants, all fp32 on the CPU, batch 1, prompt 32, greedy:
- ONNX Runtime: our merged export; the unadapted base export; the unmerged side-path graph as the
  onnxruntime-genai builder emits it for an adapter (`--keep-adapter`);
- PyTorch eager: the merged model; the base with the PEFT adapter unmerged.
Each round times every variant once, in an order that rotates; medians over rounds; ratios against the
ONNX Runtime base export. (The generic dynamo export of issue 5 does not exist yet and is not compared.)
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHAPE = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
             intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048)
PROMPT_LEN, NEW_TOKENS, ROUNDS = 32, 32, 6


def make_models(tmp: Path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(ROOT / "lora_export" / "embedded" / "base"))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE, bos_token_id=0, eos_token_id=1, pad_token_id=2))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
    model.save_pretrained(str(tmp / "base"))
    tok.save_pretrained(str(tmp / "base"))
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    peft_model.save_pretrained(str(tmp / "adapter"))
    return tmp / "base", tmp / "adapter"


def time_variant(model, prompt: list[int]) -> float:
    """Median ms per decode step over NEW_TOKENS greedy steps through the KV cache."""
    from lora_export.bench import time_decode

    return time_decode(model, prompt, NEW_TOKENS)


def main() -> int:
    from peft import PeftModel

    from lora_export.adapters import load_adapter
    from lora_export.base import load_fp32
    from lora_export.export import BACKENDS
    from lora_export.merge import merge
    from lora_export.pipeline import build_unmerged
    from lora_export.runtime import OrtCausalLM, TorchCausalLM
    from lora_export.targets import load_target

    target = load_target("ort-cpu-fp32")
    build = BACKENDS[target.backend].build
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.time()
        base, adapter_dir = make_models(tmp)
        adapter = load_adapter(adapter_dir, base)
        merged = merge(base, adapter, tmp / "merged", "original").checkpoint
        for name, src in (("ort-merged", merged), ("ort-base", base)):
            (tmp / name).mkdir()
            build(src, tmp / name, target, tmp / f"{name}.log")
        (tmp / "ort-unmerged").mkdir()
        (tmp / "work").mkdir()
        build_unmerged(base, adapter, "original", target, tmp / "ort-unmerged", tmp / "work")
        print(f"models and exports ready in {time.time() - t0:.0f} s", flush=True)
        variants = {
            "ONNX Runtime, merged export (ours)": OrtCausalLM(tmp / "ort-merged"),
            "ONNX Runtime, base export": OrtCausalLM(tmp / "ort-base"),
            "ONNX Runtime, unmerged side-path graph (builder --adapter_path)": OrtCausalLM(tmp / "ort-unmerged"),
            "PyTorch eager, merged": TorchCausalLM(load_fp32(merged)),
            "PyTorch eager, PEFT unmerged": TorchCausalLM(PeftModel.from_pretrained(load_fp32(base), str(adapter_dir))),
        }
        prompt = [int(t) for t in np.random.default_rng(0).integers(3, 2048, PROMPT_LEN)]
        names = list(variants)
        for n in names:  # warm-up
            time_variant(variants[n], prompt)
        samples = {n: [] for n in names}
        for r in range(ROUNDS):
            for n in names[r % len(names):] + names[: r % len(names)]:
                samples[n].append(time_variant(variants[n], prompt))
            print(f"round {r + 1}/{ROUNDS}", flush=True)
    base_key = "ONNX Runtime, base export"
    base_ms = np.array(samples[base_key])
    rows = {n: {"decode_ms_median": statistics.median(v), "tokens_per_s": 1000 / statistics.median(v),
                "ratio_to_base": float(np.median(np.array(v) / base_ms))} for n, v in samples.items()}
    result = {"model": SHAPE, "prompt": PROMPT_LEN, "new_tokens": NEW_TOKENS, "rounds": ROUNDS,
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version()}, "variants": rows,
              "samples_ms": samples}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "decode_vs_peers.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"135M Llama shape (FACTS.md), fp32, CPU ({os.cpu_count()} cores, default threads), batch 1, prompt "
             f"{PROMPT_LEN}, {NEW_TOKENS} greedy decode steps, {ROUNDS} interleaved rounds, medians.", "",
             "| variant | decode ms/token | tokens/s | decode time vs base export (median of paired ratios) |",
             "|---|---|---|---|"]
    lines += [f"| {n} | {r['decode_ms_median']:.1f} | {r['tokens_per_s']:.1f} | {r['ratio_to_base']:.3f} |"
              for n, r in rows.items()]
    (RESULTS / "decode_vs_peers.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
