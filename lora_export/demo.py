"""``lora-export demo``: the whole pipeline on the embedded default, with one summary table at the end.

Trains a QLoRA adapter on the embedded base (NF4 + double quantization, on the CPU), exports it for the
two shipped CPU targets, validates parity, benchmarks merged against base, and measures task accuracy of
the base, the adapted model and each export on the held-out demo examples.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .adapters import load_adapter
from .base import load_fp32, load_tokenizer
from .data import load_jsonl
from .outputs import check_new_output, staged
from .pipeline import ExportRequest, bench, export
from .progress import Progress, quiet
from .prompts import EMBEDDED
from .reference import load_adapted
from .runtime import OrtCausalLM, TorchCausalLM
from .tasks import task_accuracy
from .train import TrainConfig, train

TARGETS = ("ort-cpu-fp32", "ort-cpu-int4")
# Tuned so that the adapter learns the task (held-out accuracy near 90%) in about 30 s on 2 CPU cores.
DEMO_TRAINING = dict(rank=16, alpha=32.0, steps=300, lr=3e-3, batch_size=16, seed=0)


@dataclass(frozen=True)
class Row:
    model: str
    accuracy: float
    parity: str = ""
    max_abs_diff: float | None = None
    mean_kl: float | None = None
    top1: float | None = None
    retention: float | None = None
    latency_ratio: float | None = None
    unmerged_ratio: float | None = None  # the same adapter left unmerged (side path), decode vs base
    latency_verdict: str = ""


@dataclass(frozen=True)
class DemoResult:
    out: Path
    rows: tuple[Row, ...]
    passed: bool

    @property
    def table(self) -> str:
        return summary_markdown(list(self.rows))


def default_out(cwd: Path | None = None) -> Path:
    cwd = Path(cwd or Path.cwd())
    n = 1
    while (cwd / f"lora-export-demo-{n}").exists():
        n += 1
    return cwd / f"lora-export-demo-{n}"


def demo(out: Path | None = None, progress: Progress = quiet, targets=TARGETS, training: dict | None = None,
         bench_rounds: int = 40, base_dir: Path = EMBEDDED / "base", data_dir: Path = EMBEDDED / "demo",
         bar=None) -> DemoResult:
    """Run the whole pipeline; ``base_dir`` and ``data_dir`` (train.jsonl, eval.jsonl) default to the embedded ones.

    ``progress`` gets one line per stage (and indented detail lines); ``bar``: a terminal stream to draw the
    training progress bar on. The summary table is in the result (``.table``) and in ``summary.md``."""
    from .train import step_bar

    out = Path(out) if out else default_out()
    check_new_output(out)
    evalset = load_jsonl(data_dir / "eval.jsonl").examples
    tok = load_tokenizer(base_dir)
    rows: list[Row] = []
    passed = True
    with staged(out) as tmp:
        progress("training a QLoRA adapter on the embedded base (4-bit NF4, double quant, CPU)")
        adapter = train(TrainConfig(base=base_dir, data=data_dir / "train.jsonl", out=tmp / "adapter",
                                    **(training or DEMO_TRAINING)), log=lambda m: progress(f"  {m.strip()}"),
                        callbacks=[step_bar(bar)] if bar is not None else ()).adapter_dir
        progress(f"task accuracy of the base and the adapted model on {len(evalset)} held-out examples")
        rows.append(Row("base (PyTorch fp32)", task_accuracy(TorchCausalLM(load_fp32(base_dir)), tok, evalset).value))
        adapted = load_adapted(base_dir, load_adapter(adapter, base_dir))
        rows.append(Row("adapted (PyTorch, NF4 base + adapter)", task_accuracy(TorchCausalLM(adapted), tok, evalset).value))
        for name in targets:
            progress(f"exporting for {name}")
            result = export(ExportRequest(base=base_dir, adapter=adapter, target=name, out=tmp / f"export-{name}"),
                            progress=lambda m, n=name: progress(f"  {n}: {m.strip()}"))
            progress(f"{name}: benchmarking merged vs base")
            # the export lives in the staging folder until the demo completes
            b = bench(tmp / f"export-{name}", progress=lambda m, n=name: progress(f"  {n}: {m.strip()}"), rounds=bench_rounds,
                      memory=False)  # keeps the demo short; `lora-export bench` measures peak memory too
            progress(f"  {name}: task accuracy of the export in ONNX Runtime")
            acc = task_accuracy(OrtCausalLM(tmp / f"export-{name}"), tok, evalset).value
            m = result.parity.stages["total"]
            rows.append(Row(f"export {name} (ONNX Runtime)", acc, "PASS" if result.parity.passed else "FAIL",
                            m.max_abs_diff, m.mean_kl, m.top1_agreement, result.parity.adapter_retention,
                            b.decode_ratio.median, b.ratios["unmerged"]["decode"].median if "unmerged" in b.ratios else None,
                            b.verdict))
            passed &= result.parity.passed and b.within_budget
            progress(f"{name}: parity {'PASS' if result.parity.passed else 'FAIL'} (max rel diff {m.max_rel_diff:.2g}, "
                     f"mean KL {m.mean_kl:.2g}), merged/base decode {b.decode_ratio.median:.3f} ({b.verdict}), "
                     f"task accuracy {acc:.1%}")
        (tmp / "summary.md").write_text(summary_markdown(rows))
        (tmp / "summary.json").write_text(json.dumps({"passed": passed, "rows": [r.__dict__ for r in rows]}, indent=2))
    return DemoResult(out=out, rows=tuple(rows), passed=passed)


def _fmt(x, spec: str) -> str:
    return "" if x is None else format(x, spec)


def summary_markdown(rows: list[Row]) -> str:
    lines = ["| model | task accuracy | parity | max abs logit diff | mean KL | top-1 | adapter kept | "
             "merged/base decode | latency | unmerged/base decode |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.model} | {r.accuracy:.1%} | {r.parity} | {_fmt(r.max_abs_diff, '.2e')} | "
                     f"{_fmt(r.mean_kl, '.2e')} | {_fmt(r.top1, '.1%')} | {_fmt(r.retention, '.1%')} | "
                     f"{_fmt(r.latency_ratio, '.3f')} | {r.latency_verdict} | {_fmt(r.unmerged_ratio, '.3f')} |")
    return "\n".join(lines) + "\n"
