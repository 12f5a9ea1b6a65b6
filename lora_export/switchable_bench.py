"""Latency of a switchable export: the base graph with no adapter active, with each adapter active, and (when
given) a merged export of one adapter; the time to switch adapters between generations; adapter file sizes.

Decode and prompt-pass times come from ``latency.measure`` (variants interleaved, the order rotating each round,
paired per-round ratios with a bootstrap interval). Switching is timed two ways: ONNX Runtime (a new RunOptions
with another loaded LoraAdapter active) and onnxruntime-genai (``Generator.set_active_adapter`` on a new
generator, the adapters loaded once), each against one decode step.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import latency
from .base import check_base, load_tokenizer
from .errors import BadInput
from .export import BACKENDS
from .exportdir import adapters_of, check_base_unchanged, locate
from .isolate import run_in_child
from .manifests import EXPORT_MANIFEST, SWITCHABLE, read_export_manifest
from .merge import merge
from .outputs import scratch, staged
from .progress import Progress, quiet
from .prompts import bench_prompt
from .quantized_base import plain_base
from .targets import parse_target

NO_ADAPTER = "no adapter"


@dataclass(frozen=True)
class SwitchBench:
    rounds: int
    new_tokens: int
    prompt_len: int
    decode_ms: dict  # variant -> median ms per decode step
    prompt_ms: dict  # variant -> median ms of the prompt pass
    decode_ratio: dict  # variant -> latency.RatioStats against NO_ADAPTER (and "vs merged" where there is one)
    switch_ms: dict  # "onnxruntime" / "onnxruntime-genai" -> median ms to switch the active adapter
    load_ms: dict  # adapter -> ms to load its file (ONNX Runtime LoraAdapter)
    adapter_bytes: dict  # adapter -> file size
    base_bytes: int  # model.onnx + model.onnx.data
    within_budget: bool  # every adapter's decode <= max_ratio x the base's
    max_ratio: float

    def to_dict(self) -> dict:
        return asdict(self)

    def markdown(self) -> str:
        return markdown(self)


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return float(np.median(times))


def bench(export_dir: Path, prompt: list[int], merged_dir: Path | None = None, rounds: int = 20,
          new_tokens: int = 32, max_ratio: float = 1.10, providers=("CPUExecutionProvider",),
          progress: Progress = quiet):
    from .runtime import OrtCausalLM, import_onnxruntime, run_options_for

    export_dir = Path(export_dir)
    manifest = read_export_manifest(export_dir)
    if manifest.graph != SWITCHABLE:
        raise BadInput.one(str(export_dir), "not a switchable export", "pass a directory written by --switchable")
    files = {e.name: export_dir / e.file for e in manifest.adapters}
    models = {NO_ADAPTER: OrtCausalLM(export_dir, providers)}
    models.update({name: OrtCausalLM(export_dir, providers, adapter=path) for name, path in files.items()})
    if merged_dir is not None:
        models[f"merged {next(iter(files))}"] = OrtCausalLM(merged_dir, providers)
    progress(f"timing {', '.join(models)}: {rounds} interleaved rounds of a {len(prompt)}-token prompt + "
             f"{new_tokens} tokens")
    samples = latency.measure(models, prompt, new_tokens, rounds)
    decode = {n: float(np.median(s[1])) for n, s in samples.items()}
    prompt_ms = {n: float(np.median(s[0])) for n, s in samples.items()}
    ratios = {n: asdict(latency.ratio_stats(samples[n][1], samples[NO_ADAPTER][1])) for n in models if n != NO_ADAPTER}
    merged = next((n for n in models if n.startswith("merged ")), None)
    if merged:
        for n in files:
            ratios[f"{n} vs merged"] = asdict(latency.ratio_stats(samples[n][1], samples[merged][1]))

    ort = import_onnxruntime()
    progress("timing adapter loads and switches")
    load_ms = {n: _median_ms(lambda p=p: run_options_for(ort, p), 5) for n, p in files.items()}
    loaded = [run_options_for(ort, p)[1] for p in files.values()]
    state = {"i": 0}

    def ort_switch():
        options = ort.RunOptions()
        options.add_active_adapter(loaded[state["i"] % len(loaded)])
        state["i"] += 1

    switch = {"onnxruntime": _median_ms(ort_switch, 50)}
    genai = _genai_switch_ms(export_dir, files)
    if genai is not None:
        switch["onnxruntime-genai"] = genai
    base_bytes = sum(p.stat().st_size for p in export_dir.glob("model.onnx*"))
    reference = decode[merged] if merged else decode[NO_ADAPTER]
    return SwitchBench(rounds=rounds, new_tokens=new_tokens, prompt_len=len(prompt), decode_ms=decode,
                       prompt_ms=prompt_ms, decode_ratio=ratios, switch_ms=switch, load_ms=load_ms,
                       adapter_bytes={n: p.stat().st_size for n, p in files.items()}, base_bytes=base_bytes,
                       within_budget=all(decode[n] <= max_ratio * reference for n in files), max_ratio=max_ratio)


def _genai_switch_ms(export_dir: Path, files: dict) -> float | None:
    """Median ms of ``set_active_adapter`` on a fresh generator (the adapters loaded once), alternating adapters."""
    try:
        import onnxruntime_genai as og
    except ImportError:
        return None
    model = og.Model(str(export_dir))
    adapters = og.Adapters(model)
    for name, path in files.items():
        adapters.load(str(path), name)
    names, times = list(files), []
    for i in range(30):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=16, do_sample=False)
        generator = og.Generator(model, params)
        t0 = time.perf_counter()
        generator.set_active_adapter(adapters, names[i % len(names)])
        times.append((time.perf_counter() - t0) * 1000)
        del generator
    return float(np.median(times))


def markdown(r: SwitchBench) -> str:
    lines = [f"## Switchable adapters: {r.rounds} interleaved rounds, {r.prompt_len}-token prompt + {r.new_tokens} "
             "decode steps", "", "| variant | decode ms/token | prompt pass ms | decode ratio (95% CI) |",
             "|---|---|---|---|"]
    for n, ms in r.decode_ms.items():
        ratio = r.decode_ratio.get(n)
        shown = f"{ratio['median']:.3f} ({ratio['ci_low']:.3f}-{ratio['ci_high']:.3f})" if ratio else "1 (reference)"
        lines.append(f"| {n} | {ms:.3f} | {r.prompt_ms[n]:.2f} | {shown} |")
    for n, ratio in r.decode_ratio.items():
        if n.endswith(" vs merged"):
            lines.append(f"| {n} | | | {ratio['median']:.3f} ({ratio['ci_low']:.3f}-{ratio['ci_high']:.3f}) |")
    step = r.decode_ms[NO_ADAPTER]
    lines += ["", "| switch the active adapter | median ms | x one decode step |", "|---|---|---|"]
    lines += [f"| {k} | {v:.2g} | {v / step:.1e} |" for k, v in r.switch_ms.items()]
    lines += ["", "(A switch: a new RunOptions with another loaded adapter active, or Generator.set_active_adapter; "
              "binding the adapter's tensors on each run is part of the decode times above.)"]
    lines += ["", "| adapter file | bytes | x base graph ({:,} bytes) | load ms |".format(r.base_bytes), "|---|---|---|---|"]
    lines += [f"| {n} | {b:,} | {b / r.base_bytes:.4f} | {r.load_ms[n]:.2f} |" for n, b in r.adapter_bytes.items()]
    base = next((n for n in r.decode_ms if n.startswith("merged ")), NO_ADAPTER)
    lines += ["", f"Budget: an active adapter's decode <= {r.max_ratio:g} x the base's "
              f"({'the merged export: the base graph' if base != NO_ADAPTER else 'no adapter active'}): "
              f"{'met' if r.within_budget else 'MISSED'}."]
    return "\n".join(lines) + "\n"


def write_reports(r: SwitchBench, json_path: Path, md_path: Path) -> None:
    json_path.write_text(json.dumps(r.to_dict(), indent=2) + "\n")
    md_path.write_text(markdown(r))


def _merged_checkpoint(export_dir: Path, manifest, base: Path, work: Path, base_sha: dict,
                       progress: Progress = quiet) -> Path:
    """The first adapter merged into the export's merge base (fp32). Runs in a child process (torch)."""
    adapters, _ = adapters_of(manifest.adapters, export_dir, base, base_sha)
    plain = plain_base(base, work, progress)
    return merge(plain, adapters[:1], work / "checkpoint", manifest.merge_base, (1.0,)).checkpoint


def bench_export(export_dir: Path, manifest, json_path: Path | None, rounds: int, new_tokens: int,
                 providers, progress: Progress = quiet) -> SwitchBench:
    """`lora-export bench` on a switchable export: builds (once) the first adapter's merged graph into
    EXPORT_DIR/bench-merged, then times every variant; writes bench.json and bench.md."""
    target = parse_target(manifest.target, f"{export_dir / EXPORT_MANIFEST}:target")
    base = check_base(locate(manifest.base, export_dir, "base model"))
    base_sha = check_base_unchanged(base, manifest)
    merged = export_dir / "bench-merged"
    if not (merged / "model.onnx").is_file():
        progress(f"building the merged graph of {manifest.adapters[0].name} to compare against")
        with staged(merged) as tmp, scratch(merged, "work") as work:
            checkpoint = run_in_child(_merged_checkpoint, export_dir, manifest, base, work, base_sha,
                                      progress=progress)
            BACKENDS[target.backend].build(checkpoint, tmp, target, tmp / "build.log")
    prompt = bench_prompt(load_tokenizer(base))
    r = bench(export_dir, prompt, merged_dir=merged, rounds=rounds, new_tokens=new_tokens,
              max_ratio=target.latency.max_ratio if target.latency.max_ratio else 1.10,
              providers=tuple(providers) if providers else target.execution_providers, progress=progress)
    write_reports(r, Path(json_path) if json_path else export_dir / "bench.json", export_dir / "bench.md")
    return r
