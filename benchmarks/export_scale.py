"""The whole `lora-export export` command as users run it, at size: wall time and peak RSS of the process tree.

    python benchmarks/export_scale.py                          # 135M and 1.1B Llama shapes, fp32 and int4
    python benchmarks/export_scale.py --models 135m --targets ort-cpu-fp32
    python benchmarks/export_scale.py --work /data/scale --out-dir benchmarks/results

Bases are built from configs with seeded random normal weights (never all-zero; norms are ones), saved as
fp32 safetensors with the embedded base's tokenizer (its ids are < 2048, so they fit any vocab), and cached
in the work dir (default /tmp/lora-export-scale):
- 135m: the 135M Llama shape of decode_vs_peers.py (hidden 576, 30 layers, 9 heads / 3 KV heads,
  intermediate 1536, vocab 49152, tied embeddings);
- 1.1b: TinyLlama-1.1B's shape (hidden 2048, 22 layers, 32 heads / 4 KV heads, intermediate 5632, vocab 32000,
  untied); its fp32 weights exceed 2 GB, so the ONNX export keeps them as external data.

Per model, every step is a subprocess typed as a user would, its stdout/stderr logged to WORK/logs/:
1. `lora-export train` (a 3-step QLoRA adapter on the embedded demo data);
2. the merged checkpoint, once, with the library (lora_export.merge.merge), for the reference point;
3. per target: onnxruntime-genai's builder alone on that merged checkpoint (the reference point), then
   `lora-export export --base B --adapter A --target T --out OUT`;
4. after the fp32 export: `lora-export validate OUT`, `lora-export bench OUT --rounds 10`, then the export
   directory is moved to a sibling with another name and validated again there (it must still pass).

Each command is measured whole: wall time from start to exit, and the peak over time of the summed RSS of
the process and all its descendants (recursive), polled every 25 ms by a sampler thread (psutil); also the
largest single-process RSS seen and the largest VmHWM (a process's own exact peak) read while polling.
fp32 weight bytes = 4 x parameter count. MB = 10^6 bytes throughout. Results: OUT_DIR/export_scale.{json,md}
(entries for models not run this time are kept from an earlier run, each with its own machine line).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
EMBEDDED = ROOT / "lora_export" / "embedded"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
LLAMA31_8B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                  intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False, max_position_embeddings=131072,
                  rope_theta=500000.0, rms_norm_eps=1e-5,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192})
BUILDER_ALONE_X = 2.92  # the builder alone's peak tree RSS over the fp32 weight bytes (int4, 8b-2l; see run_model)
BF16_SHARDED = {"8b", "8b-2l"}  # written in bf16, tensor by tensor, in shards of at most SHARD_BYTES, as published
SHARD_BYTES = 5 * 10**9
SHAPES = {
    "135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                 intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048),
    "1.1b": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                 intermediate_size=5632, vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=2048),
    # Llama-3.1-8B's config, and the same cut to 2 layers (about 1.5B parameters); bf16 checkpoints in 5 GB shards
    "8b": dict(LLAMA31_8B),
    "8b-2l": dict(LLAMA31_8B, num_hidden_layers=2),
    # hidden: a smoke test of this script, not a measurement
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                 intermediate_size=176, vocab_size=2048, tie_word_embeddings=True, max_position_embeddings=512),
}
MODEL_LABELS = {"135m": "Llama 135M shape", "1.1b": "TinyLlama-1.1B shape", "tiny": "tiny Llama (smoke test)",
                "8b": "Llama-3.1-8B shape", "8b-2l": "Llama-3.1-8B widths, 2 layers"}
TARGETS = ("ort-cpu-fp32", "ort-cpu-int4")
TRAIN_FLAGS = ["--steps", "3", "--rank", "16", "--alpha", "32", "--lr", "1e-2", "--batch-size", "2",
               "--max-length", "48"]
BENCH_ROUNDS = 10
POLL_S = 0.025
# Goals (figures are compared to them, never assumed): export peak tree RSS / fp32 weight bytes per model,
# export wall / builder-alone wall, validate peak tree RSS / fp32 weight bytes.
EXPORT_RSS_GOAL = {"135m": 2.2, "1.1b": 1.6}
EXPORT_WALL_GOAL = 3.0
VALIDATE_RSS_GOAL = 1.3
WHAT = ("whole command, every process it starts, peak of the process tree (summed RSS of the process and all its "
        f"descendants, polled every {POLL_S * 1000:.0f} ms); wall time from start to exit")

_T0 = time.time()


def say(msg: str) -> None:
    print(f"[{dt.datetime.now():%H:%M:%S} +{time.time() - _T0:6.0f}s] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- measuring

class TreeSampler(threading.Thread):
    """Polls the summed RSS of a process and all its descendants; keeps the maxima."""

    def __init__(self, pid: int, interval: float = POLL_S, disk: Path | None = None):
        super().__init__(daemon=True)
        self.pid, self.interval, self.disk = pid, interval, disk
        self.free0 = self.min_free = _free_bytes(disk)
        self.done = threading.Event()
        self.peak_tree = self.peak_single = self.peak_hwm = 0
        self.peak_at_s, self.peak_breakdown, self.max_processes, self.samples = 0.0, [], 0, 0
        self.series: list[tuple[float, int]] = []  # (seconds since start, tree RSS): for the peak of each stage
        self.t0 = time.perf_counter()

    def run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self.done.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:  # the root has exited
                procs = []
            rows = []
            for p in procs:
                try:
                    rows.append((p, p.memory_info().rss))
                except psutil.Error:
                    continue
                hwm = _vm_hwm_bytes(p.pid)  # (per process: also read for the children)
                if hwm:
                    self.peak_hwm = max(self.peak_hwm, hwm)
            if rows:
                total = sum(r for _, r in rows)
                self.series.append((time.perf_counter() - self.t0, total))
                self.samples += 1
                self.max_processes = max(self.max_processes, len(rows))
                self.peak_single = max(self.peak_single, max(r for _, r in rows))
                if total > self.peak_tree:
                    self.peak_tree = total
                    self.peak_at_s = time.perf_counter() - self.t0
                    self.peak_breakdown = [{"pid": p.pid, "cmd": _short_cmd(p), "rss_mb": r / 1e6} for p, r in rows]
            free = _free_bytes(self.disk)
            if free is not None:
                self.min_free = min(self.min_free, free)
            self.done.wait(self.interval)

    def peak_disk(self) -> int | None:
        """The most disk the command took at once: free space at its start less the least seen while it ran (the
        whole file system: anything else writing there counts too)."""
        return None if self.free0 is None else self.free0 - self.min_free


def _free_bytes(path: Path | None) -> int | None:
    if path is None:
        return None
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _vm_hwm_bytes(pid: int) -> int | None:
    """A process's own peak RSS since it was exec'd (VmHWM, Linux), as lora_export.latency.vm_hwm_mb reads it."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024
    except (OSError, StopIteration, ValueError):
        return None


def _short_cmd(p) -> str:
    try:
        cmd = p.cmdline()
    except Exception:
        return "?"
    return " ".join(Path(c).name if i == 0 else c for i, c in enumerate(cmd[:4]))[:100]


def measure(label: str, cmd: list[str], log: Path, weight_bytes: int, disk: Path | None = None) -> dict:
    """Run ``cmd`` to completion; its wall time, process-tree peak RSS and exit code. Output goes to ``log``."""
    say(f"{label}: {shlex.join(cmd)}")
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
        sampler = TreeSampler(proc.pid, disk=disk or log.parent)
        sampler.start()
        rc = proc.wait()
        wall = time.perf_counter() - t0
    sampler.done.set()
    sampler.join()
    row = {"command": shlex.join(cmd), "log": str(log), "exit_code": rc, "wall_s": wall,
           "peak_tree_rss_mb": sampler.peak_tree / 1e6, "peak_single_rss_mb": sampler.peak_single / 1e6,
           "peak_single_vmhwm_mb": sampler.peak_hwm / 1e6,
           "tree_rss_over_fp32_weights": sampler.peak_tree / weight_bytes,
           "peak_at_s": sampler.peak_at_s, "processes_at_peak": sampler.peak_breakdown,
           "max_processes": sampler.max_processes, "samples": sampler.samples,
           "stages": stage_peaks(log, sampler.series),
           "peak_extra_disk_mb": (sampler.peak_disk() or 0) / 1e6}
    say(f"{label}: exit {rc}, {wall:.1f} s, peak tree RSS {row['peak_tree_rss_mb']:.0f} MB "
        f"({row['tree_rss_over_fp32_weights']:.2f} x fp32 weights), largest process {row['peak_single_rss_mb']:.0f} MB")
    if rc != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        say(f"{label} FAILED (exit {rc}); log {log}, last lines:\n    " + "\n    ".join(tail))
    return row


def stage_peaks(log: Path, series: list[tuple[float, int]]) -> list[dict]:
    """The command's own progress lines ("[m:ss] what it does now", lora-export's clock) cut its run into stages;
    each stage's wall and the peak tree RSS sampled within it. The clocks differ by the interpreter's start-up
    (about a second), so a stage's figures are good to a second."""
    import re

    starts = []
    for line in log.read_text(errors="replace").splitlines():
        m = re.match(r"\[(\d+):(\d\d)\] (.*)", line)
        if m and not m.group(3).startswith("  "):  # indented lines are a stage's details
            starts.append((int(m.group(1)) * 60 + int(m.group(2)), m.group(3)[:90]))
    if not starts or not series:
        return []
    end = series[-1][0]
    bounds = [(0.0, "start-up: checks of the inputs")] + starts
    rows = []
    for (t0, what), (t1, _) in zip(bounds, bounds[1:] + [(end + 1, "")]):
        inside = [rss for t, rss in series if t0 <= t < t1]
        rows.append({"stage": what, "from_s": t0, "wall_s": min(t1, end) - t0,
                     "peak_tree_rss_mb": max(inside) / 1e6 if inside else None})
    return rows


def parity_of(path: Path) -> dict | None:
    try:
        p = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    total = (p.get("stages") or {}).get("total") or {}
    return {"passed": p.get("passed"), "failures": p.get("failures", []), "max_abs_diff": total.get("max_abs_diff"),
            "mean_kl": total.get("mean_kl"), "top1_agreement": total.get("top1_agreement"),
            "adapter_retention": p.get("adapter_retention")}


def manifest_of(out: Path) -> dict | None:
    try:
        m = json.loads((out / "export_manifest.json").read_text())
    except (OSError, ValueError):
        return None
    q = m.get("quantization") or {}
    keep = {k: q[k] for k in ("scheme", "median_survival", "min_survival") if k in q}
    if "erased" in q:
        keep["erased"] = len(q["erased"])
    return {"merge_base": m.get("merge_base"), "graph": m.get("graph"), "merged_modules": m.get("merged_modules"),
            "parity": m.get("parity"), "quantization": keep or None}


def files_of(out: Path) -> dict:
    """Sizes of the ONNX files at the top of an export (model.onnx and its external data, if any)."""
    if not out.is_dir():
        return {}
    return {p.name: p.stat().st_size for p in sorted(out.iterdir())
            if p.is_file() and (p.suffix in (".onnx", ".data") or p.name.endswith(".onnx.data"))}


# ---------------------------------------------------------------------------------------------- inputs

def lora_export_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "lora-export"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "lora_export.cli"]


def build_base(out: Path, model: str) -> None:
    """Child process: the base from its config, seeded normal weights (std 0.02; norms are ones), written tensor by
    tensor and never held whole: fp32 in one file as save_pretrained writes small models, or (BF16_SHARDED) bf16 in
    shards of at most SHARD_BYTES with an index, as 7-8B checkpoints are published. A tied lm_head is not stored."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_export.checkpoint import write_index
    from lora_export.tensorfile import NAMES, Writer

    dtype = torch.bfloat16 if model in BF16_SHARDED else torch.float32
    cfg = LlamaConfig(**SHAPES[model], bos_token_id=0, eos_token_id=1, pad_token_id=2,
                      dtype=str(dtype).removeprefix("torch."))
    cfg.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(cfg)
    params = list(skeleton.named_parameters())  # tied parameters appear once
    code = NAMES[str(dtype).removeprefix("torch.")]
    shards, current, size = [], [], 0
    limit = SHARD_BYTES if model in BF16_SHARDED else float("inf")
    for name, p in params:
        nbytes = p.numel() * dtype.itemsize
        if current and size + nbytes > limit:
            shards.append(current)
            current, size = [], 0
        current.append((name, code, tuple(p.shape)))
        size += nbytes
    shards.append(current)
    files = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    out.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    shapes = dict(params)
    weight_map = {}
    for file, declared in zip(files, shards):
        writer = Writer(out / file, declared)
        for name, _, shape in declared:
            t = (torch.randn(shape, generator=gen) * 0.02 if len(shape) == 2 else torch.ones(shape)).to(dtype)
            writer.write(name, t)
            weight_map[name] = file
            del t
        writer.close()
        print(f"wrote {file}", flush=True)
    if len(files) > 1:
        write_index(out, weight_map, {"total_size": sum((out / f).stat().st_size for f in files)})
    cfg.save_pretrained(str(out))
    for name in TOKENIZER_FILES:
        shutil.copy2(EMBEDDED / "base" / name, out / name)
    count = sum(p.numel() for p in shapes.values())
    (out / "params.json").write_text(json.dumps({"params": count, "tensors": sorted(shapes)}) + "\n")
    print(json.dumps({"params": count}))


def merge_child(base: str, adapter: str, out: str) -> None:
    """Child process: the merged fp32 checkpoint, as `lora-export export` makes it (same merge base)."""
    from lora_export.adapters import load_adapter
    from lora_export.merge import default_merge_base, merge

    a = load_adapter(Path(adapter), Path(base))
    merge_base = default_merge_base(a)
    merge(Path(base), [a], Path(out), merge_base)
    print(json.dumps({"merge_base": merge_base}))


def ensure_base(work: Path, model: str) -> tuple[Path, int]:
    base = work / model / "base"
    if not (base / "params.json").is_file():
        shutil.rmtree(base, ignore_errors=True)
        tmp = work / model / "base.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        say(f"{model}: building the base from its config (cached in {base})")
        log = work / "logs" / f"{model}-build-base.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as f:
            rc = subprocess.run([sys.executable, __file__, "--_build-base", str(tmp), model], stdout=f,
                                stderr=subprocess.STDOUT, cwd=str(ROOT)).returncode
        if rc != 0:
            raise RuntimeError(f"building the {model} base failed (exit {rc}); see {log}:\n"
                               + "\n".join(log.read_text(errors="replace").splitlines()[-15:]))
        tmp.rename(base)
    else:
        say(f"{model}: reusing the cached base {base}")
    return base, json.loads((base / "params.json").read_text())["params"]


def builder_cmd(merged: Path, out: Path, cache: Path, target_name: str) -> list[str]:
    """onnxruntime-genai's builder alone, with the precision and extra options lora_export passes it."""
    from lora_export.export.genai_builder import builder_args
    from lora_export.targets import load_target

    args = builder_args(merged, out, load_target(target_name))
    args[args.index("-c") + 1] = str(cache)
    return [sys.executable, "-m", "onnxruntime_genai.models.builder", *args]


# ---------------------------------------------------------------------------------------------- the run

def run_model(model: str, targets: list[str], work: Path, result: dict, save) -> None:
    """Measure every command for one model; its entry is in result['models'] from the first figure on."""
    mdir, logs = work / model, work / "logs"
    base, params = ensure_base(work, model)
    wbytes = 4 * params
    entry = {"model": model, "label": MODEL_LABELS[model], "shape": SHAPES[model], "params": params,
             "fp32_weight_bytes": wbytes, "base_files": files_of_base(base), "base_dir": str(base),
             "machine": machine_line(), "run_at": dt.datetime.now().isoformat(timespec="seconds"),
             "targets": targets, "commands": {}, "ratios": {}}
    result["models"][model] = entry
    cmds = entry["commands"]
    say(f"{model}: {params / 1e6:.1f}M params, fp32 weights {wbytes / 1e6:.0f} MB")
    for stale in ("adapter", "merged", "builder-cache", *[f"builder-{t}" for t in targets],
                  *[f"export-{t}" for t in targets], *[f"export-{t}-moved" for t in targets]):
        shutil.rmtree(mdir / stale, ignore_errors=True)
    cli = lora_export_cmd()

    adapter = mdir / "adapter"
    cmds["train"] = measure(f"{model} train", [*cli, "train", "--base", str(base), "--data",
                                               str(EMBEDDED / "demo" / "train.jsonl"), "--out", str(adapter),
                                               *TRAIN_FLAGS], logs / f"{model}-train.log", wbytes)
    save()
    if cmds["train"]["exit_code"] != 0 or not (adapter / "adapter_config.json").is_file():
        say(f"{model}: no adapter, so nothing else can be measured for this model")
        return

    # The builder alone loads the model whole: 17368 MB, 2.92x the fp32 weight bytes, for ort-cpu-int4 at Llama-3.1-8B
    # widths with 2 layers (results/export_scale-8b-2l-verified.md); at 8B that is ~93 GB. Where it cannot fit, neither
    # it nor the library merge it reads (32 GB of disk at 8B) runs, and the entry says why.
    from lora_export.memory import available

    free = available()
    if free is not None and BUILDER_ALONE_X * wbytes > free.bytes:
        entry["builder_alone"] = (f"not run: it loads the model whole, about {BUILDER_ALONE_X * wbytes / 1e9:.0f} GB "
                                  f"({BUILDER_ALONE_X}x the fp32 weight bytes, measured at 8b-2l), and "
                                  f"{free.bytes / 1e9:.1f} GB is available ({free.source})")
        say(f"{model} builder alone: {entry['builder_alone']}")
        targets_with_builder = []
    else:
        targets_with_builder = targets
    merged = mdir / "merged"
    if not targets_with_builder:
        have_merged = False
    else:
        cmds["merge"] = measure(f"{model} merge (library)", [sys.executable, __file__, "--_merge", str(base),
                                                         str(adapter), str(merged)], logs / f"{model}-merge.log", wbytes)
        save()
        have_merged = cmds["merge"]["exit_code"] == 0 and (merged / "config.json").is_file()

    for target in targets:
        ref = mdir / f"builder-{target}"
        cache = mdir / "builder-cache"
        try:
            cmd = builder_cmd(merged, ref, cache, target) if have_merged else None
        except Exception as e:  # e.g. an unknown target: the export below reports it in its own words
            say(f"{model} builder alone {target}: not run ({type(e).__name__}: {e})")
            cmd = None
        if cmd:
            shutil.rmtree(cache, ignore_errors=True)
            ref.mkdir(parents=True)
            row = measure(f"{model} builder alone {target}", cmd, logs / f"{model}-builder-{target}.log", wbytes)
            row["onnx_files"] = files_of(ref)
            cmds[f"builder {target}"] = row
            shutil.rmtree(cache, ignore_errors=True)
            shutil.rmtree(ref, ignore_errors=True)  # only its cost is wanted; keep the disk
            save()
        out = mdir / f"export-{target}"
        row = measure(f"{model} export {target}", [*cli, "export", "--base", str(base), "--adapter", str(adapter),
                                                   "--target", target, "--out", str(out)],
                      logs / f"{model}-export-{target}.log", wbytes)
        row["parity"] = parity_of(out / "parity.json")
        row["manifest"] = manifest_of(out)
        row["onnx_files"] = files_of(out)
        cmds[f"export {target}"] = row
        ref_row = cmds.get(f"builder {target}")
        if ref_row and ref_row["exit_code"] == 0 and row["exit_code"] == 0:
            entry["ratios"][f"export/builder wall {target}"] = row["wall_s"] / ref_row["wall_s"]
            entry["ratios"][f"export/builder tree RSS {target}"] = row["peak_tree_rss_mb"] / ref_row["peak_tree_rss_mb"]
        save()
        if target == "ort-cpu-fp32":
            after_fp32(model, out, cli, logs, wbytes, cmds)
            save()
    shutil.rmtree(merged, ignore_errors=True)


def after_fp32(model: str, out: Path, cli: list[str], logs: Path, wbytes: int, cmds: dict) -> None:
    """validate, bench, then move the export and validate it where it now lies."""
    if not (out / "export_manifest.json").is_file():
        say(f"{model}: no fp32 export, so validate, bench and the move are not measured")
        return
    cmds["validate ort-cpu-fp32"] = validate(f"{model} validate", out, cli, logs / f"{model}-validate.log", wbytes)
    (out / "bench.json").unlink(missing_ok=True)
    row = measure(f"{model} bench", [*cli, "bench", str(out), "--rounds", str(BENCH_ROUNDS)],
                  logs / f"{model}-bench.log", wbytes)
    try:
        b = json.loads((out / "bench.json").read_text())
        d = b["ratios"]["merged"]["decode"]
        row["bench"] = {"decode_ratio_median": d["median"], "decode_ratio_ci": [d["ci_low"], d["ci_high"]],
                        "verdict": b.get("verdict"), "within_budget": b.get("within_budget"),
                        "max_ratio": b.get("max_ratio"), "graphs_identical": b.get("graphs_identical"),
                        "decode_ms": {k: v["decode_ms_median"] for k, v in b.get("variants", {}).items()},
                        "variant_peak_rss_mb": b.get("peak_rss_mb")}
    except (OSError, ValueError, KeyError, TypeError):
        row["bench"] = None
    cmds["bench ort-cpu-fp32"] = row
    moved = out.parent / f"{out.name}-moved"
    shutil.rmtree(moved, ignore_errors=True)
    shutil.move(str(out), str(moved))
    say(f"{model}: moved {out} -> {moved}")
    row = validate(f"{model} validate (moved)", moved, cli, logs / f"{model}-validate-moved.log", wbytes)
    row["moved_to"] = str(moved)
    cmds["validate ort-cpu-fp32 (moved)"] = row


def validate(label: str, export_dir: Path, cli: list[str], log: Path, wbytes: int) -> dict:
    """`lora-export validate DIR` as typed; its verdict from the parity.json it rewrites in DIR (a file it
    did not rewrite counts as no verdict)."""
    report = export_dir / "parity.json"
    before = report.stat().st_mtime_ns if report.is_file() else None
    row = measure(label, [*cli, "validate", str(export_dir)], log, wbytes)
    fresh = report.is_file() and report.stat().st_mtime_ns != before
    row["parity"] = parity_of(report) if fresh else None
    return row


def files_of_base(base: Path) -> dict:
    return {p.name: p.stat().st_size for p in sorted(base.glob("*.safetensors"))}


def machine_line() -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from machine import describe  # beside this script

    try:
        import psutil

        ram = f", {psutil.virtual_memory().total / 2**30:.0f} GiB RAM"
    except Exception:
        ram = ""
    return f"{describe()}{ram}"


# ---------------------------------------------------------------------------------------------- report

def goal_text(value: float | None, goal: float | None) -> str:
    if goal is None:
        return "n/a"
    if value is None:
        return f"<= {goal:g}x: not measured"
    return f"<= {goal:g}x: {'met' if value <= goal else '**MISSED**'}"


def verdict_text(row: dict) -> str:
    p = row.get("parity")
    if not p:
        return "—"
    if p.get("passed"):
        return "passed"
    return f"FAILED ({len(p.get('failures') or [])} checks)"


def goals_of(entry: dict) -> dict:
    """Each goal, the figure it is checked on, and met/missed; computed from the figures, never assumed."""
    model, cmds, out = entry["model"], entry["commands"], {}
    if model not in EXPORT_RSS_GOAL:
        return out
    for name, row in cmds.items():
        if name.startswith("export "):
            ok = row["exit_code"] == 0
            out[f"{name}: peak tree RSS / fp32 weights"] = {
                "goal": EXPORT_RSS_GOAL[model], "value": row["tree_rss_over_fp32_weights"] if ok else None}
            t = name.split(" ", 1)[1]
            out[f"{name}: wall / builder alone"] = {"goal": EXPORT_WALL_GOAL,
                                                    "value": entry["ratios"].get(f"export/builder wall {t}")}
        if name.startswith("validate "):
            out[f"{name}: peak tree RSS / fp32 weights"] = {
                "goal": VALIDATE_RSS_GOAL, "value": row["tree_rss_over_fp32_weights"] if row["exit_code"] == 0 else None}
    for g in out.values():
        g["met"] = None if g["value"] is None else g["value"] <= g["goal"]
    return out


def row_goal(model: str, name: str, row: dict, ratios: dict) -> str:
    if model not in EXPORT_RSS_GOAL:
        return "n/a (smoke test)"
    ok = row["exit_code"] == 0
    if name.startswith("export "):
        t = name.split(" ", 1)[1]
        return (f"RSS {goal_text(row['tree_rss_over_fp32_weights'] if ok else None, EXPORT_RSS_GOAL[model])}; "
                f"wall/builder {goal_text(ratios.get(f'export/builder wall {t}'), EXPORT_WALL_GOAL)}")
    if name.startswith("validate "):
        return f"RSS {goal_text(row['tree_rss_over_fp32_weights'] if ok else None, VALIDATE_RSS_GOAL)}"
    return ""


LABELS = {"train": "`lora-export train` (QLoRA, 3 steps)", "merge": "merge with the library (reference input)"}


def label_of(name: str) -> str:
    if name in LABELS:
        return LABELS[name]
    if name.startswith("builder "):
        return f"onnxruntime-genai builder alone, {name.split(' ', 1)[1]} (on the merged checkpoint)"
    if name.startswith("export "):
        return f"`lora-export export --target {name.split(' ', 1)[1]}`"
    if name == "validate ort-cpu-fp32":
        return "`lora-export validate` (fp32 export)"
    if name == "validate ort-cpu-fp32 (moved)":
        return "`lora-export validate` (fp32 export, after moving it)"
    if name == "bench ort-cpu-fp32":
        return f"`lora-export bench --rounds {BENCH_ROUNDS}` (fp32 export)"
    return name


def markdown(result: dict) -> str:
    lines = ["# `lora-export export` at size: the whole command", "",
             f"Each figure: {result['what']}. RSS / fp32 weight bytes: peak tree RSS over 4 x parameter count. "
             "MB = 10^6 bytes.", "",
             f"Goals: export peak tree RSS <= {EXPORT_RSS_GOAL['135m']:g}x the fp32 weight bytes on 135M and <= "
             f"{EXPORT_RSS_GOAL['1.1b']:g}x on 1.1B; export wall <= {EXPORT_WALL_GOAL:g}x onnxruntime-genai's builder "
             f"alone on the merged checkpoint (same target options); validate peak tree RSS <= {VALIDATE_RSS_GOAL:g}x "
             "(the fp32 weights are the largest single model it loads).", ""]
    for model, e in result["models"].items():
        cmds, ratios = e["commands"], e["ratios"]
        lines += [f"## {e['label']} ({e['params'] / 1e6:.1f}M params, fp32 weights {e['fp32_weight_bytes'] / 1e6:.0f} MB)",
                  "", f"Machine: {e['machine']}; run {e['run_at']}. Random-weight base built from a config, "
                  f"adapter from `lora-export train {' '.join(TRAIN_FLAGS)}`.", "",
                  "| command | wall s | peak tree RSS MB | largest process MB | RSS / fp32 weight bytes | exit | parity | goal |",
                  "|---|---:|---:|---:|---:|---:|---|---|"]
        for name, row in cmds.items():
            lines.append(f"| {label_of(name)} | {row['wall_s']:.1f} | {row['peak_tree_rss_mb']:.0f} | "
                         f"{row['peak_single_rss_mb']:.0f} | {row['tree_rss_over_fp32_weights']:.2f} | "
                         f"{row['exit_code']} | {verdict_text(row)} | {row_goal(model, name, row, ratios)} |")
        lines.append("")
        for t in e["targets"]:
            w = ratios.get(f"export/builder wall {t}")
            r = ratios.get(f"export/builder tree RSS {t}")
            if w is not None:
                lines.append(f"- {t}: export wall / builder-alone wall = {w:.2f}x "
                             f"({goal_text(w, EXPORT_WALL_GOAL) if model in EXPORT_RSS_GOAL else 'goal n/a'}); "
                             f"export peak tree RSS / builder-alone = {r:.2f}x")
            elif e.get("builder_alone"):
                lines.append(f"- {t}: export wall / builder-alone wall: not measured; the builder alone was "
                             f"{e['builder_alone']}")
            else:
                lines.append(f"- {t}: export wall / builder-alone wall: not measured (a command failed)")
        for name, row in cmds.items():
            if name.startswith("export ") and row.get("parity") and not row["parity"]["passed"]:
                lines.append(f"- {name} parity failures: " + "; ".join(row["parity"]["failures"][:5]))
            if name.startswith("export ") and row.get("onnx_files"):
                lines.append(f"- {name} files: " + ", ".join(f"{k} {v / 1e6:.0f} MB" for k, v in row["onnx_files"].items()))
        for name, row in cmds.items():
            if row.get("peak_extra_disk_mb") and (name.startswith("export ") or name.startswith("builder ")):
                lines.append(f"- {name}: peak extra disk {row['peak_extra_disk_mb']:.0f} MB")
        for name, row in cmds.items():
            if name.startswith("export ") and row.get("stages"):
                lines += ["", f"Stages of `{name}` (from its progress lines):", "",
                          "| from s | stage | wall s | peak tree RSS MB | / fp32 weight bytes |", "|---:|---|---:|---:|---:|"]
                lines += [f"| {st['from_s']:.0f} | {st['stage']} | {st['wall_s']:.0f} | "
                          + (f"{st['peak_tree_rss_mb']:.0f} | {st['peak_tree_rss_mb'] * 1e6 / e['fp32_weight_bytes']:.2f} |"
                             if st["peak_tree_rss_mb"] else "— | — |") for st in row["stages"]]
                lines.append("")
        b = (cmds.get("bench ort-cpu-fp32") or {}).get("bench")
        if b:
            lo, hi = b["decode_ratio_ci"]
            lines.append(f"- bench: decode merged/base median {b['decode_ratio_median']:.3f} (95% CI {lo:.3f}-{hi:.3f}), "
                         f"verdict {b['verdict']}, within budget {b['within_budget']}")
        moved = cmds.get("validate ort-cpu-fp32 (moved)")
        if moved:
            ok = moved["exit_code"] == 0 and (moved.get("parity") or {}).get("passed")
            lines.append(f"- validate after moving the export: exit {moved['exit_code']} "
                         f"({'passes' if ok else '**FAILS**'}; it must pass)")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", "--model", default="135m,1.1b",
                   help="comma-separated: 135m, 1.1b, 8b-2l (Llama-3.1-8B widths, 2 layers), 8b (Llama-3.1-8B)")
    p.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated (default {','.join(TARGETS)})")
    p.add_argument("--work", type=Path, default=Path("/tmp/lora-export-scale"),
                   help="cached bases, adapters, exports and logs (default /tmp/lora-export-scale)")
    p.add_argument("--out-dir", type=Path, default=None,
                   help="where export_scale.{json,md} go (default benchmarks/results; WORK for a tiny-only run)")
    args = p.parse_args()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    for m in models:
        if m not in SHAPES:
            p.error(f"unknown model {m!r} (choose from {', '.join(k for k in SHAPES if k != 'tiny')})")
    out_dir = args.out_dir or (args.work if set(models) == {"tiny"} else RESULTS)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "export_scale.json", out_dir / "export_scale.md"
    previous = {}
    if json_path.is_file():
        try:
            previous = json.loads(json_path.read_text()).get("models", {})
        except ValueError:
            previous = {}
    result = {"what": WHAT, "poll_interval_s": POLL_S, "machine": machine_line(),
              "goals": {"export_peak_tree_rss_over_fp32_weights": EXPORT_RSS_GOAL,
                        "export_wall_over_builder_alone": EXPORT_WALL_GOAL,
                        "validate_peak_tree_rss_over_fp32_weights": VALIDATE_RSS_GOAL},
              "models": {k: v for k, v in previous.items() if k not in models}}
    say(f"models {models}, targets {targets}, work {work}, results {json_path}; machine: {result['machine']}")

    def save() -> None:
        for e in result["models"].values():
            e["goals"] = goals_of(e)
        json_path.write_text(json.dumps(result, indent=2) + "\n")
        md_path.write_text(markdown(result))

    for model in models:
        try:
            run_model(model, targets, work, result, save)
        except Exception as e:  # keep going with the other models
            say(f"{model}: stopped by {type(e).__name__}: {e}")
        save()
    print(markdown(result))
    say(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--_build-base"]:
        build_base(Path(sys.argv[2]), sys.argv[3])
    elif sys.argv[1:2] == ["--_merge"]:
        merge_child(*sys.argv[2:5])
    else:
        sys.exit(main())
