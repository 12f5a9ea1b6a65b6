"""Numerical parity of an export against the adapted model as trained: a verdict fit for CI.

Compared position by position on the same token sequences, over several shapes (batch 1 with short and
long prompts, batch 2 padded): the prompt pass and every decode step that reads the KV cache (the export
is teacher-forced with the reference's greedy tokens), plus each model's own greedy continuation.
Thresholds come from the target; each failed check is named with its shape, threshold and observed
value. Two more comparisons say which step cost what (merging, then exporting), and the unadapted base
measures how much of the adapter's effect the export kept. Reports: JSON (versioned), JUnit XML, markdown.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .runtime import Generation, generate
from .targets import Tolerances

SCHEMA_VERSION = 2
MIN_STEPS = 17  # the prompt pass and at least 16 decode steps


@dataclass(frozen=True)
class Shape:
    name: str
    batches: tuple[tuple[tuple[int, ...], ...], ...]  # batches of prompts (token ids)


def make_shapes(prompts: list[list[int]], documents: list[list[int]], max_positions: int, steps: int) -> list[Shape]:
    """b1-short: 4 prompts alone; b1-long: 2 long prompts alone; b2-padded: 2 batches of 2 of unequal length.

    Long prompts are whole records (prompt and completion) run together, cut to fit the model's positions.
    """
    short = [tuple(p) for p in prompts[:4]]
    budget = max(8, min(96, max_positions - steps - 1))
    stream = [t for d in documents for t in d[1:]]
    long = [tuple(prompts[0][:1] + stream[i * len(stream) // 2:][: budget - 1]) for i in range(2)]
    rest = prompts[4:8] if len(prompts) >= 8 else prompts[:4]
    pairs = [(tuple(rest[2 * i]), tuple(rest[2 * i + 1][: max(2, len(rest[2 * i + 1]) // 2)])) for i in range(2)]
    return [Shape("b1-short", tuple((p,) for p in short)), Shape("b1-long", tuple((p,) for p in long)),
            Shape("b2-padded", tuple(pairs))]


@dataclass(frozen=True)
class Metrics:
    sequences: int
    positions: int  # logit rows compared (real prompt positions + decode steps)
    max_abs_diff: float
    mean_abs_diff: float
    rel_l2: float  # ||candidate - reference|| / ||reference|| over all compared logits
    cosine: float  # mean cosine similarity of logit rows
    mean_kl: float  # KL(reference || candidate), mean over positions
    max_kl: float
    top1_agreement: float
    greedy_min_identical: int | None = None  # shortest identical prefix of the two greedy continuations
    greedy_mean_identical: float | None = None


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def compare(ref: list[Generation], cand: list[Generation], own: list[Generation] | None = None) -> Metrics:
    """Metrics of candidate logits against reference logits on the same positions (and greedy texts, if given)."""
    r = np.concatenate([g.logits for g in ref]).astype(np.float64)
    c = np.concatenate([g.logits for g in cand]).astype(np.float64)
    d = np.abs(r - c)
    lp, lq = _log_softmax(r), _log_softmax(c)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    cos = (r * c).sum(-1) / np.maximum(np.linalg.norm(r, axis=-1) * np.linalg.norm(c, axis=-1), 1e-30)
    prefixes = None
    if own is not None:
        prefixes = []
        for a, b in zip(ref, own):
            same = [x == y for x, y in zip(a.tokens, b.tokens)]
            prefixes.append(same.index(False) if False in same else len(same))
    return Metrics(
        sequences=len(ref), positions=int(r.shape[0]), max_abs_diff=float(d.max()), mean_abs_diff=float(d.mean()),
        rel_l2=float(np.linalg.norm(r - c) / max(np.linalg.norm(r), 1e-30)), cosine=float(cos.mean()),
        mean_kl=float(kl.mean()), max_kl=float(kl.max()), top1_agreement=float((r.argmax(-1) == c.argmax(-1)).mean()),
        greedy_min_identical=None if prefixes is None else int(min(prefixes)),
        greedy_mean_identical=None if prefixes is None else float(np.mean(prefixes)),
    )


@dataclass(frozen=True)
class Check:
    shape: str
    metric: str
    op: str  # "<=" or ">="
    threshold: float
    observed: float
    passed: bool

    def __str__(self) -> str:
        return f"{self.shape}/{self.metric} = {self.observed:.4g} (needs {self.op} {self.threshold:g})"


@dataclass(frozen=True)
class ParityReport:
    target: str
    reference: str
    steps: int  # tokens generated per sequence (prompt pass + steps - 1 decode steps)
    shapes: dict  # shape name -> Metrics of the export against the reference
    stages: dict  # "merge", "export", "total", "adapter" -> Metrics pooled over shapes
    adapter_retention: float | None  # 1 - KL(adapted || export) / KL(adapted || base)
    checks: tuple[Check, ...]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]


def _run(model, shape: Shape, steps: int, forced=None) -> list[Generation]:
    out, i = [], 0
    for batch in shape.batches:
        f = None if forced is None else [forced[i + j].tokens for j in range(len(batch))]
        out += generate(model, [list(p) for p in batch], steps, forced=f)
        i += len(batch)
    return out


def measure(reference, candidate, shapes: list[Shape], steps: int, merged=None, base=None, progress=None):
    """Run every model on every shape. Returns (per-shape Metrics, pooled stage Metrics, adapter retention)."""
    per_shape, pooled = {}, {"ref": [], "cand": [], "merged": [], "base": []}
    for shape in shapes:
        if progress:
            progress(f"parity on {shape.name}: {sum(len(b) for b in shape.batches)} sequences x {steps} tokens")
        ref = _run(reference, shape, steps)
        cand = _run(candidate, shape, steps, forced=ref)
        per_shape[shape.name] = compare(ref, cand, own=_run(candidate, shape, steps))
        pooled["ref"] += ref
        pooled["cand"] += cand
        if merged is not None:
            pooled["merged"] += _run(merged, shape, steps, forced=ref)
        if base is not None:
            pooled["base"] += _run(base, shape, steps, forced=ref)
    stages = {"total": compare(pooled["ref"], pooled["cand"])}
    if pooled["merged"]:
        stages["merge"] = compare(pooled["ref"], pooled["merged"])
        stages["export"] = compare(pooled["merged"], pooled["cand"])
    retention = None
    if pooled["base"]:
        stages["adapter"] = compare(pooled["ref"], pooled["base"])
        effect = stages["adapter"].mean_kl
        retention = float(1 - stages["total"].mean_kl / effect) if effect > 0 else None
    return per_shape, stages, retention


def judge(per_shape: dict, stages: dict, retention: float | None, tol: Tolerances, target: str, reference: str,
          steps: int) -> ParityReport:
    checks = []
    for name, m in per_shape.items():
        if tol.max_abs_diff is not None:
            checks.append(Check(name, "max_abs_diff", "<=", tol.max_abs_diff, m.max_abs_diff,
                                m.max_abs_diff <= tol.max_abs_diff))
        if tol.mean_kl is not None:
            checks.append(Check(name, "mean_kl", "<=", tol.mean_kl, m.mean_kl, m.mean_kl <= tol.mean_kl))
        if tol.top1_agreement is not None:
            checks.append(Check(name, "top1_agreement", ">=", tol.top1_agreement, m.top1_agreement,
                                m.top1_agreement >= tol.top1_agreement))
        if tol.greedy_tokens:
            need = min(tol.greedy_tokens, steps)
            checks.append(Check(name, "greedy_identical_tokens", ">=", need, m.greedy_min_identical,
                                m.greedy_min_identical >= need))
    if tol.min_adapter_retention is not None:
        observed = retention if retention is not None else float("nan")
        checks.append(Check("all", "adapter_retention", ">=", tol.min_adapter_retention, observed,
                            retention is not None and retention >= tol.min_adapter_retention))
    return ParityReport(target=target, reference=reference, steps=steps, shapes=per_shape, stages=stages,
                        adapter_retention=retention, checks=tuple(checks))


def report_dict(report: ParityReport) -> dict:
    return {"schema_version": SCHEMA_VERSION, "target": report.target, "reference": report.reference,
            "passed": report.passed, "steps": report.steps,
            "shapes": {k: asdict(v) for k, v in report.shapes.items()},
            "stages": {k: asdict(v) for k, v in report.stages.items()},
            "adapter_retention": report.adapter_retention,
            "checks": [asdict(c) for c in report.checks],
            "failures": [str(c) for c in report.failures]}


def write_json(report: ParityReport, path: Path) -> None:
    path.write_text(json.dumps(report_dict(report), indent=2) + "\n")


def write_junit(report: ParityReport, path: Path) -> None:
    """One test case per metric and shape, so CI systems list each check natively."""
    suite = ET.Element("testsuite", name=f"parity.{report.target}", tests=str(len(report.checks)),
                       failures=str(len(report.failures)), errors="0")
    for c in report.checks:
        case = ET.SubElement(suite, "testcase", classname=f"parity.{report.target}.{c.shape}", name=c.metric)
        if not c.passed:
            ET.SubElement(case, "failure", message=str(c)).text = str(c)
    ET.ElementTree(suite).write(path, encoding="utf-8", xml_declaration=True)


STAGE_LABELS = {"merge": "merge: merged fp32 (PyTorch) vs as trained",
                "export": "export: this export vs merged fp32",
                "total": "total: this export vs as trained",
                "adapter": "adapter effect: unadapted base vs as trained"}


def markdown(report: ParityReport) -> str:
    lines = [f"## Parity: {report.target} vs {report.reference}: {'PASS' if report.passed else 'FAIL'}", "",
             "| shape | check | observed | threshold | result |", "|---|---|---|---|---|"]
    lines += [f"| {c.shape} | {c.metric} | {c.observed:.4g} | {c.op} {c.threshold:g} | {'pass' if c.passed else 'FAIL'} |"
              for c in report.checks]
    lines += ["", "| shape | sequences | positions | max abs diff | mean KL | top-1 | cosine | rel L2 | greedy identical (min/mean) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, m in report.shapes.items():
        lines.append(f"| {name} | {m.sequences} | {m.positions} | {m.max_abs_diff:.3g} | {m.mean_kl:.3g} | "
                     f"{m.top1_agreement:.1%} | {m.cosine:.6f} | {m.rel_l2:.3g} | {m.greedy_min_identical}/"
                     f"{m.greedy_mean_identical:.1f} of {report.steps} |")
    lines += ["", "Where the difference comes from (all shapes pooled):", "",
              "| step | max abs diff | mean KL | top-1 |", "|---|---|---|---|"]
    for key, label in STAGE_LABELS.items():
        if key in report.stages:
            m = report.stages[key]
            lines.append(f"| {label} | {m.max_abs_diff:.3g} | {m.mean_kl:.3g} | {m.top1_agreement:.1%} |")
    if report.adapter_retention is not None:
        lines += ["", f"Adapter retention: the export keeps {report.adapter_retention:.1%} of the adapter's effect "
                  "(1 - KL(trained || export) / KL(trained || base))."]
    return "\n".join(lines) + "\n"


def write_reports(report: ParityReport, out_dir: Path) -> None:
    write_json(report, out_dir / "parity.json")
    write_junit(report, out_dir / "parity.xml")
    (out_dir / "parity.md").write_text(markdown(report))
