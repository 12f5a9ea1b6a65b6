"""What each int4 recipe keeps of a real fine-tune: SmolLM2-135M-Instruct + a QLoRA adapter on the code task.

Every recipe is one `lora-export export` through the CLI with a target file that changes knobs of
`ort-cpu-int4` as first shipped (BASELINE: block size, symmetric, accuracy level, algorithm, the layers kept
at int8), judged by the export's own
parity report against the model as trained (mean KL, top-1, adapter retention) and by the task metric on
held-out examples in ONNX Runtime. The model's weights came stored on a 4-bit grid (Q4_1, block 32, with a
minimum): requantizing them to int4 may look easier than on a bf16 original.

The side-path rows export with `--switchable` instead (the base graph with the adapter as a float side path, an
adapter file): the base weights there are dequant(NF4(W)) quantized on their own, not a merge. Their figures are the
adapter's section of the switchable export's parity report; `side_path_block_size` is the field the row varies.

    python benchmarks/int4_recipes.py [--adapter DIR] [--only NAME ...]

writes benchmarks/results/int4_recipes.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.realmodel import ADAPTER_NAME, SWITCHABLE_ARGS, Unavailable, ort_runner  # noqa: E402
from benchmarks.realmodel import real_adapter, real_base, write_code_task  # noqa: E402

BASE_TARGET = ROOT / "lora_export" / "targets_data" / "ort-cpu-int4.toml"
# name -> the [quantization] lines that differ from BASELINE: ort-cpu-int4 as first shipped (block 32,
# symmetric, accuracy level 0, RTN, lm_head int8, sensitive layers int8)
BASELINE = {"block_size": 32, "symmetric": True, "accuracy_level": 0, "algo": "rtn"}
RECIPES = {
    "sym, block 32, acc 0 (the first default)": {},
    "acc 1 (fp32 activations)": {"accuracy_level": 1},
    "asym, acc 1": {"accuracy_level": 1, "symmetric": False},
    "asym (acc 0)": {"symmetric": False},
    "block 16, acc 1": {"accuracy_level": 1, "block_size": 16},
    "block 64, acc 1": {"accuracy_level": 1, "block_size": 64},
    "block 128, acc 1": {"accuracy_level": 1, "block_size": 128},
    "asym, block 16, acc 1": {"accuracy_level": 1, "symmetric": False, "block_size": 16},
    "no int8 sensitive layers, acc 1": {"accuracy_level": 1, "sensitive_layers": "int4"},
    "k_quant, acc 1": {"accuracy_level": 1, "algo": "k_quant"},
    "asym, k_quant, acc 1": {"accuracy_level": 1, "symmetric": False, "algo": "k_quant"},
    "asym, block 64, acc 1": {"accuracy_level": 1, "symmetric": False, "block_size": 64},
    "asym, block 64, acc 0 (shipped now)": {"symmetric": False, "block_size": 64},
}
# the same, as --switchable exports of ort-cpu-int4 as shipped now (asymmetric, block 64 for merged graphs)
SIDE_PATH = {
    "side path: asym, block 64 (the merged graphs' block)": {"side_path_block_size": 64},
    "side path: asym, block 32 (shipped now)": {"side_path_block_size": 32},
    "side path: sym, block 16": {"symmetric": True, "side_path_block_size": 16},
}
SHIPPED = {"symmetric": False, "block_size": 64}
TASK_EVAL = 48


def target_file(overrides: dict, path: Path) -> Path:
    import tomllib

    doc = tomllib.loads(BASE_TARGET.read_text())
    doc["name"] = "int4-recipe"
    doc["quantization"].update({**BASELINE, **overrides})
    lines = []
    for key, value in doc.items():
        if not isinstance(value, dict):
            lines.append(f"{key} = {json.dumps(value)}")
    for key, value in doc.items():
        if isinstance(value, dict):
            lines.append(f"\n[{key}]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in value.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def measure(base: Path, adapter: Path, task: Path, name: str, overrides: dict, work: Path,
            switchable: bool = False) -> dict:
    from lora_export.base import load_tokenizer
    from lora_export.data import load_jsonl
    from lora_export.tasks import task_accuracy

    slug = "".join(c if c.isalnum() else "-" for c in name)
    out = work / slug
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "lora_export.cli", "export", "--base", str(base), "--adapter",
                           str(adapter), "--target", str(target_file(overrides, work / f"{slug}.toml")),
                           "--out", str(out), *(SWITCHABLE_ARGS if switchable else ())],
                          capture_output=True, text=True)
    if proc.returncode not in (0, 1):
        print(proc.stderr[-3000:], file=sys.stderr)
        return {"recipe": name, "overrides": overrides, "error": proc.stderr[-1500:]}
    if switchable:  # the adapter's section: its pooled stage figures, as the manifest's parity gives for a merge
        section = json.loads((out / "parity.json").read_text())["sections"][ADAPTER_NAME]
        total = section["stages"]["total"]
        parity = {"passed": section["passed"], "mean_kl": total["mean_kl"], "top1_agreement": total["top1_agreement"],
                  "adapter_retention": section["adapter_retention"]}
    else:
        parity = json.loads((out / "export_manifest.json").read_text())["parity"]
    held_out = load_jsonl(task / "eval.jsonl").examples[:TASK_EVAL]
    acc = task_accuracy(ort_runner(out), load_tokenizer(base), held_out).value
    size = sum(p.stat().st_size for p in out.glob("model.onnx*"))
    return {"recipe": name, "overrides": overrides, "passed": parity["passed"], "mean_kl": parity["mean_kl"],
            "top1": parity["top1_agreement"], "retention": parity["adapter_retention"], "task_accuracy": acc,
            "onnx_mb": round(size / 1e6, 1), "export_s": round(time.time() - t0, 1)}


def markdown(rows: list[dict], trained_acc: float | None) -> str:
    out = ["| recipe | parity | mean KL | top-1 | adapter kept | task accuracy | model.onnx* MB |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['recipe']} | error | | | | | |")
            continue
        kept = "" if r["retention"] is None else f"{r['retention']:.1%}"
        out.append(f"| {r['recipe']} | {'PASS' if r['passed'] else 'FAIL'} | {r['mean_kl']:.4f} | {r['top1']:.1%} | "
                   f"{kept} | {r['task_accuracy']:.1%} | {r['onnx_mb']} |")
    if trained_acc is not None:
        out.append(f"\nThe model as trained (NF4 base + adapter, PyTorch fp32) scores {trained_acc:.1%} on the same "
                   f"{TASK_EVAL} held-out examples.")
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter", type=Path, help="a QLoRA adapter of the real model (default: the cached one, "
                    "trained once by benchmarks/realmodel.py)")
    ap.add_argument("--only", nargs="*", help="recipe names to run (default: all)")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    try:
        base = real_base()
        adapter = args.adapter or real_adapter(base)
    except Unavailable as exc:
        print(f"int4_recipes: the real model cannot be had here: {exc}", file=sys.stderr)
        return 2
    results = args.results / "int4_recipes.json"
    earlier = {r["recipe"]: r for r in json.loads(results.read_text())["rows"]} if results.is_file() else {}
    with tempfile.TemporaryDirectory(prefix="int4-recipes-") as tmp:
        work = Path(tmp)
        task = write_code_task(work / "task")
        from lora_export.adapters import load_adapter
        from lora_export.base import load_tokenizer
        from lora_export.data import load_jsonl
        from lora_export.reference import load_adapted
        from lora_export.runtime import TorchCausalLM
        from lora_export.tasks import task_accuracy

        held_out = load_jsonl(task / "eval.jsonl").examples[:TASK_EVAL]
        trained = task_accuracy(TorchCausalLM(load_adapted(base, load_adapter(adapter, base))),
                                load_tokenizer(base), held_out).value
        rows = []
        recipes = [(n, o, False) for n, o in RECIPES.items()] + [(n, {**SHIPPED, **o}, True)
                                                                  for n, o in SIDE_PATH.items()]
        for name, overrides, switchable in recipes:
            if args.only and name not in args.only:  # --only: the other rows stay as the last run measured them
                if name in earlier:
                    rows.append(earlier[name])
                continue
            rows.append(measure(base, adapter, task, name, overrides, work, switchable))
            print(json.dumps(rows[-1]), flush=True)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "int4_recipes.json").write_text(json.dumps({"trained_task_accuracy": trained, "rows": rows},
                                                               indent=2))
    (args.results / "int4_recipes.md").write_text(
        "# int4 recipes on SmolLM2-135M-Instruct + a QLoRA code-task adapter\n\n"
        "`python benchmarks/int4_recipes.py`; each row is one `lora-export export` of ort-cpu-int4 as first shipped "
        "(symmetric, block 32, accuracy level 0, RTN; lm_head and sensitive layers int8) with the knobs named "
        "changed, parity against the model as trained (the thresholds of the target as it was then); the side-path "
        "rows are `--switchable` exports of ort-cpu-int4 as shipped now, with the adapter's section of their "
        "parity report (every float LoRA side path's base weights quantized on their own). The base's "
        "weights came stored on a 4-bit grid (Q4_1).\n\n"
        + markdown(rows, trained))
    return 0


if __name__ == "__main__":
    sys.exit(main())
