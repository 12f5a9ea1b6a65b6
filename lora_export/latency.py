"""Latency: the merged export against the unadapted base export, on the same runtime, in one run.

Method: warm-up, then rounds in which the two variants alternate (A B, then B A) so that drift hits
both; each round times one prompt pass and a fixed number of greedy decode steps through the KV cache.
The verdict uses the per-round paired ratio merged/base and a bootstrap 95% confidence interval of its
median: zero overhead when the interval lies inside [0.98, 1.02] (or below it: merged faster); overhead
when the interval lies wholly above 1.02; otherwise, after one repeat with twice the rounds,
inconclusive rather than a guess.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .progress import Progress, quiet

ZERO_BAND = (0.98, 1.02)
PROMPT_LENGTHS = (16, 64, 256)  # prompt-pass latency is also reported at these fixed lengths


@dataclass(frozen=True)
class VariantStats:
    prompt_ms_median: float
    decode_ms_median: float  # per generated token
    decode_ms_p90: float
    decode_ms_p99: float
    tokens_per_s: float


@dataclass(frozen=True)
class RatioStats:
    median: float  # median of the per-round paired ratios merged/base
    ci_low: float  # bootstrap 95% confidence interval of that median
    ci_high: float
    q25: float  # spread of the per-round ratios themselves
    q75: float


@dataclass(frozen=True)
class BenchResult:
    prompt_len: int
    new_tokens: int
    rounds: int
    threads: int  # ONNX Runtime intra-op threads (0: its default)
    variants: dict  # name ("merged", "base", "unmerged") -> VariantStats
    ratios: dict  # name -> {"prompt": RatioStats, "decode": RatioStats} against "base"
    peak_rss_mb: dict  # name -> peak RSS of a fresh process that loads that variant alone and decodes (or None)
    verdict: str  # merged vs base: "zero overhead" | "overhead" | "inconclusive"
    max_ratio: float  # the target's latency budget for decode merged/base
    within_budget: bool
    graphs_identical: bool  # merged and base graphs differ only in weight bytes
    decode_samples: dict = field(default_factory=dict, repr=False)  # name -> per-round decode ms, for the plot
    prompt_ms_by_length: dict = field(default_factory=dict)  # name -> {prompt length: median prompt-pass ms}

    @property
    def merged(self) -> VariantStats:
        return self.variants["merged"]

    @property
    def base(self) -> VariantStats:
        return self.variants["base"]

    @property
    def prompt_ratio(self) -> RatioStats:
        return self.ratios["merged"]["prompt"]

    @property
    def decode_ratio(self) -> RatioStats:
        return self.ratios["merged"]["decode"]


def _stats(prompt_ms: list[float], decode_ms: list[float]) -> VariantStats:
    d = np.array(decode_ms)
    return VariantStats(float(np.median(prompt_ms)), float(np.median(d)), float(np.percentile(d, 90)),
                        float(np.percentile(d, 99)), float(1000.0 / np.median(d)))


def ratio_stats(a: list[float], b: list[float], resamples: int = 2000, seed: int = 0) -> RatioStats:
    r = np.array(a) / np.array(b)
    rng = np.random.default_rng(seed)
    medians = np.median(rng.choice(r, size=(resamples, r.size), replace=True), axis=1)
    return RatioStats(float(np.median(r)), float(np.percentile(medians, 2.5)), float(np.percentile(medians, 97.5)),
                      float(np.percentile(r, 25)), float(np.percentile(r, 75)))


def verdict(ratios: list[RatioStats], band: tuple[float, float] = ZERO_BAND) -> str:
    """Decide from paired ratios (prompt pass, decode): zero overhead, overhead, or inconclusive."""
    if any(r.ci_low > band[1] for r in ratios):
        return "overhead"
    if all(r.ci_high <= band[1] and (r.ci_low >= band[0] or r.ci_high < band[0]) for r in ratios):
        return "zero overhead"  # inside the band, or measurably faster: no overhead either way
    return "inconclusive"


def _time_round(model, prompt: list[int], new_tokens: int, prompt_repeats: int = 15) -> tuple[float, float]:
    """One round on one variant: median prompt-pass time, and median time per decode step (ms)."""
    ids = np.array([prompt], dtype=np.int64)
    mask = np.ones_like(ids)
    model.step(ids, mask, None)  # untimed: bring this variant's weights back into cache after the other ran
    passes = []
    for _ in range(prompt_repeats):
        t0 = time.perf_counter()
        logits, past = model.step(ids, mask, None)
        passes.append((time.perf_counter() - t0) * 1000)
    return float(np.median(passes)), time_decode(model, prompt, new_tokens, first=(logits, past))


def time_decode(model, prompt: list[int], new_tokens: int, first=None) -> float:
    """Median ms per greedy decode step through the KV cache, after a prompt pass (``first``, or run here)."""
    mask = np.ones((1, len(prompt)), dtype=np.int64)
    logits, past = first if first is not None else model.step(np.array([prompt], dtype=np.int64), mask, None)
    steps = []
    for _ in range(new_tokens):
        nxt = np.array([[int(np.argmax(logits[0, -1]))]], dtype=np.int64)
        mask = np.ones((1, mask.shape[1] + 1), dtype=np.int64)
        t0 = time.perf_counter()
        logits, past = model.step(nxt, mask, past)
        steps.append((time.perf_counter() - t0) * 1000)
    return float(np.median(steps))


def graph_structure(model_dir: Path) -> dict:
    """A graph's structure without its weight bytes: nodes (op type, domain, inputs, outputs, attributes),
    initializers (name, shape, type), graph inputs and outputs, opsets."""
    import onnx
    from onnx import helper

    m = onnx.load(str(Path(model_dir) / "model.onnx"), load_external_data=False)
    g = m.graph

    def attrs(n):
        return tuple(sorted((a.name, str(helper.get_attribute_value(a))) for a in n.attribute))

    return {"nodes": [(n.op_type, n.domain, tuple(n.input), tuple(n.output), attrs(n)) for n in g.node],
            "initializers": sorted((i.name, tuple(i.dims), i.data_type) for i in g.initializer),
            "inputs": [(v.name, str(v.type)) for v in g.input], "outputs": [(v.name, str(v.type)) for v in g.output],
            "opsets": sorted((o.domain, o.version) for o in m.opset_import)}


def graphs_identical(a: Path, b: Path) -> bool:
    """Zero overhead by construction: the same graph structure, only weight bytes may differ."""
    return graph_structure(a) == graph_structure(b)


def measure(models: dict, prompt: list[int], new_tokens: int, rounds: int, warmup: int = 2) -> dict:
    """name -> (prompt-pass ms per round, decode ms per round); the order of the variants rotates each round."""
    names = list(models)
    samples = {n: ([], []) for n in names}
    for _ in range(warmup):
        for n in names:
            _time_round(models[n], prompt, new_tokens)
    for r in range(rounds):
        for n in names[r % len(names):] + names[: r % len(names)]:
            p, d = _time_round(models[n], prompt, new_tokens)
            samples[n][0].append(p)
            samples[n][1].append(d)
    return samples


def vm_hwm_mb(pid: int | str = "self") -> float | None:
    """A process's own peak RSS since it was exec'd (VmHWM, Linux) in MB (10^6 bytes; /proc says kB = 1024
    bytes), or None where /proc cannot say."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024 / 1e6
    except (OSError, StopIteration):
        return None


def own_peak_rss_mb() -> float:
    """This process's own peak RSS since it started (exec'd). Linux's ru_maxrss is not that: a child
    inherits the RSS its parent had when it forked (measured: a 10 MB child of a 2 GB parent reports
    1.9 GB), so VmHWM is read where there is one."""
    import resource

    peak = vm_hwm_mb()
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


_PEAK_SCRIPT = """
import sys
from lora_export.latency import own_peak_rss_mb
from lora_export.runtime import OrtCausalLM, greedy
m = OrtCausalLM(sys.argv[1], sys.argv[2].split(","), threads=int(sys.argv[3]))
greedy(m, [int(t) for t in sys.argv[4].split(",")], int(sys.argv[5]))
print(own_peak_rss_mb())
"""


def peak_rss_mb(model_dir: Path, providers, threads: int, prompt: list[int], new_tokens: int) -> float:
    """Peak resident memory of a fresh process that loads one variant and generates: its own, undisturbed."""
    import subprocess
    import sys

    providers = [providers] if isinstance(providers, str) else list(providers)
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(model_dir), ",".join(providers), str(threads),
                          ",".join(map(str, prompt)), str(new_tokens)], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def prompt_pass_by_length(models: dict, prompt: list[int], rounds: int,
                          lengths: tuple[int, ...] = PROMPT_LENGTHS) -> dict:
    """Median prompt-pass ms per variant at each fixed length (the prompt tiled), variants interleaved."""
    names = list(models)
    limit = min(getattr(m, "context_length", None) or 1 << 30 for m in models.values())
    lengths = tuple(length for length in lengths if length <= limit)
    times = {n: {length: [] for length in lengths} for n in names}
    for length in lengths:
        ids = np.array([(prompt * (length // len(prompt) + 1))[:length]], dtype=np.int64)
        mask = np.ones_like(ids)
        for n in names:
            models[n].step(ids, mask, None)  # warm-up at this shape
        for r in range(rounds):
            for n in names[r % len(names):] + names[: r % len(names)]:
                t0 = time.perf_counter()
                models[n].step(ids, mask, None)
                times[n][length].append((time.perf_counter() - t0) * 1000)
    return {n: {length: float(np.median(v)) for length, v in per.items()} for n, per in times.items()}


def bench(merged_dir: Path, base_dir: Path, prompt: list[int], max_ratio: float, providers,
          new_tokens: int = 64, rounds: int = 100, threads: int = 1, progress: Progress = quiet,
          unmerged_dir: Path | None = None, memory: bool = True, extra: dict | None = None) -> BenchResult:
    """Time merged against base (and the unmerged adapter graph, if given), interleaved. ``extra``: more
    variants by name, already loaded (e.g. PyTorch eager with the PEFT adapter unmerged); no RSS for them.

    One intra-op thread by default: what is compared is the work each graph does, and on a small CPU,
    thread hand-offs at sub-millisecond kernel times would drown the ratio.
    """
    from .runtime import OrtCausalLM

    dirs = {"merged": merged_dir, "base": base_dir, **({"unmerged": unmerged_dir} if unmerged_dir else {})}
    models = {name: OrtCausalLM(d, providers, threads=threads, io_binding=True) for name, d in dirs.items()}
    peaks = {name: peak_rss_mb(d, providers, threads, prompt, new_tokens) if memory else None
             for name, d in dirs.items()}
    models.update(extra or {})
    peaks.update({name: None for name in extra or {}})
    for attempt in range(2):
        n = rounds * (attempt + 1)
        s = measure(models, prompt, new_tokens, n)
        ratios = {k: {"prompt": ratio_stats(s[k][0], s["base"][0]), "decode": ratio_stats(s[k][1], s["base"][1])}
                  for k in models if k != "base"}
        v = verdict(list(ratios["merged"].values()))
        if v != "inconclusive" or attempt == 1:
            break
        progress("spread too wide to decide; repeating with twice the rounds")
    by_length = prompt_pass_by_length(models, prompt, max(5, rounds // 10))
    return BenchResult(
        prompt_len=len(prompt), new_tokens=new_tokens, rounds=n, threads=threads, prompt_ms_by_length=by_length,
        variants={k: _stats(*s[k]) for k in models}, ratios=ratios, peak_rss_mb=peaks, verdict=v,
        max_ratio=max_ratio, within_budget=ratios["merged"]["decode"].median <= max_ratio,
        graphs_identical=graphs_identical(merged_dir, base_dir),
        decode_samples={k: s[k][1] for k in models},
    )


def markdown(r: BenchResult) -> str:
    lines = [f"## Latency ({r.rounds} interleaved rounds, prompt {r.prompt_len}, {r.new_tokens} new tokens, "
             f"{r.threads or 'default'} intra-op threads)", "",
             "| variant | prompt pass ms | decode ms/token (p50) | p90 | p99 | tokens/s | peak RSS MB | "
             "decode vs base (95% CI) |", "|---|---|---|---|---|---|---|---|"]
    for name, v in r.variants.items():
        ratio = r.ratios.get(name, {}).get("decode")
        vs = f"{ratio.median:.3f} ({ratio.ci_low:.3f}-{ratio.ci_high:.3f})" if ratio else "1"
        lines.append(f"| {name} | {v.prompt_ms_median:.3f} | {v.decode_ms_median:.3f} | {v.decode_ms_p90:.3f} | "
                     f"{v.decode_ms_p99:.3f} | {v.tokens_per_s:.0f} | "
                     f"{'' if r.peak_rss_mb[name] is None else format(r.peak_rss_mb[name], '.0f')} | {vs} |")
    lines += ["", f"merged/base median of paired ratios: prompt {r.prompt_ratio.median:.3f} (95% CI "
              f"{r.prompt_ratio.ci_low:.3f}-{r.prompt_ratio.ci_high:.3f}), decode {r.decode_ratio.median:.3f} (95% CI "
              f"{r.decode_ratio.ci_low:.3f}-{r.decode_ratio.ci_high:.3f}). Verdict: **{r.verdict}**; "
              f"budget decode ratio <= {r.max_ratio:g}: "
              f"{'met' if r.within_budget else 'EXCEEDED'}; graphs structurally identical: {r.graphs_identical}.", ""]
    if r.prompt_ms_by_length:
        lengths = sorted(next(iter(r.prompt_ms_by_length.values())))
        lines += ["| prompt pass ms at length | " + " | ".join(map(str, lengths)) + " |",
                  "|---|" + "---|" * len(lengths)]
        lines += [f"| {name} | " + " | ".join(f"{per[length]:.2f}" for length in lengths) + " |"
                  for name, per in r.prompt_ms_by_length.items()]
        lines.append("")
    return "\n".join(lines)


def plot(r: BenchResult, path: Path) -> None:
    """Per-token decode latency of each variant (distribution over rounds), and each ratio to base with its CI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    names = list(r.decode_samples)
    left.boxplot([r.decode_samples[n] for n in names], showfliers=False)
    left.set_xticks(range(1, len(names) + 1), names)
    left.set_ylabel("decode ms per token (per round)")
    left.set_title("decode latency")
    others = [n for n in names if n in r.ratios]
    med = [r.ratios[n]["decode"].median for n in others]
    err = [[m - r.ratios[n]["decode"].ci_low for n, m in zip(others, med)],
           [r.ratios[n]["decode"].ci_high - m for n, m in zip(others, med)]]
    right.bar(others, med, yerr=err, capsize=6, color=["tab:green" if n == "merged" else "tab:red" for n in others])
    right.axhspan(*ZERO_BAND, color="grey", alpha=0.3, label="zero-overhead band")
    right.axhline(r.max_ratio, color="black", linestyle="--", label=f"budget {r.max_ratio:g}")
    right.set_ylim(min(0.9, min(med) - 0.05), max(max(med) + 0.1, r.max_ratio + 0.05))
    right.set_ylabel("decode time / base (median, 95% CI)")
    right.set_title(f"vs base: {r.verdict}")
    right.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_reports(r: BenchResult, json_path: Path, md_path: Path, png_path: Path | None = None) -> None:
    data = asdict(r)
    json_path.write_text(json.dumps({"schema_version": 2, **data}, indent=2) + "\n")
    md_path.write_text(markdown(r))
    if png_path:
        plot(r, png_path)
