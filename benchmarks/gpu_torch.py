"""What only a GPU can say about the merge and the alternatives, in PyTorch: bitsandbytes' CUDA kernels against our
CPU merge, and fp16 decode latency of base, merged and unmerged models on the device.

    python benchmarks/gpu_torch.py --out-dir benchmarks/results        # on a machine with one NVIDIA GPU
    python benchmarks/gpu_torch.py --dry-run --out-dir D               # CPU smoke test (CI): tiny shape, nothing timed

1. bitsandbytes on CUDA (135M Llama shape, seeded random weights, nothing downloaded). A QLoRA adapter is made as a
   GPU training script makes it: the base loaded in NF4 on the GPU (double quant, bf16 compute: the usual recipe),
   PEFT LoRA on every linear layer, lora_B drawn at random (nothing trained), save_pretrained. Then:
   - NF4 codes: bitsandbytes' quantize_4bit of every 4-bit weight on CUDA against the same on the CPU
     (the codes and block scales our CPU merge rounds through); count of differing bytes.
   - faithful merge: `merge --merge-base nf4` (our library, on the CPU) loaded in fp32 on the GPU, against PEFT's
     model on the bitsandbytes CUDA 4-bit base with fp32 compute (the weights the adapter was trained against),
     and against the same with bf16 compute (what the training forward computed); and the merge into the
     original weights (`--merge-base original`), the wrong export, against the fp32-compute truth.
2. fp16 decode on CUDA (135M and 1.1B shapes): the base, the merged model (PEFT merge_and_unload), PEFT's unmerged
   model, and (135M) PEFT on the bitsandbytes NF4 base as trained; interleaved rounds, medians; batch 1, greedy,
   a 32-token decode after a 16-token prompt (--steps), KV cache on the device; prompt latency at 16/64/256 tokens.

Writes gpu_torch.md and gpu_torch.json (after each part, so a run cut short keeps what it measured).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
from export_scale import SHAPES  # noqa: E402
from gpu_check import build_base, say  # noqa: E402

RANK = 16
FAITHFUL = 1e-4  # max |diff| / max |logit|: the gate the CPU tests use for the faithful merge
WRONG = 1e-2  # ... and at least this for a merge into other weights
DRY_SHAPE = {**SHAPES["tiny"]}


def bnb_config(compute):
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=getattr(torch, compute))


def make_qlora_adapter(base: Path, out: Path, device: str) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.bfloat16, device_map={"": device},
                                                 quantization_config=bnb_config("bfloat16"))
    peft = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules="all-linear"))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_((torch.randn(p.shape, generator=gen) * 0.01).to(p.dtype))
    peft.save_pretrained(str(out))


def truth_logits(base: Path, adapter: Path, ids, device: str, compute: str):
    """PEFT's adapted model on the bitsandbytes 4-bit base on the device (non-4-bit weights in fp32)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32, device_map={"": device},
                                                 quantization_config=bnb_config(compute))
    _pin_on_cpu(model, device)
    with torch.no_grad():
        out = PeftModel.from_pretrained(model, str(adapter)).eval()(ids.to(device)).logits.float().cpu()
    del model
    return out


def _pin_on_cpu(model, device: str) -> None:
    # the dry run only: on a CPU bitsandbytes picks its kernel by the CPU's features; our CPU tests pin the fp32 path
    if device == "cpu":
        from lora_export.base import pin_fp32_path

        pin_fp32_path(model)


def merged_logits(base: Path, adapter_dir: Path, work: Path, ids, device: str, merge_base: str):
    import torch

    from lora_export.adapters import load_adapter
    from lora_export.base import load_fp32
    from lora_export.merge import merge
    from lora_export.quantized_base import QuantRequest, resolve

    request = QuantRequest(quant_type="nf4", double_quant=True) if merge_base == "nf4" else QuantRequest()
    adapter, chosen = resolve(load_adapter(adapter_dir, base), base, merge_base, request, say)
    out = work / f"merged-{merge_base}"
    merge(base, [adapter], out, chosen)
    model = load_fp32(out).to(device)
    with torch.no_grad():
        return model(ids.to(device)).logits.float().cpu()


def code_check(base: Path, device: str) -> dict:
    """bitsandbytes' NF4 codes and block scales of every 2-D weight but the embeddings, CUDA vs CPU."""
    import bitsandbytes.functional as F
    from safetensors.torch import load_file

    tensors = load_file(str(base / "model.safetensors"))
    differing_codes = differing_absmax = total = 0
    max_absmax_rel = 0.0
    for name, w in tensors.items():
        if w.dim() != 2 or "embed" in name:
            continue
        qc, sc = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
        qg, sg = F.quantize_4bit(w.to(device), blocksize=64, quant_type="nf4")
        differing_codes += int((qc != qg.cpu()).sum())
        total += qc.numel()
        a, b = sc.absmax.float(), sg.absmax.float().cpu()
        differing_absmax += int((a != b).sum())
        max_absmax_rel = max(max_absmax_rel, float(((a - b).abs() / a.abs().clamp_min(1e-30)).max()))
    return {"packed_code_bytes": total, "differing_code_bytes": differing_codes,
            "differing_block_scales": differing_absmax, "max_block_scale_rel_diff": max_absmax_rel}


def rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def part_bnb(work: Path, device: str, dry_run: bool) -> dict:
    import torch

    shape = DRY_SHAPE if dry_run else SHAPES["135m"]
    base, adapter = work / "base", work / "adapter"
    build_base(base, shape)
    say("bitsandbytes: QLoRA adapter made on the 4-bit base (nf4, double quant, bf16 compute)")
    make_qlora_adapter(base, adapter, device)
    ids = torch.randint(3, shape["vocab_size"], (2, 32), generator=torch.Generator().manual_seed(2))
    say("bitsandbytes: NF4 codes on the device vs the CPU")
    codes = code_check(base, device)
    say("bitsandbytes: PEFT on the 4-bit base (fp32 and bf16 compute) vs our merges")
    truth32 = truth_logits(base, adapter, ids, device, "float32")
    truth16 = truth_logits(base, adapter, ids, device, "bfloat16")
    ours = merged_logits(base, adapter, work, ids, device, "nf4")
    wrong = merged_logits(base, adapter, work, ids, device, "original")
    return {
        "shape": "tiny (dry run)" if dry_run else "135m", "max_abs_logit": float(truth32.abs().max()),
        "codes": codes,
        "faithful_vs_fp32_compute": rel(ours, truth32), "faithful_vs_bf16_compute": rel(ours, truth16),
        "bf16_compute_vs_fp32_compute": rel(truth16, truth32), "original_vs_fp32_compute": rel(wrong, truth32),
        "faithful_gate": FAITHFUL, "wrong_gate": WRONG,
        "faithful_passes": rel(ours, truth32) <= FAITHFUL, "wrong_detected": rel(wrong, truth32) >= WRONG,
    }


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def decode_ms(model, prompt, steps: int, device: str) -> float:
    import torch

    with torch.no_grad():
        out = model(prompt, use_cache=True)
        cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        _sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            out = model(tok, past_key_values=cache, use_cache=True)
            cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        _sync(device)
    return (time.perf_counter() - start) / steps * 1e3


def prompt_ms(model, prompt, device: str) -> float:
    import torch

    with torch.no_grad():
        _sync(device)
        start = time.perf_counter()
        model(prompt, use_cache=True)
        _sync(device)
    return (time.perf_counter() - start) * 1e3


def part_latency(name: str, shape: dict, device: str, rounds: int, steps: int, nf4_base: Path | None) -> dict:
    import copy

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype = torch.float16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    cfg = LlamaConfig(**shape, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    with torch.device(device):
        base = LlamaForCausalLM(cfg).to(dtype).eval()
    unmerged = get_peft_model(copy.deepcopy(base), LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules="all-linear"))
    with torch.no_grad():
        for n, p in unmerged.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    unmerged.eval()
    merged = copy.deepcopy(unmerged).merge_and_unload().eval()
    variants = {"base": base, "merged": merged, "unmerged (PEFT)": unmerged}
    if nf4_base is not None:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        qbase = AutoModelForCausalLM.from_pretrained(str(nf4_base), dtype=dtype, device_map={"": device},
                                                     quantization_config=bnb_config("float16"))
        _pin_on_cpu(qbase, device)
        variants["PEFT on NF4 base (as trained)"] = PeftModel.from_pretrained(qbase, str(nf4_base.parent / "adapter")).eval()
    gen = torch.Generator().manual_seed(3)
    prompt = torch.randint(3, shape["vocab_size"], (1, 16), generator=gen).to(device)
    prompts = {n: torch.randint(3, shape["vocab_size"], (1, n), generator=gen).to(device) for n in (16, 64, 256)}
    for model in variants.values():  # warm-up: kernels chosen, caches allocated
        decode_ms(model, prompt, 4, device)
        for p in prompts.values():
            prompt_ms(model, p, device)
    decode = {k: [] for k in variants}
    prefill = {k: {n: [] for n in prompts} for k in variants}
    for r in range(rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for k in order:
            decode[k].append(decode_ms(variants[k], prompt, steps, device))
            for n, p in prompts.items():
                prefill[k][n].append(prompt_ms(variants[k], p, device))
    med = {k: statistics.median(v) for k, v in decode.items()}
    ratios = {k: statistics.median(a / b for a, b in zip(decode[k], decode["base"])) for k in variants}
    row = {"shape": name, "dtype": str(dtype).removeprefix("torch."), "rounds": rounds, "decode_steps": steps,
           "decode_ms": med, "tokens_per_s": {k: 1e3 / v for k, v in med.items()},
           "decode_over_base_median_of_round_ratios": ratios,
           "prompt_ms": {k: {str(n): statistics.median(v) for n, v in d.items()} for k, d in prefill.items()}}
    if device == "cuda":
        row["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated() / 1e6
    del variants, base, merged, unmerged
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def markdown(res: dict) -> str:
    dry = res["dry_run"]
    lines = [f"# GPU check in PyTorch{' (DRY RUN on the CPU: no figure here is a GPU figure)' if dry else ''}", "",
             f"{res['date']}, {res['device']}, torch {res['versions'].get('torch')}, bitsandbytes "
             f"{res['versions'].get('bitsandbytes')}, peft {res['versions'].get('peft')}, transformers "
             f"{res['versions'].get('transformers')}. Command: `python benchmarks/gpu_torch.py`.", ""]
    b = res.get("bnb")
    if b:
        c = b["codes"]
        lines += [f"## bitsandbytes on the device vs our CPU merge ({b['shape']} shape, max |logit| "
                  f"{b['max_abs_logit']:.2f})", "",
                  f"- NF4 codes, device vs CPU: {c['differing_code_bytes']} of {c['packed_code_bytes']} packed bytes "
                  f"differ; {c['differing_block_scales']} block scales differ (max rel {c['max_block_scale_rel_diff']:.1e}).",
                  "", "| comparison (max \\|diff\\| / max \\|logit\\|) | value | gate |", "|---|---|---|",
                  f"| our `--merge-base nf4` merge vs PEFT on the device's 4-bit base, fp32 compute | "
                  f"{b['faithful_vs_fp32_compute']:.2e} | <= {b['faithful_gate']:g}: "
                  f"{'met' if b['faithful_passes'] else '**MISSED**'} |",
                  f"| our `--merge-base nf4` merge vs the same with bf16 compute (as the training forward ran) | "
                  f"{b['faithful_vs_bf16_compute']:.2e} | (bf16 activations: reported) |",
                  f"| bf16 compute vs fp32 compute, both PEFT on the device | {b['bf16_compute_vs_fp32_compute']:.2e} | |",
                  f"| merge into the original weights (wrong export) vs fp32 compute | {b['original_vs_fp32_compute']:.2e} "
                  f"| >= {b['wrong_gate']:g}: {'detected' if b['wrong_detected'] else '**NOT DETECTED**'} |", ""]
    for row in res.get("latency", []):
        lines += [f"## {row['dtype']} decode, {row['shape']} shape (batch 1, {row['decode_steps']}-token decode, "
                  f"{row['rounds']} interleaved rounds, medians)", "",
                  "| variant | decode ms/token | tokens/s | decode / base | prompt ms at 16/64/256 |", "|---|---|---|---|---|"]
        for k, ms in row["decode_ms"].items():
            p = row["prompt_ms"][k]
            lines.append(f"| {k} | {ms:.3f} | {row['tokens_per_s'][k]:.1f} | "
                         f"{row['decode_over_base_median_of_round_ratios'][k]:.3f} | "
                         f"{p['16']:.2f}/{p['64']:.2f}/{p['256']:.2f} |")
        if "peak_gpu_memory_mb" in row:
            lines.append(f"\nPeak GPU memory allocated by torch in this part: {row['peak_gpu_memory_mb']:.0f} MB.")
        lines.append("")
    for err in res.get("errors", []):
        lines.append(f"- error in {err['part']}: `{err['error']}`")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shape, 2 rounds: checks the script, times nothing")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--work", type=Path, default=Path("/tmp/lora-export-gpu-torch"))
    ap.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    ap.add_argument("--steps", type=int, default=32, help="decode steps per round")
    args = ap.parse_args()
    import importlib.metadata as md
    import shutil

    import torch

    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_torch: torch sees no CUDA device; run with --dry-run on a CPU", file=sys.stderr)
        return 2
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    versions = {}
    for pkg in ("torch", "bitsandbytes", "peft", "transformers"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    res = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "dry_run": args.dry_run, "versions": versions,
           "device": "CPU (dry run)" if args.dry_run else torch.cuda.get_device_name(), "latency": [], "errors": []}
    args.out_dir.mkdir(parents=True, exist_ok=True)

    def save():
        (args.out_dir / "gpu_torch.json").write_text(json.dumps(res, indent=2) + "\n")
        (args.out_dir / "gpu_torch.md").write_text(markdown(res))

    parts = [("bnb", lambda: res.__setitem__("bnb", part_bnb(args.work, device, args.dry_run)))]
    shapes = {"tiny (dry run)": DRY_SHAPE} if args.dry_run else {"135m": SHAPES["135m"], "1.1b": SHAPES["1.1b"]}
    for name, shape in shapes.items():
        nf4 = args.work / "base" if name in ("135m", "tiny (dry run)") else None
        parts.append((f"latency {name}", lambda name=name, shape=shape, nf4=nf4: res["latency"].append(
            part_latency(name, shape, device, 2 if args.dry_run else args.rounds, 4 if args.dry_run else args.steps,
                         nf4 if (nf4 and (nf4 / "config.json").is_file()) else None))))
    for part, run in parts:
        say(part)
        try:
            run()
        except Exception as e:  # keep what the other parts measure; the error is written down, and the exit says so
            import traceback

            traceback.print_exc()
            res["errors"].append({"part": part, "error": f"{type(e).__name__}: {e}"[:500]})
        save()
    print(markdown(res))
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
