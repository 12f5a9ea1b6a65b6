"""QLoRA training memory with and without activation (gradient) checkpointing, through the real CLI.

    python benchmarks/train_memory.py                          # 135M Llama shape, sequence 512, batch 1, 8 steps
    python benchmarks/train_memory.py --model tiny --max-length 128 --skip-plain   # a smoke test, not a measurement

The base is the 135M Llama shape of benchmarks/export_scale.py (hidden 576, intermediate 1536, 30 layers, 9 heads /
3 KV heads, vocab 49152, tied embeddings; seeded random normal weights, cached in --work). The data are text records
longer than the sequence, so every sequence is exactly --max-length tokens (loss on all of them).

Each run is a fresh process, measured from outside:
- `lora-export train ... -v` (checkpointing on, the default) and `lora-export train ... --no-gradient-checkpointing`;
- the plain PEFT + transformers Trainer script of benchmarks/train_vs_peft.py (`child_plain`), with and without
  `prepare_model_for_kbit_training(use_gradient_checkpointing=True)`, on the same base, data and settings
  (NF4 + double quant, rank 8 on all linear layers, AdamW, lr 2e-4);
each under glibc's default allocator (what a user gets), and again with MALLOC_MMAP_THRESHOLD_=131072, which
makes every allocation of 128 KiB or more a mapping of its own, returned to the system when freed: RSS then
follows the live tensors instead of what glibc's heap keeps after a free.

See WHAT for what each figure is. Goal: checkpointing at least halves the training part (ratio <= 0.5).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import export_scale  # the 135M shape, its base builder and cache, the CLI's path
from machine import describe

ROOT = HERE.parent
RESULTS = HERE / "results"
EMBEDDED = ROOT / "lora_export" / "embedded"
POLL_S = 0.02  # the process tree's RSS
ANON_POLL_S = 0.005  # the process's own anonymous RSS during training
GOAL = 0.5  # training part with checkpointing / without
START, STEP = "TRAIN-MEMORY-START", "TRAIN-MEMORY-STEP"  # the plain script's markers on stderr
WHAT = ("MB = 10^6 bytes. Peak RSS: the process's own exact peak over the whole run (VmHWM). RSS at training start: "
        "the process's RSS when it says training begins (our stage line `training N steps ...`, the plain script's "
        "on_train_begin marker), after the 4-bit model is loaded and LoRA attached; at that moment its peak is reset "
        "(5 written to /proc/PID/clear_refs), so the training peak is VmHWM read afterwards: exact, not polled. "
        "Training part = training peak - RSS at training start: the activations kept for the backward pass, the "
        "logits and loss buffers, the LoRA gradients and AdamW state, and what the allocator keeps; it also counts "
        "pages of the memory-mapped checkpoint that training touches again (the loader keeps the safetensors file "
        "mapped; those pages are file-backed and reclaimable). Anonymous training part: the process's RssAnon polled "
        f"every {ANON_POLL_S * 1000:.0f} ms during training, peak minus its value at training start (no file-backed "
        "pages; a polled peak can only be lower than the true one). Step time: the "
        "interval between consecutive step lines (our `step k/N: loss` lines shown live by -v, the plain "
        "script's on_step_end marker), the first step excluded; the fastest one is the least disturbed by other jobs "
        "on the machine, and the step-time cost of checkpointing is the ratio of the fastest steps.")
ALLOCATORS = {"glibc default": {}, "MALLOC_MMAP_THRESHOLD_=131072": {"MALLOC_MMAP_THRESHOLD_": "131072"}}


def _status_kb(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))
    except (OSError, StopIteration, ValueError):
        return None


class Sampler(threading.Thread):
    """Polls the summed RSS of a process and its descendants, and the process's own VmHWM; ``mark()`` resets that
    peak (Linux: writing 5 to /proc/PID/clear_refs) when training starts, so that the VmHWM read afterwards is the
    exact peak of training alone."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.done, self.lock = pid, threading.Event(), threading.Lock()
        self.samples: list[tuple[float, int]] = []
        self.hwm_before = self.hwm_after = 0  # bytes: the process's peak before / since the mark
        self.marked_at, self.rss_at_mark, self.reset_ok = None, None, False
        self.anon_at_mark, self.anon_peak = None, 0  # bytes: RssAnon at the mark, its polled peak since

    def _read_hwm(self) -> None:
        hwm = (_status_kb(self.pid, "VmHWM") or 0) * 1024
        if self.marked_at is None:
            self.hwm_before = max(self.hwm_before, hwm)
        else:
            self.hwm_after = max(self.hwm_after, hwm)

    def mark(self) -> None:
        with self.lock:
            self._read_hwm()  # the peak up to now (loading), exactly
            try:
                with open(f"/proc/{self.pid}/clear_refs", "w") as f:
                    f.write("5")
                self.reset_ok = True
            except OSError:
                pass
            self.rss_at_mark = (_status_kb(self.pid, "VmRSS") or 0) * 1024
            self.anon_at_mark = self.anon_peak = (_status_kb(self.pid, "RssAnon") or 0) * 1024
            self.marked_at = time.perf_counter()
        threading.Thread(target=self._poll_anon, daemon=True).start()

    def _poll_anon(self) -> None:
        while not self.done.is_set():
            anon = _status_kb(self.pid, "RssAnon")
            if anon is None:  # the process has exited
                return
            self.anon_peak = max(self.anon_peak, anon * 1024)
            time.sleep(ANON_POLL_S)

    def run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self.done.is_set():
            with self.lock:
                try:
                    procs = [root, *root.children(recursive=True)]
                except psutil.Error:
                    procs = []
                total = 0
                for p in procs:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        continue
                if total:
                    self.samples.append((time.perf_counter(), total))
                    self._read_hwm()
            self.done.wait(POLL_S)


def measure(label: str, cmd: list[str], start_re: str, step_re: str, log: Path, env: dict) -> dict:
    """Run ``cmd``; its memory, with the peak reset when its start line appears, and the times of its step lines
    (both read live from its stderr)."""
    load = os.getloadavg()[0]
    print(f"[{dt.datetime.now():%H:%M:%S}] {label} (load average {load:.2f}): {shlex.join(cmd)}", file=sys.stderr,
          flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", **env}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=str(ROOT))
    sampler = Sampler(proc.pid)
    sampler.start()
    steps = []
    with open(log, "w") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        for line in proc.stderr:  # line by line as the process writes them
            now = time.perf_counter()
            f.write(line)
            if sampler.marked_at is None and re.search(start_re, line):
                sampler.mark()
            elif sampler.marked_at is not None and re.search(step_re, line):
                steps.append(now)
    rc = proc.wait()
    wall = time.perf_counter() - t0
    sampler.done.set()
    sampler.join()
    mb = 1e6
    row = {"command": shlex.join(cmd), "env": {k: v for k, v in env.items() if k.startswith("MALLOC_")},
           "exit_code": rc, "wall_s": wall, "log": str(log), "steps_seen": len(steps),
           "load_average_before": load, "load_average_after": os.getloadavg()[0],
           "peak_tree_rss_mb": max((r for _, r in sampler.samples), default=0) / mb}
    if sampler.marked_at is not None:
        row.update(
            peak_vmhwm_mb=max(sampler.hwm_before, sampler.hwm_after) / mb, load_peak_vmhwm_mb=sampler.hwm_before / mb,
            rss_at_training_start_mb=sampler.rss_at_mark / mb, training_peak_vmhwm_mb=sampler.hwm_after / mb,
            training_part_mb=(sampler.hwm_after - sampler.rss_at_mark) / mb, peak_reset=sampler.reset_ok,
            anon_at_training_start_mb=sampler.anon_at_mark / mb, anon_training_peak_mb=sampler.anon_peak / mb,
            anon_training_part_mb=(sampler.anon_peak - sampler.anon_at_mark) / mb,
            rss_after_start_mb=[round((r - sampler.rss_at_mark) / mb) for t, r in sampler.samples
                                if t >= sampler.marked_at][::10])  # every 200 ms, relative to the start
    if len(steps) >= 3:
        row["step_times_s"] = [b - a for a, b in zip(steps, steps[1:])]
        row["step_s"] = statistics.median(row["step_times_s"])
        row["fastest_step_s"] = min(row["step_times_s"])
    print(f"    exit {rc}, {wall:.0f} s; peak {row.get('peak_vmhwm_mb', float('nan')):.0f} MB, at training start "
          f"{row.get('rss_at_training_start_mb', float('nan')):.0f} MB, training peak "
          f"{row.get('training_peak_vmhwm_mb', float('nan')):.0f} MB (part "
          f"{row.get('training_part_mb', float('nan')):.0f} MB, anonymous "
          f"{row.get('anon_training_part_mb', float('nan')):.0f} MB), step {row.get('fastest_step_s', float('nan')):.2f} s "
          f"fastest, {row.get('step_s', float('nan')):.2f} s median",
          file=sys.stderr, flush=True)
    if rc != 0:
        print("\n".join(log.read_text(errors="replace").splitlines()[-20:]), file=sys.stderr)
    return row


def make_data(path: Path, base: Path, max_length: int, records: int) -> Path:
    """Text records of the embedded demo sentences, each longer than max_length tokens of the base's tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base))
    sentences = [json.loads(line)["prompt"].split("Sentence: ", 1)[-1].split("\n")[0]
                 for line in (EMBEDDED / "demo" / "train.jsonl").read_text().splitlines()]
    lines, i = [], 0
    for _ in range(records):
        text = ""
        while len(tok(text, add_special_tokens=False)["input_ids"]) <= max_length + 8:
            text += sentences[i % len(sentences)] + " "
            i += 1
        lines.append(json.dumps({"text": text.strip()}))
    path.write_text("\n".join(lines) + "\n")
    return path


def plain_child(base: str, data: str, out: str, steps: int, batch: int, max_length: int, checkpointing: bool) -> None:
    """The plain PEFT + Trainer script of train_vs_peft.py, printing when training starts and each step ends."""
    from transformers import TrainerCallback

    from train_vs_peft import child_plain, step_timer

    class Markers(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            print(START, file=sys.stderr, flush=True)

        def on_step_end(self, args, state, control, **kw):
            print(f"{STEP} {state.global_step}", file=sys.stderr, flush=True)

    child_plain(base, out, step_timer(), data=Path(data), steps=steps, batch_size=batch, max_length=max_length,
                gradient_checkpointing=checkpointing, callbacks=[Markers()])


def markdown(result: dict) -> str:
    nan = float("nan")
    lines = [f"# QLoRA training memory: activation checkpointing ({result['label']}, sequence {result['max_length']})", "",
             f"Machine: {result['machine']}; run {result['run_at']}. {result['params'] / 1e6:.1f}M parameters, "
             f"batch {result['batch_size']}, {result['steps']} steps, NF4 + double quant, rank 8 on all linear layers, "
             "AdamW, lr 2e-4. Each run a fresh process, one run each. 1-minute load average before each run: "
             + ", ".join(f"{r['load_average_before']:.1f}" for r in result["runs"])
             + " (the previous run counts in it: this benchmark alone keeps it near 2 on 2 cores; well above that, "
             "other jobs shared the machine and step times are noisy).", "",
             f"Command: `{result['command']}`", "",
             "| run | allocator | peak RSS MB | RSS at training start MB | training peak MB | training part MB "
             "| anonymous training part MB | step s (fastest) | step s (median) | exit |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["runs"]:
        lines.append(f"| {r['name']} | {r['allocator']} | {r.get('peak_vmhwm_mb', nan):.0f} | "
                     f"{r.get('rss_at_training_start_mb', nan):.0f} | {r.get('training_peak_vmhwm_mb', nan):.0f} | "
                     f"{r.get('training_part_mb', nan):.0f} | {r.get('anon_training_part_mb', nan):.0f} | "
                     f"{r.get('fastest_step_s', nan):.2f} | {r.get('step_s', nan):.2f} | {r['exit_code']} |")
    lines.append("")
    for s in result["summary"]:
        lines.append(f"- {s['who']}, {s['allocator']}: checkpointing takes the training part from "
                     f"{s['training_part_off_mb']:.0f} MB to {s['training_part_on_mb']:.0f} MB (ratio "
                     f"{s['training_part_ratio']:.2f}; goal <= {GOAL}: {'met' if s['goal_met'] else 'MISSED'}), the "
                     f"anonymous training part from {s['anon_part_off_mb']:.0f} MB to {s['anon_part_on_mb']:.0f} MB "
                     f"(ratio {s['anon_part_ratio']:.2f}: {'met' if s['anon_goal_met'] else 'MISSED'}) and the peak RSS "
                     f"from {s['peak_off_mb']:.0f} MB to {s['peak_on_mb']:.0f} MB; the fastest step takes "
                     f"{s['step_ratio']:.2f}x as long.")
    lines += ["", result["what"], ""]
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--plain":
        b, d, o, steps, batch, length, ckpt = sys.argv[2:9]
        plain_child(b, d, o, int(steps), int(batch), int(length), ckpt == "1")
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="135m", choices=["135m", "tiny"])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "lora-export-scale")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    ap.add_argument("--skip-plain", action="store_true", help="only our runs")
    a = ap.parse_args()
    if a.steps < 4 or a.steps >= 20:  # the CLI logs every step below 20 steps; 3 intervals at least for a median
        ap.error("--steps must lie in [4, 19]")
    base, params = export_scale.ensure_base(a.work, a.model)
    work = a.work / a.model / "train-memory"
    work.mkdir(parents=True, exist_ok=True)
    data = make_data(work / "data.jsonl", base, a.max_length, records=a.steps * a.batch_size + 2)
    shared = ["--steps", str(a.steps), "--batch-size", str(a.batch_size), "--max-length", str(a.max_length),
              "--rank", "8", "--alpha", "16", "--lr", "2e-4"]
    cli = export_scale.lora_export_cmd()
    ours = (rf"\] training {a.steps} steps", rf"step \d+/{a.steps}: loss")
    runs = []
    for allocator, env in ALLOCATORS.items():
        tag = "default" if not env else "mmap"
        for on in (True, False):
            name = "lora-export train" + ("" if on else " --no-gradient-checkpointing")
            out = work / f"ours-{'on' if on else 'off'}"
            shutil.rmtree(out, ignore_errors=True)
            cmd = [*cli, "train", "-v", "--base", str(base), "--data", str(data), "--out", str(out), *shared,
                   *([] if on else ["--no-gradient-checkpointing"])]
            runs.append({"name": name, "who": "lora-export train", "checkpointing": on, "allocator": allocator,
                         **measure(f"{name} [{allocator}]", cmd, *ours, work / f"{out.name}-{tag}.log", env)})
            shutil.rmtree(out, ignore_errors=True)
        if a.skip_plain:
            continue
        for on in (True, False):
            name = f"plain PEFT + Trainer (train_vs_peft.py), checkpointing {'on' if on else 'off'}"
            with tempfile.TemporaryDirectory(dir=work) as tmp:
                cmd = [sys.executable, __file__, "--plain", str(base), str(data), str(Path(tmp) / "o"), str(a.steps),
                       str(a.batch_size), str(a.max_length), "1" if on else "0"]
                runs.append({"name": name, "who": "plain PEFT + Trainer", "checkpointing": on, "allocator": allocator,
                             **measure(f"{name} [{allocator}]", cmd, START, rf"{STEP} \d+",
                                       work / f"plain-{'on' if on else 'off'}-{tag}.log", env)})

    ok = all(r["exit_code"] == 0 and "training_part_mb" in r and "step_s" in r for r in runs)
    summary = []
    for who in dict.fromkeys(r["who"] for r in runs):
        for allocator in ALLOCATORS:
            on, off = (next(r for r in runs if (r["who"], r["allocator"], r["checkpointing"]) == (who, allocator, c))
                       for c in (True, False))
            if not ok:
                continue
            ratio = on["training_part_mb"] / off["training_part_mb"]
            anon = on["anon_training_part_mb"] / off["anon_training_part_mb"]
            summary.append({"who": who, "allocator": allocator, "training_part_on_mb": on["training_part_mb"],
                            "training_part_off_mb": off["training_part_mb"], "training_part_ratio": ratio,
                            "goal": GOAL, "goal_met": ratio <= GOAL, "anon_part_on_mb": on["anon_training_part_mb"],
                            "anon_part_off_mb": off["anon_training_part_mb"], "anon_part_ratio": anon,
                            "anon_goal_met": anon <= GOAL, "peak_on_mb": on["peak_vmhwm_mb"],
                            "peak_off_mb": off["peak_vmhwm_mb"],
                            "step_ratio": on["fastest_step_s"] / off["fastest_step_s"]})
    defaults = {"--model": "135m", "--steps": 8, "--batch-size": 1, "--max-length": 512}
    given = {"--model": a.model, "--steps": a.steps, "--batch-size": a.batch_size, "--max-length": a.max_length}
    result = {"model": a.model, "label": export_scale.MODEL_LABELS[a.model], "shape": export_scale.SHAPES[a.model],
              "params": params, "max_length": a.max_length, "batch_size": a.batch_size, "steps": a.steps,
              "machine": describe(), "run_at": dt.datetime.now().isoformat(timespec="seconds"),
              "command": "python benchmarks/train_memory.py" + "".join(
                  f" {k} {v}" for k, v in given.items() if v != defaults[k]) + (" --skip-plain" if a.skip_plain else ""),
              "what": WHAT, "goal": f"training part with checkpointing / without <= {GOAL}", "summary": summary,
              "runs": runs}
    a.out_dir.mkdir(parents=True, exist_ok=True)
    (a.out_dir / "train_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    (a.out_dir / "train_memory.md").write_text(markdown(result))
    print(markdown(result))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
