"""Switchable adapters at the 135M Llama shape on the CPU, fp32 and int4 (ort-cpu-fp32, ort-cpu-int4): decode with
an adapter active vs the base, the time to switch adapters, and the size of an adapter file vs the base graph.

    python benchmarks/switchable.py                       # 135M shape, two rank-16 adapters -> results/switchable.{json,md}
    python benchmarks/switchable.py --model tiny --rounds 3   # smoke test of this script

Steps, each a `lora-export` command as a user types it (logs under WORK/logs/):
1. the base from its config with seeded random weights (benchmarks/export_scale.py's build_base);
2. two PEFT LoRA adapters, rank 16, alpha 32, all linear layers, seeded random A and B;
for each target (fp32, then int4):
3. `lora-export export --switchable` with both (parity of the base and of each adapter is part of it; exit 1, a
   parity verdict, is recorded, not fatal: random weights have flat logits, int4 misses top-1 on them);
4. `lora-export export` of the first adapter merged (the zero-overhead graph: the base's structure);
5. lora_export.switchable_bench.bench: the switchable graph with no adapter, with each adapter active, and the
   merged export, interleaved; switch times in ONNX Runtime and onnxruntime-genai; file sizes.
Goals (compared, never assumed): switching costs less than one decode step; an active adapter's decode <= 1.10 x
the base's (the merged export has the base's graph and cost) at rank 16.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.export_scale import build_base, lora_export_cmd

RESULTS = ROOT / "benchmarks" / "results"


def make_adapter(base: Path, out: Path, seed: int, rank: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model

    from lora_export.base import load_fp32

    torch.manual_seed(seed)
    model = get_peft_model(load_fp32(base), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear",
                                                       init_lora_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.05)
    model.save_pretrained(str(out))
    return out


def run(cmd: list, log: Path) -> None:
    """Run a lora-export command; exit 1 is a parity verdict (the export is written and says so), anything else
    stops the benchmark."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        proc = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode not in (0, 1):
        sys.exit(f"{' '.join(map(str, cmd))} exited {proc.returncode}; see {log}")


TARGETS = {"ort-cpu-fp32": "", "ort-cpu-int4": "-int4"}  # target -> suffix of its work folders


def parity_verdicts(export_dir: Path) -> dict:
    manifest = json.loads((export_dir / "export_manifest.json").read_text())
    parity = manifest.get("parity") or {}
    return parity.get("sections") or {"merged": parity.get("passed")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="135m", choices=["135m", "tiny"])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--work", type=Path, default=Path("/tmp/lora-export-switchable"))
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    args = p.parse_args()
    work = args.work / args.model
    base = work / "base"
    if not (base / "model.safetensors").is_file():
        build_base(base, args.model)
    adapters = [work / f"adapter{i}" for i in (1, 2)]
    for i, a in enumerate(adapters, 1):
        if not (a / "adapter_model.safetensors").is_file():
            make_adapter(base, a, seed=i, rank=args.rank)
    cli = lora_export_cmd()
    from benchmarks.machine import describe as machine
    from lora_export.switchable_bench import bench, markdown

    prompt = list(range(10, 42))
    parts, results = [], {}
    for target, suffix in TARGETS.items():
        switchable, merged = work / f"switchable{suffix}", work / f"merged{suffix}"
        if not (switchable / "export_manifest.json").is_file():
            run(cli + ["export", "--base", base, "--adapter", adapters[0], "--adapter", adapters[1], "--target",
                       target, "--out", switchable, "--switchable"], work / "logs" / f"export-switchable{suffix}.log")
        if not (merged / "export_manifest.json").is_file():
            run(cli + ["export", "--base", base, "--adapter", adapters[0], "--target", target, "--out", merged],
                work / "logs" / f"export-merged{suffix}.log")
        r = bench(switchable, prompt, merged_dir=merged, rounds=args.rounds, new_tokens=args.new_tokens,
                  progress=lambda m: print(m, file=sys.stderr, flush=True))
        verdicts = {"switchable": parity_verdicts(switchable), "merged": parity_verdicts(merged)["merged"]}
        results[target] = {**r.to_dict(), "parity": verdicts}
        shown = ", ".join(f"{k} {'PASS' if v else 'FAIL'}" for k, v in verdicts["switchable"].items())
        parts.append(f"# {target}\n\nParity at export ({target}'s tolerances): switchable sections {shown}; merged "
                     f"{'PASS' if verdicts['merged'] else 'FAIL'}.\n\n" + markdown(r).replace("\n## ", "\n## ", 1))
    head = (f"# Switchable adapters: {args.model} Llama shape, CPU, rank {args.rank}, fp32 and int4 targets\n\n"
            f"Machine: {machine()} (shared with other jobs while measured: timings are noisy)\n\n"
            f"Command: `python benchmarks/switchable.py --model {args.model} --rounds {args.rounds}` (one run: every "
            "figure below)\n\n")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.model == "135m" else f"-{args.model}"
    text = head + "\n".join(parts)
    (args.out_dir / f"switchable{suffix}.md").write_text(text)
    (args.out_dir / f"switchable{suffix}.json").write_text(json.dumps({"model": args.model, "rank": args.rank,
                                                                       "targets": results}, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
