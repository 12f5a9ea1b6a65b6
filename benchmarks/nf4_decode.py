"""What the NF4 export as trained costs at decode beside the merged fp16 and int4 exports, on the real fine-tune.

SmolLM2-135M-Instruct + the QLoRA code-task adapter (benchmarks/realmodel.py), exported through the CLI for
`ort-cuda-nf4` (the base's trained NF4 codes as MatMulBnb4, the adapter an fp16 side path), `ort-cuda-int4`
(merged, MatMulNBits) and `ort-cuda-fp16` (merged). Reported per export: weight bytes on disk, parity as the export
judged it (CPU-side), and decode time per token on whatever provider this machine has, the three interleaved in one
run (rounds rotate the order; medians), batch 1, prompt 32, greedy.

On a machine without a GPU the timings are ONNX Runtime's *CPU* kernels for graphs built for CUDA (fp16 activations
run through casts, MatMulBnb4 through its CPU kernel): they rank CPU kernels, not GPU ones. Batch-1 decode of a large
model is bound by the weight bytes read per token, which the size column gives for any device.

    python benchmarks/nf4_decode.py [--rounds 10] [--tokens 32]

writes benchmarks/results/nf4_decode.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from machine import describe  # noqa: E402

from benchmarks.realmodel import real_adapter, real_base  # noqa: E402

TARGETS = ("ort-cuda-nf4", "ort-cuda-int4", "ort-cuda-fp16")
RESULTS = ROOT / "benchmarks" / "results"


def export(base: Path, adapter: Path, target: str, out: Path) -> dict:
    proc = subprocess.run([sys.executable, "-m", "lora_export.cli", "export", "--base", str(base), "--adapter",
                           str(adapter), "--target", target, "--out", str(out)], capture_output=True, text=True)
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"export {target} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    parity = json.loads((out / "parity.json").read_text())
    weights = sum(f.stat().st_size for f in out.glob("model.onnx*"))
    return {"target": target, "passed": parity["passed"], "mean_kl": parity["stages"]["total"]["mean_kl"],
            "top1": parity["stages"]["total"]["top1_agreement"], "retention": parity["adapter_retention"],
            "weight_mb": weights / 1e6}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()

    import onnxruntime

    from lora_export.base import load_tokenizer
    from lora_export.latency import measure
    from lora_export.runtime import OrtCausalLM

    base, adapter = real_base(), real_adapter()
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                 if p in onnxruntime.get_available_providers()][:1]
    prompt = load_tokenizer(base)("The weather today is", add_special_tokens=False)["input_ids"]
    prompt = (prompt * 32)[:32]
    with tempfile.TemporaryDirectory(prefix="nf4-decode-") as tmp:
        rows = [export(base, adapter, t, Path(tmp) / t) for t in TARGETS]
        models = {t: OrtCausalLM(Path(tmp) / t, providers, threads=0, io_binding=True) for t in TARGETS}
        samples = measure(models, prompt, args.tokens, args.rounds)
    ref = samples["ort-cuda-fp16"][1]
    for row in rows:
        decode = samples[row["target"]][1]
        row["decode_ms"] = statistics.median(decode)
        row["vs_fp16"] = statistics.median(d / r for d, r in zip(decode, ref))
    head = (f"SmolLM2-135M-Instruct + the real QLoRA adapter, {providers[0]} ({describe()}), batch 1, prompt 32, "
            f"{args.tokens} greedy decode steps, {args.rounds} interleaved rounds, medians. Parity is the export's own "
            "verdict against the model as trained (CPU-side for these CUDA targets).")
    if providers[0] == "CPUExecutionProvider":
        head += (" **CPU kernels for graphs built for CUDA: these timings rank ONNX Runtime's CPU kernels, not a "
                 "GPU's.**")
    lines = ["# NF4 as trained vs merged int4 and fp16: size, parity, decode", "", head, "",
             "| target | graph | weights MB | parity | mean KL | top-1 | adapter kept | decode ms/token | vs fp16 |",
             "|---|---|---|---|---|---|---|---|---|"]
    graphs = {"ort-cuda-nf4": "NF4 base (trained codes) + fp16 side path", "ort-cuda-int4": "merged, int4",
              "ort-cuda-fp16": "merged, fp16"}
    for r in rows:
        lines.append(f"| `{r['target']}` | {graphs[r['target']]} | {r['weight_mb']:.1f} | "
                     f"{'PASS' if r['passed'] else 'FAIL'} | {r['mean_kl']:.3g} | {r['top1']:.1%} | "
                     f"{r['retention']:.1%} | {r['decode_ms']:.2f} | {r['vs_fp16']:.3f} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "nf4_decode.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "nf4_decode.json").write_text(json.dumps({"provider": providers[0], "machine": describe(),
                                                          "rounds": args.rounds, "tokens": args.tokens,
                                                          "rows": rows}, indent=2) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
