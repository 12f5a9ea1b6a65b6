"""Peak memory and time of the streaming merge on a ~1.1B-parameter Llama, against PEFT's in-memory merge.

    python benchmarks/merge_streaming.py          # writes benchmarks/results/merge_streaming.{json,md}

The base is built from a config (TinyLlama-1.1B's shape: hidden 2048, 22 layers, 32 heads / 4 KV heads,
intermediate 5632, vocab 32000), random normal weights (seeded) written tensor by tensor as bf16
safetensors in 1 GB shards, as checkpoints on the hub are. The adapter is a random rank-16 LoRA on every
linear layer. Each merge runs in its own process and reports its own peak RSS (VmHWM):

- ours: ``lora_export.merge.merge`` (shard by shard), goal: peak RSS < 1.25 x largest shard + 1 GB;
- PEFT: load the base in fp32, ``merge_and_unload()``, ``save_pretrained()`` (what users write today).

Both outputs are then compared tensor by tensor (they must be bit-identical).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import describe  # beside this script

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
             num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)
RANK = 16
SHARD = 1024**3


def build(base: Path, adapter: Path) -> int:
    """Write the base (bf16 shards) and the adapter without ever holding the whole model."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SHAPE)
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(cfg)
    base.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    shards, buffer, size, params = [], {}, 0, 0
    for name, p in skeleton.named_parameters():
        t = torch.randn(p.shape, generator=gen) * 0.02 if p.dim() == 2 else torch.ones(p.shape)
        buffer[name] = t.to(torch.bfloat16)
        size += t.numel() * 2
        params += t.numel()
        if size >= SHARD:
            shards.append(buffer)
            buffer, size = {}, 0
    if buffer:
        shards.append(buffer)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(base / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg.save_pretrained(str(base))
    AutoTokenizer.from_pretrained(str(ROOT / "lora_export" / "embedded" / "base")).save_pretrained(str(base))

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora = {}
    modules = dict(skeleton.named_modules())
    for name, m in modules.items():
        if name.rpartition(".")[2] in targets:
            lora[f"base_model.model.{name}.lora_A.weight"] = torch.randn(RANK, m.in_features, generator=gen) * 0.01
            lora[f"base_model.model.{name}.lora_B.weight"] = torch.randn(m.out_features, RANK, generator=gen) * 0.01
    adapter.mkdir(parents=True)
    save_file(lora, str(adapter / "adapter_model.safetensors"))
    LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=targets, task_type="CAUSAL_LM").save_pretrained(str(adapter))
    return params


def child(kind: str, base: str, adapter: str, out: str) -> None:
    t0 = time.perf_counter()
    if kind == "ours":
        from lora_export.adapters import load_adapter
        from lora_export.merge import merge

        a = load_adapter(adapter, Path(base))
        checked = time.perf_counter() - t0
        merge(Path(base), a, Path(out), "original")
    else:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        checked = 0.0
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        merged.save_pretrained(out)
    from lora_export.latency import own_peak_rss_mb

    print(json.dumps({"seconds": time.perf_counter() - t0, "adapter_check_seconds": checked,
                      "peak_rss_gb": own_peak_rss_mb() * 1024**2 / 1e9}))


def run(kind: str, base: Path, adapter: Path, out: Path) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", kind, str(base), str(adapter), str(out)],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def identical(a: Path, b: Path) -> tuple[int, int]:
    import torch
    from safetensors import safe_open

    def keys(d):
        out = {}
        for p in sorted(d.glob("*.safetensors")):
            with safe_open(str(p), framework="pt") as f:
                out.update({k: p for k in f.keys()})
        return out

    ka, kb = keys(a), keys(b)
    same = 0
    for k in ka:
        with safe_open(str(ka[k]), framework="pt") as fa, safe_open(str(kb[k]), framework="pt") as fb:
            same += torch.equal(fa.get_tensor(k), fb.get_tensor(k))
    return same, len(ka)


def main() -> None:
    with tempfile.TemporaryDirectory(dir=ROOT / "benchmarks") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        params = build(tmp / "base", tmp / "adapter")
        largest = max(p.stat().st_size for p in (tmp / "base").glob("*.safetensors"))
        print(f"built {params / 1e9:.2f}B params in {time.perf_counter() - t0:.0f} s; largest shard "
              f"{largest / 1e9:.2f} GB", flush=True)
        ours = run("ours", tmp / "base", tmp / "adapter", tmp / "ours")
        print("ours", ours, flush=True)
        peft = run("peft", tmp / "base", tmp / "adapter", tmp / "peft")
        print("peft", peft, flush=True)
        same, total = identical(tmp / "ours", tmp / "peft")
        shutil.rmtree(tmp / "peft")
    goal = 1.25 * largest / 1e9 + 1.0
    result = {"params": params, "largest_shard_gb": largest / 1e9, "base_dtype": "bfloat16", "rank": RANK,
              "ours": ours, "peft_in_memory": peft, "goal_peak_rss_gb": goal, "meets_goal": ours["peak_rss_gb"] < goal,
              "identical_tensors": same, "tensors": total, "machine": describe()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "merge_streaming.json").write_text(json.dumps(result, indent=2) + "\n")
    md = ("| merge of a 1.1B Llama (bf16 shards of 1 GB) + rank-16 LoRA | peak RSS | time |\n|---|---:|---:|\n"
          f"| lora-export streaming merge | {ours['peak_rss_gb']:.2f} GB | {ours['seconds']:.0f} s |\n"
          f"| PEFT in memory (from_pretrained fp32, merge_and_unload, save_pretrained) | "
          f"{peft['peak_rss_gb']:.2f} GB | {peft['seconds']:.0f} s |\n\n"
          f"Goal: < 1.25 x largest shard + 1 GB = {goal:.2f} GB ({'met' if result['meets_goal'] else 'MISSED'}). "
          f"Adapter check: {ours['adapter_check_seconds']:.1f} s. Bit-identical tensors: {same}/{total}. "
          f"Machine: {result['machine']}.\n")
    (RESULTS / "merge_streaming.md").write_text(md)
    print(md)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(*sys.argv[2:6])
    else:
        main()
