"""Decode latency and export cost of the merged export against what a user would otherwise run, in one run.

    python benchmarks/decode_vs_peers.py                 # 135M Llama shape -> results/decode_vs_peers.{json,md}
    python benchmarks/decode_vs_peers.py qwen2-0.5b      # 0.5B Qwen2 shape -> results/decode_vs_peers-qwen2-0.5b.*

Models built from configs with seeded random weights: the 135M Llama shape of FACTS.md (hidden 576, 30
layers, 9 heads, 3 KV heads, intermediate 1536, vocab 49152, tied), or Qwen2-0.5B's shape; a rank-8 LoRA
on all linear layers with random (non-zero) B. Variants, on the CPU, batch 1, prompt 32, greedy:
- ONNX Runtime, fp32: our merged export (the fused builder graph); the unadapted base export; the unmerged
  side-path graph the onnxruntime-genai builder emits for an adapter (`--keep-adapter`); the generic
  torch.onnx dynamo export of the merged model (the fallback for architectures the builder lacks);
- ONNX Runtime, int4: our merged export for the shipped ort-cpu-int4 target;
- PyTorch eager, fp32: the merged model; the base with the PEFT adapter unmerged.
Each round times every variant once, in an order that rotates; medians over rounds; ratios against the
ONNX Runtime base export. Export cost: wall time and peak RSS (the largest VmHWM of the process tree,
polled) of the builder alone on the merged checkpoint, of our merge + build, and of merge + dynamo export.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import describe  # beside this script

from lora_export.latency import vm_hwm_mb

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHAPES = {
    "llama-135m": dict(arch="LlamaForCausalLM", hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                       num_key_value_heads=3, intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True,
                       max_position_embeddings=2048),
    "qwen2-0.5b": dict(arch="Qwen2ForCausalLM", hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True,
                       max_position_embeddings=2048),
}
PROMPT_LEN, NEW_TOKENS, ROUNDS = 32, 32, 6


def make_models(tmp: Path, shape: dict):
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    shape = dict(shape)
    arch = getattr(transformers, shape.pop("arch"))
    tok = AutoTokenizer.from_pretrained(str(ROOT / "lora_export" / "embedded" / "base"))
    torch.manual_seed(0)
    model = arch(arch.config_class(**shape, bos_token_id=0, eos_token_id=1, pad_token_id=2))
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
    from lora_export.latency import time_decode

    return time_decode(model, prompt, NEW_TOKENS)


def tree_peak(cmd: list[str]) -> dict:
    """Run ``cmd``; wall seconds and the largest VmHWM (own peak RSS) of it or any descendant, polled."""
    import subprocess

    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    root, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            for p in [root, *root.children(recursive=True)]:
                peak = max(peak, vm_hwm_mb(p.pid) or 0.0)
        except psutil.Error:
            pass
        time.sleep(0.05)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} failed: {proc.stderr.read()[-2000:]}")
    return {"seconds": time.perf_counter() - t0, "peak_rss_mb": peak}


EXPORT_SCRIPT = """
import sys
from pathlib import Path
from lora_export.adapters import load_adapter
from lora_export.export import BACKENDS
from lora_export.merge import merge
from lora_export.targets import load_target
base, adapter, work, out = map(Path, sys.argv[1:5])
target = load_target(sys.argv[5])
merge(base, load_adapter(adapter, base), work, "original")
out.mkdir()
BACKENDS[target.backend].build(work, out, target, out / "build.log")
"""


def export_costs(tmp: Path, base: Path, adapter_dir: Path, merged: Path) -> dict:
    """Builder alone on the merged checkpoint; ours (merge + builder); merge + generic dynamo export."""
    costs = {}
    (tmp / "cost-builder").mkdir()
    costs["onnxruntime-genai builder alone (on the merged checkpoint)"] = tree_peak(
        [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(merged), "-o", str(tmp / "cost-builder"),
         "-p", "fp32", "-e", "cpu", "-c", str(tmp / "cost-cache"), "--extra_options", "hf_remote=false"])
    for label, target in (("lora-export: streaming merge + builder", "ort-cpu-fp32"),
                          ("lora-export: streaming merge + generic dynamo export", "ort-cpu-fp32-generic")):
        costs[label] = tree_peak([sys.executable, "-c", EXPORT_SCRIPT, str(base), str(adapter_dir),
                                  str(tmp / f"cost-merged-{target}"), str(tmp / f"cost-{target}"), target])
    return costs


def main() -> int:
    from peft import PeftModel

    from lora_export.adapters import load_adapter
    from lora_export.base import load_fp32
    from lora_export.export import BACKENDS
    from lora_export.merge import merge
    from lora_export.sidepath import build_unmerged
    from lora_export.runtime import OrtCausalLM, TorchCausalLM
    from lora_export.targets import load_target

    name = sys.argv[1] if len(sys.argv) > 1 else "llama-135m"
    shape = SHAPES[name]
    suffix = "" if name == "llama-135m" else f"-{name}"
    fp32, int4, generic = (load_target(t) for t in ("ort-cpu-fp32", "ort-cpu-int4", "ort-cpu-fp32-generic"))
    with tempfile.TemporaryDirectory(dir=ROOT / "benchmarks") as tmp:
        tmp = Path(tmp)
        t0 = time.time()
        base, adapter_dir = make_models(tmp, shape)
        adapter = load_adapter(adapter_dir, base)
        merged = merge(base, adapter, tmp / "merged", "original").checkpoint
        params = sum(p.numel() for p in load_fp32(base).parameters())
        costs = export_costs(tmp, base, adapter_dir, merged)
        print(f"export costs: {costs}", flush=True)
        for dirname, src, target in (("ort-merged", merged, fp32), ("ort-base", base, fp32),
                                     ("ort-generic", merged, generic), ("ort-int4", merged, int4)):
            (tmp / dirname).mkdir()
            BACKENDS[target.backend].build(src, tmp / dirname, target, tmp / f"{dirname}.log")
        (tmp / "ort-unmerged").mkdir()
        (tmp / "work").mkdir()
        build_unmerged(base, adapter, "original", fp32, tmp / "ort-unmerged", tmp / "work")
        print(f"models and exports ready in {time.time() - t0:.0f} s", flush=True)
        variants = {
            "ONNX Runtime, merged export (ours)": OrtCausalLM(tmp / "ort-merged", io_binding=True),
            "ONNX Runtime, base export": OrtCausalLM(tmp / "ort-base", io_binding=True),
            "ONNX Runtime, unmerged side-path graph (builder --adapter_path)": OrtCausalLM(tmp / "ort-unmerged", io_binding=True),
            "ONNX Runtime, generic dynamo export (merged)": OrtCausalLM(tmp / "ort-generic", io_binding=True),
            "ONNX Runtime, int4 merged export (ort-cpu-int4)": OrtCausalLM(tmp / "ort-int4", io_binding=True),
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
    merged_key, int4_key = "ONNX Runtime, merged export (ours)", "ONNX Runtime, int4 merged export (ort-cpu-int4)"
    int4_speedup = float(np.median(np.array(samples[merged_key]) / np.array(samples[int4_key])))
    weight_mb = params * 4 / 1e6
    result = {"model": name, "shape": shape, "params": params, "prompt": PROMPT_LEN, "new_tokens": NEW_TOKENS,
              "rounds": ROUNDS, "machine": describe() + ", default threads", "variants": rows, "samples_ms": samples,
              "int4_decode_speedup_over_fp32": int4_speedup, "fp32_weight_mb": weight_mb,
              "export_costs": {k: {**v, "rss_over_fp32_weights": v["peak_rss_mb"] / weight_mb} for k, v in costs.items()}}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"decode_vs_peers{suffix}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"{name} ({params / 1e6:.0f}M params, built from a config), CPU ({result['machine']}), batch 1, "
             f"prompt {PROMPT_LEN}, {NEW_TOKENS} greedy decode steps, {ROUNDS} interleaved rounds, medians.", "",
             "| variant | decode ms/token | tokens/s | decode time vs base export (median of paired ratios) |",
             "|---|---|---|---|"]
    lines += [f"| {n} | {r['decode_ms_median']:.1f} | {r['tokens_per_s']:.1f} | {r['ratio_to_base']:.3f} |"
              for n, r in rows.items()]
    lines += ["", f"int4 decode speed-up over fp32 (median of paired ratios): {int4_speedup:.2f}x", "",
              f"| export (fp32, weights {weight_mb:.0f} MB) | wall s | peak RSS MB | peak RSS / fp32 weight bytes |",
              "|---|---|---|---|"]
    lines += [f"| {k} | {v['seconds']:.0f} | {v['peak_rss_mb']:.0f} | {v['peak_rss_mb'] / weight_mb:.2f} |"
              for k, v in costs.items()]
    (RESULTS / f"decode_vs_peers{suffix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0




if __name__ == "__main__":
    sys.exit(main())
