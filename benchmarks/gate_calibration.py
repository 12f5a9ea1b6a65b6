"""Where the parity gate of each quantized target stands on a real fine-tune: a right export and wrong ones.

SmolLM2-135M-Instruct + the QLoRA code-task adapter (benchmarks/realmodel.py). For each target, one right
export through the CLI, then the wrong exports the gate must fail, each judged by `lora-export validate` (or
by the export's own verdict) against the model as trained:

- original:  the QLoRA adapter merged into the original weights (`--merge-base original`);
- dropped:   the adapter dropped: the graph of an export of the same adapter with lora_B x 1e-6 (the base, in
             the target's format: export refuses an adapter that changes nothing), put in a copy of the right
             export and validated;
- layer:     one decoder layer's weights perturbed: every weight of layer 15 of 30 gets noise of 25% of its
             scale (float weights: 0.25 x their RMS; quantized ones: their block scales x (1 + 0.25 N(0, 1)));
- scale:     a wrong block scale: every quantized weight's scales x 8/7 (absmax / 7 instead of / 8, the
             off-by-one of a symmetric 4-bit range), on the quantized targets;
- lm_head4:  the lm_head quantized to int4 where the target says int8 (the graph of an export with
             lm_head = "int4", validated as the right export's target).

`ort-cpu-int4 --switchable` is the same target exported with `--switchable` (the adapter a float side path fed from
its own file): its row is the adapter's section of the report (no merge stage: merge-stage KL blank), its verdict the
whole export's (the base section's too).

    python benchmarks/gate_calibration.py [--targets NAME ...] [--cases NAME ...]

writes benchmarks/results/gate_calibration.{md,json} (rows of earlier runs not rerun are kept).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.realmodel import ADAPTER_NAME, SWITCHABLE_ARGS, Unavailable, ort_runner  # noqa: E402
from benchmarks.realmodel import real_adapter, real_base, write_code_task  # noqa: E402

SWITCHABLE = " --switchable"  # a target name with this suffix: the same target, exported with --switchable
TARGETS = ("ort-cpu-int8", "ort-cpu-int4", "ort-cuda-int4", "ort-cuda-fp16", "ort-cuda-nf4", "ort-cpu-int4" + SWITCHABLE)
CASES = ("right", "original", "dropped", "layer", "scale", "lm_head4")
LAYER = 15
NOISE = 0.25
SCALE_BUG = 8 / 7
TASK_EVAL = 48
QUANTIZED_OPS = {"MatMulNBits": 2, "MatMulBnb4": 2}  # op -> index of its scales (absmax) input


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lora_export.cli", *args], capture_output=True, text=True)


def must(proc: subprocess.CompletedProcess) -> None:
    """An export that gave a verdict (0 or 1); else its stderr, raised."""
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"{' '.join(proc.args[2:4])} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def target_with(name: str, overrides: dict, path: Path) -> Path:
    """The shipped target ``name`` as a file, with [quantization] ``overrides``."""
    import tomllib

    from lora_export.targets import TARGETS_DIR

    doc = tomllib.loads((TARGETS_DIR / f"{name}.toml").read_text())
    doc["quantization"].update(overrides)
    lines = [f"{k} = {json.dumps(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    for key, value in doc.items():
        if isinstance(value, dict):
            lines += [f"\n[{key}]", *(f"{k} = {json.dumps(v)}" for k, v in value.items())]
    path.write_text("\n".join(lines) + "\n")
    return path


def zeroed(adapter: Path, out: Path, factor: float = 1e-6) -> Path:
    """A copy of ``adapter`` whose lora_B weights are ``factor`` times theirs: the same files, no effect to speak of
    (an exact zero is refused by export as an adapter that changes nothing)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(adapter, out)
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    save_file({k: v * factor if "lora_B" in k else v for k, v in tensors.items()},
              str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out


def swap_graph(right: Path, graph_from: Path, out: Path) -> Path:
    """A copy of the right export with another export's graph (model.onnx + its data) in place of its own."""
    shutil.copytree(right, out)
    for name in ("model.onnx", "model.onnx.data"):
        shutil.copy2(graph_from / name, out / name)
    return out


def edit_graph(right: Path, out: Path, edit) -> Path:
    """A copy of the right export whose initializers ``edit(model)`` changed in place."""
    import onnx

    from lora_export.quantize.nf4 import _replace_model

    shutil.copytree(right, out)
    model = onnx.load(str(out / "model.onnx"))
    edit(model)
    _replace_model(model, out)
    return out


def _initializers(model) -> dict:
    return {t.name: t for t in model.graph.initializer}


def _scale_tensor(tensor, factor) -> None:
    from onnx import numpy_helper

    a = numpy_helper.to_array(tensor)
    tensor.CopyFrom(numpy_helper.from_array((a.astype(np.float32) * factor(a.shape)).astype(a.dtype), tensor.name))


def perturb_layer(model, layer: int = LAYER, noise: float = NOISE, seed: int = 0) -> int:
    """Every weight of one decoder layer gets noise of ``noise`` times its scale. Returns the count changed."""
    from onnx import numpy_helper

    rng = np.random.default_rng(seed)
    inits, n = _initializers(model), 0
    for node in model.graph.node:
        if not node.name.startswith(f"/model/layers.{layer}/"):
            continue
        if node.op_type in QUANTIZED_OPS and node.input[QUANTIZED_OPS[node.op_type]] in inits:
            _scale_tensor(inits[node.input[QUANTIZED_OPS[node.op_type]]],
                          lambda shape: 1 + noise * rng.standard_normal(shape))
            n += 1
        elif node.op_type == "MatMul" and node.input[1] in inits and 0 not in inits[node.input[1]].dims:
            # (a switchable graph's LoRA inputs default to empty tensors: nothing to perturb)
            t = inits[node.input[1]]
            a = numpy_helper.to_array(t)
            rms = float(np.sqrt(np.mean(a.astype(np.float64) ** 2)))
            t.CopyFrom(numpy_helper.from_array((a + noise * rms * rng.standard_normal(a.shape)).astype(a.dtype),
                                               t.name))
            n += 1
    if n == 0:
        raise RuntimeError(f"no weight of layer {layer} found to perturb")
    return n


def wrong_scales(model, factor: float = SCALE_BUG) -> int:
    """Every quantized weight's block scales times ``factor``. Returns the count changed."""
    inits, n = _initializers(model), 0
    for node in model.graph.node:
        if node.op_type in QUANTIZED_OPS and node.input[QUANTIZED_OPS[node.op_type]] in inits:
            _scale_tensor(inits[node.input[QUANTIZED_OPS[node.op_type]]], lambda shape: factor)
            n += 1
    return n


def read_parity(export_dir: Path) -> dict:
    p = json.loads((export_dir / "parity.json").read_text())
    passed = p["passed"]
    if "sections" in p:  # a switchable export: the adapter's section (the verdict stays the whole export's)
        p = p["sections"][ADAPTER_NAME]
    shapes = p["shapes"].values()
    return {"passed": passed, "mean_kl": max(s["mean_kl"] for s in shapes),
            "top1": min(s["top1_agreement"] for s in shapes), "retention": p["adapter_retention"],
            "merge_kl": p["stages"].get("merge", {}).get("mean_kl"),
            "export_kl": p["stages"].get("export", {}).get("mean_kl"), "failures": p["failures"]}


def task_accuracy_of(export_dir: Path, base: Path, task: Path) -> float:
    from lora_export.base import load_tokenizer
    from lora_export.data import load_jsonl
    from lora_export.tasks import task_accuracy

    held_out = load_jsonl(task / "eval.jsonl").examples[:TASK_EVAL]
    return task_accuracy(ort_runner(export_dir), load_tokenizer(base), held_out).value


def run_case(target: str, case: str, base: Path, adapter: Path, task: Path, work: Path) -> dict | None:
    """One row: the case's export judged against the model as trained, or None where it does not apply."""
    right = work / target / "right"
    out = work / target / case
    quantized = target not in ("ort-cuda-fp16",)
    switchable = target.endswith(SWITCHABLE)
    if (case in ("scale",) and not quantized or case == "lm_head4" and "int4" not in target
            or switchable and case in ("dropped", "lm_head4")):  # one graph for every adapter: no such graph to swap
        return None
    name, target = target, target.removesuffix(SWITCHABLE)
    t0 = time.time()
    if case in ("right", "original"):
        extra = ["--merge-base", "original"] if case == "original" else []
        extra += list(SWITCHABLE_ARGS) if switchable else []
        proc = cli("export", "--base", str(base), "--adapter", str(adapter), "--target", target, "--out", str(out),
                   *extra)
    else:
        if case == "dropped":
            graph = work / target / "dropped-graph"
            must(cli("export", "--base", str(base), "--adapter", str(zeroed(adapter, work / target / "zero-adapter")),
                     "--target", target, "--out", str(graph)))
            swap_graph(right, graph, out)
        elif case == "lm_head4":
            graph = work / target / "lm_head4-graph"
            must(cli("export", "--base", str(base), "--adapter", str(adapter), "--target",
                     str(target_with(target, {"lm_head": "int4"}, work / target / "lm_head4.toml")), "--out", str(graph)))
            swap_graph(right, graph, out)
        elif case == "layer":
            edit_graph(right, out, perturb_layer)
        elif case == "scale":
            edit_graph(right, out, wrong_scales)
        proc = cli("validate", str(out))
    if proc.returncode not in (0, 1):
        print(proc.stderr[-3000:], file=sys.stderr)
        return {"target": name, "case": case, "error": proc.stderr[-1500:]}
    row = {"target": name, "case": case, "exit": proc.returncode, **read_parity(out)}
    if case == "right":
        row["task_accuracy"] = task_accuracy_of(out, base, task)
    row["seconds"] = round(time.time() - t0, 1)
    return row


def markdown(rows: list[dict]) -> str:
    out = ["| target | case | verdict | worst mean KL | worst top-1 | adapter kept | merge-stage KL | task |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['target']} | {r['case']} | error | | | | | |")
            continue
        ret = "" if r["retention"] is None else f"{r['retention']:.1%}"
        task = f"{r['task_accuracy']:.0%}" if "task_accuracy" in r else ""
        merge = "" if r["merge_kl"] is None else f"{r['merge_kl']:.2g}"
        out.append(f"| {r['target']} | {r['case']} | {'PASS' if r['passed'] else 'FAIL'} | {r['mean_kl']:.4g} | "
                   f"{r['top1']:.1%} | {ret} | {merge} | {task} |")
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", nargs="*", default=list(TARGETS))
    ap.add_argument("--cases", nargs="*", default=list(CASES))
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    try:
        base = real_base()
        adapter = real_adapter(base)
    except Unavailable as exc:
        print(f"gate_calibration: the real model cannot be had here: {exc}", file=sys.stderr)
        return 2
    results = args.results / "gate_calibration.json"
    rows = {(r["target"], r["case"]): r for r in json.loads(results.read_text())["rows"]} if results.is_file() else {}
    with tempfile.TemporaryDirectory(prefix="gate-calibration-") as tmp:
        work = Path(tmp)
        task = write_code_task(work / "task")
        for target in args.targets:
            (work / target).mkdir()
            cases = ["right", *(c for c in args.cases if c != "right")]  # the wrong ones start from the right one
            for case in cases:
                try:
                    row = run_case(target, case, base, adapter, task, work)
                except RuntimeError as exc:  # one case's export failed: say so in its row, go on with the rest
                    print(exc, file=sys.stderr)
                    row = {"target": target, "case": case, "error": str(exc)[-1500:]}
                if row is not None and (case in args.cases):
                    rows[(target, case)] = row
                    print(json.dumps(row), flush=True)
            shutil.rmtree(work / target)
    ordered = sorted(rows.values(), key=lambda r: (TARGETS.index(r["target"]) if r["target"] in TARGETS else 99,
                                                   CASES.index(r["case"])))
    args.results.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps({"rows": ordered}, indent=2) + "\n")
    (args.results / "gate_calibration.md").write_text(
        "# The parity gate on a real fine-tune, right and wrong exports\n\n"
        "`python benchmarks/gate_calibration.py`: SmolLM2-135M-Instruct (its weights came stored on a 4-bit grid, "
        "Q4_1) + a QLoRA adapter trained by `lora-export train` on the code task. Worst mean KL and top-1 are over "
        "the three parity shapes, against the model as trained; each verdict is the target's gate as shipped when "
        "this ran. The cases are described in the script's docstring.\n\n" + markdown(ordered))
    return 0


if __name__ == "__main__":
    sys.exit(main())
