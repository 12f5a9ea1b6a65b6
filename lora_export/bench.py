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
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ZERO_BAND = (0.98, 1.02)


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
    merged: VariantStats
    base: VariantStats
    prompt_ratio: RatioStats
    decode_ratio: RatioStats
    verdict: str  # "zero overhead" | "overhead" | "inconclusive"
    max_ratio: float  # the target's latency budget for decode merged/base
    within_budget: bool
    graphs_identical: bool


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
    prompt_ms = float(np.median(passes))
    steps = []
    for _ in range(new_tokens):
        nxt = np.array([[int(np.argmax(logits[0, -1]))]], dtype=np.int64)
        mask = np.ones((1, mask.shape[1] + 1), dtype=np.int64)
        t0 = time.perf_counter()
        logits, past = model.step(nxt, mask, past)
        steps.append((time.perf_counter() - t0) * 1000)
    return prompt_ms, float(np.median(steps))


def graphs_identical(a: Path, b: Path) -> bool:
    """Same nodes, op types, and initializer names, shapes and types: only weight bytes may differ."""
    import onnx

    def signature(path: Path):
        g = onnx.load(str(path), load_external_data=False).graph
        nodes = [(n.op_type, tuple(n.input), tuple(n.output)) for n in g.node]
        inits = sorted((t.name, tuple(t.dims), t.data_type) for t in g.initializer)
        return nodes, inits

    return signature(a) == signature(b)


def measure(merged, base, prompt: list[int], new_tokens: int, rounds: int, warmup: int = 2):
    samples = {"merged": ([], []), "base": ([], [])}
    for _ in range(warmup):
        _time_round(merged, prompt, new_tokens)
        _time_round(base, prompt, new_tokens)
    for r in range(rounds):
        order = (("merged", merged), ("base", base)) if r % 2 == 0 else (("base", base), ("merged", merged))
        for name, model in order:
            p, d = _time_round(model, prompt, new_tokens)
            samples[name][0].append(p)
            samples[name][1].append(d)
    return samples


def bench(merged_dir: Path, base_dir: Path, prompt: list[int], max_ratio: float, providers,
          new_tokens: int = 64, rounds: int = 100, threads: int = 1, progress=None) -> BenchResult:
    """Time merged against base. One intra-op thread by default: what is compared is the work each graph
    does, and on a small CPU, thread hand-offs at sub-millisecond kernel times would drown the ratio."""
    from .runtime import OrtCausalLM

    merged = OrtCausalLM(merged_dir, providers, threads=threads)
    base = OrtCausalLM(base_dir, providers, threads=threads)
    for attempt in range(2):
        n = rounds * (attempt + 1)
        s = measure(merged, base, prompt, new_tokens, n)
        ratios = [ratio_stats(s["merged"][0], s["base"][0]), ratio_stats(s["merged"][1], s["base"][1])]
        v = verdict(ratios)
        if v != "inconclusive" or attempt == 1:
            break
        if progress:
            progress("spread too wide to decide; repeating with twice the rounds")
    return BenchResult(
        prompt_len=len(prompt), new_tokens=new_tokens, rounds=n, threads=threads,
        merged=_stats(*s["merged"]), base=_stats(*s["base"]),
        prompt_ratio=ratios[0], decode_ratio=ratios[1], verdict=v, max_ratio=max_ratio,
        within_budget=ratios[1].median <= max_ratio,
        graphs_identical=graphs_identical(merged_dir / "model.onnx", base_dir / "model.onnx"),
    )


def markdown(r: BenchResult) -> str:
    rows = [("merged", r.merged), ("base", r.base)]
    lines = [f"## Latency: merged vs base ({r.rounds} interleaved rounds, prompt {r.prompt_len}, "
             f"{r.new_tokens} new tokens, {r.threads or 'default'} intra-op threads)", "",
             "| variant | prompt pass ms | decode ms/token (p50) | p90 | p99 | tokens/s |", "|---|---|---|---|---|---|"]
    lines += [f"| {n} | {v.prompt_ms_median:.3f} | {v.decode_ms_median:.3f} | {v.decode_ms_p90:.3f} | "
              f"{v.decode_ms_p99:.3f} | {v.tokens_per_s:.0f} |" for n, v in rows]
    lines += ["", f"merged/base median of paired ratios: prompt {r.prompt_ratio.median:.3f} (95% CI "
              f"{r.prompt_ratio.ci_low:.3f}-{r.prompt_ratio.ci_high:.3f}), decode {r.decode_ratio.median:.3f} (95% CI "
              f"{r.decode_ratio.ci_low:.3f}-{r.decode_ratio.ci_high:.3f}). Verdict: **{r.verdict}**; "
              f"budget decode ratio <= {r.max_ratio:g}: "
              f"{'met' if r.within_budget else 'EXCEEDED'}; graphs structurally identical: {r.graphs_identical}.", ""]
    return "\n".join(lines)


def write_reports(r: BenchResult, json_path: Path, md_path: Path) -> None:
    json_path.write_text(json.dumps({"schema_version": 1, **asdict(r)}, indent=2) + "\n")
    md_path.write_text(markdown(r))
