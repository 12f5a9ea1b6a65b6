"""Training step time and peak memory: `lora_export.train` against a plain PEFT + transformers Trainer script.

    python benchmarks/train_vs_peft.py            # writes benchmarks/results/train_vs_peft.{json,md}

Both sides QLoRA-train the same base on the same data with the same settings (NF4 + double quant, rank 8,
all linear layers, batch 8, 30 steps, no activation checkpointing), each in its own process so that peak RSS is its own. Runs are
interleaved (ours, plain, ours, plain, ...) and compared by their medians; the goal is no slower and no
heavier (ratios <= 1.0 within noise). Two bases: the embedded one, and a 25M-parameter Llama-shaped model
built from a config with random weights.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DATA = ROOT / "lora_export" / "embedded" / "demo" / "train.jsonl"
STEPS, ROUNDS = 30, 3


def step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        times: list = []

        def on_step_begin(self, args, state, control, **kw):
            self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self._t)

    return StepTimer()


def child_ours(base: str, out: str, timer) -> None:
    from lora_export.train import TrainConfig, train

    # like for like with child_plain: no activation checkpointing on either side (benchmarks/train_memory.py
    # measures what it costs and saves)
    train(TrainConfig(base=Path(base), data=DATA, out=Path(out), rank=8, alpha=16, steps=STEPS, lr=2e-4,
                      batch_size=8, gradient_checkpointing=False), log=lambda m: None, callbacks=[timer])


def child_plain(base: str, out: str, timer, data: Path = DATA, steps: int = STEPS, batch_size: int = 8,
                max_length: int | None = None, gradient_checkpointing: bool = False, callbacks=()) -> None:
    """What a user would write with PEFT and the Trainer alone. (benchmarks/train_memory.py reuses it with other
    data, a longer sequence, batch size and checkpointing; the defaults are this benchmark's.)"""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        BitsAndBytesConfig,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    set_seed(0)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, device_map="cpu", quantization_config=
                                                 BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                                    bnb_4bit_use_double_quant=True,
                                                                    bnb_4bit_compute_dtype=torch.float32))
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    rows = []
    for line in Path(data).read_text().splitlines():
        rec = json.loads(line)
        p = tok(rec["prompt"], add_special_tokens=False)["input_ids"] if "prompt" in rec else []
        c = tok(rec.get("completion", rec.get("text")), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        row = {"input_ids": [tok.bos_token_id] + p + c, "labels": [-100] * (1 + len(p)) + c}
        rows.append({k: v[:max_length] for k, v in row.items()} if max_length else row)

    def collate(batch):
        width = max(len(b["input_ids"]) for b in batch)
        pad = lambda xs, v: [x + [v] * (width - len(x)) for x in xs]  # noqa: E731
        return {"input_ids": torch.tensor(pad([b["input_ids"] for b in batch], tok.pad_token_id)),
                "labels": torch.tensor(pad([b["labels"] for b in batch], -100)),
                "attention_mask": torch.tensor(pad([[1] * len(b["input_ids"]) for b in batch], 0))}

    args = TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=batch_size,
                             learning_rate=2e-4, save_strategy="no", report_to=[], use_cpu=True,
                             remove_unused_columns=False, disable_tqdm=True, seed=0)
    Trainer(model=model, args=args, train_dataset=rows, data_collator=collate,
            callbacks=[timer, *callbacks]).train()
    model.save_pretrained(out)


def child(kind: str, base: str) -> None:
    from lora_export.latency import own_peak_rss_mb

    timer = step_timer()
    with tempfile.TemporaryDirectory() as tmp:
        (child_ours if kind == "ours" else child_plain)(base, str(Path(tmp) / "out"), timer)
    print(json.dumps({"step_s": statistics.median(timer.times[3:]),
                      "peak_rss_mb": own_peak_rss_mb()}))


def make_bigger_base(path: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(ROOT / "lora_export" / "embedded" / "base"))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3])
        return 0
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        bases = {"embedded (1.05M)": ROOT / "lora_export" / "embedded" / "base",
                 "llama-25M (config)": make_bigger_base(Path(tmp) / "llama25m")}
        for label, base in bases.items():
            runs = {"ours": [], "plain": []}
            for _ in range(ROUNDS):
                for kind in ("ours", "plain"):
                    p = subprocess.run([sys.executable, __file__, "--child", kind, str(base)], capture_output=True,
                                       text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
                    if p.returncode != 0:
                        print(p.stderr[-3000:], file=sys.stderr)
                        return 1
                    runs[kind].append(json.loads(p.stdout.strip().splitlines()[-1]))
            med = {k: {m: statistics.median(r[m] for r in v) for m in ("step_s", "peak_rss_mb")} for k, v in runs.items()}
            results[label] = {**med, "step_ratio": med["ours"]["step_s"] / med["plain"]["step_s"],
                              "rss_ratio": med["ours"]["peak_rss_mb"] / med["plain"]["peak_rss_mb"], "runs": runs}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "train_vs_peft.json").write_text(json.dumps({"steps": STEPS, "rounds": ROUNDS, "results": results},
                                                           indent=2) + "\n")
    lines = [f"QLoRA training, {STEPS} steps, batch 8, rank 8, {ROUNDS} interleaved runs each, medians; "
             f"{os.cpu_count()} CPU cores.", "",
             "| base | step ms (ours) | step ms (plain PEFT + Trainer) | ratio | peak RSS MB (ours) | (plain) | ratio |",
             "|---|---|---|---|---|---|---|"]
    for label, r in results.items():
        lines.append(f"| {label} | {r['ours']['step_s'] * 1000:.1f} | {r['plain']['step_s'] * 1000:.1f} | "
                     f"{r['step_ratio']:.3f} | {r['ours']['peak_rss_mb']:.0f} | {r['plain']['peak_rss_mb']:.0f} | "
                     f"{r['rss_ratio']:.3f} |")
    (RESULTS / "train_vs_peft.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
