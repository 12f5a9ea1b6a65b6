"""Numerical parity of an export against the reference, as a verdict fit for CI.

Compared position by position on the same token sequences: the prompt pass and every decode step that
reads the KV cache (the export is teacher-forced with the reference's greedy tokens), plus each model's
own greedy continuation. Thresholds come from the target; every failed check is named with its
threshold and observed value. Reports: JSON (versioned schema), JUnit XML, markdown.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .runtime import greedy
from .targets import Tolerances

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class ParityMetrics:
    prompts: int
    positions: int  # logit rows compared (prompt positions + decode steps)
    max_abs_diff: float
    mean_abs_diff: float
    mean_kl: float  # KL(reference || export), mean over positions
    max_kl: float
    top1_agreement: float
    greedy_match: float  # share of prompts whose whole greedy continuation is identical
    mean_identical_prefix: float  # tokens of greedy continuation identical before the first difference


@dataclass(frozen=True)
class Check:
    metric: str
    op: str  # "<=" or ">="
    threshold: float
    observed: float
    passed: bool

    def __str__(self) -> str:
        return f"{self.metric} = {self.observed:.4g} (needs {self.op} {self.threshold:g})"


@dataclass(frozen=True)
class ParityReport:
    target: str
    reference: str
    metrics: ParityMetrics
    checks: tuple[Check, ...]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def measure(reference, candidate, prompts: list[list[int]], steps: int = 16) -> ParityMetrics:
    """Compare two step models (see runtime.py) on the given prompts."""
    diffs, kls, agree, matches, prefixes = [], [], [], [], []
    for prompt in prompts:
        ref = greedy(reference, prompt, steps)
        forced = greedy(candidate, prompt, steps, forced=ref.tokens)
        own = greedy(candidate, prompt, steps)
        d = np.abs(ref.logits - forced.logits)
        diffs.append(d)
        lp, lq = _log_softmax(ref.logits), _log_softmax(forced.logits)
        kls.append((np.exp(lp) * (lp - lq)).sum(axis=-1))
        agree.append(ref.logits.argmax(-1) == forced.logits.argmax(-1))
        same = [a == b for a, b in zip(ref.tokens, own.tokens)]
        prefix = same.index(False) if False in same else len(same)
        prefixes.append(prefix)
        matches.append(prefix == len(same))
    kl = np.concatenate(kls)
    return ParityMetrics(
        prompts=len(prompts), positions=int(kl.size),
        max_abs_diff=float(max(d.max() for d in diffs)),
        mean_abs_diff=float(np.mean([d.mean() for d in diffs])),
        mean_kl=float(kl.mean()), max_kl=float(kl.max()),
        top1_agreement=float(np.concatenate(agree).mean()),
        greedy_match=float(np.mean(matches)), mean_identical_prefix=float(np.mean(prefixes)),
    )


def judge(metrics: ParityMetrics, tol: Tolerances, target: str, reference: str) -> ParityReport:
    checks = []
    if tol.max_abs_diff is not None:
        checks.append(Check("max_abs_diff", "<=", tol.max_abs_diff, metrics.max_abs_diff,
                            metrics.max_abs_diff <= tol.max_abs_diff))
    if tol.mean_kl is not None:
        checks.append(Check("mean_kl", "<=", tol.mean_kl, metrics.mean_kl, metrics.mean_kl <= tol.mean_kl))
    if tol.top1_agreement is not None:
        checks.append(Check("top1_agreement", ">=", tol.top1_agreement, metrics.top1_agreement,
                            metrics.top1_agreement >= tol.top1_agreement))
    if tol.greedy_match:
        checks.append(Check("greedy_match", ">=", 1.0, metrics.greedy_match, metrics.greedy_match >= 1.0))
    return ParityReport(target=target, reference=reference, metrics=metrics, checks=tuple(checks))


def report_dict(report: ParityReport) -> dict:
    return {"schema_version": SCHEMA_VERSION, "target": report.target, "reference": report.reference,
            "passed": report.passed, "metrics": asdict(report.metrics),
            "checks": [asdict(c) for c in report.checks]}


def write_json(report: ParityReport, path: Path) -> None:
    path.write_text(json.dumps(report_dict(report), indent=2) + "\n")


def write_junit(report: ParityReport, path: Path) -> None:
    suite = ET.Element("testsuite", name=f"parity.{report.target}", tests=str(len(report.checks)),
                       failures=str(len(report.failures)))
    for c in report.checks:
        case = ET.SubElement(suite, "testcase", classname=f"parity.{report.target}", name=c.metric)
        if not c.passed:
            ET.SubElement(case, "failure", message=str(c)).text = str(c)
    ET.ElementTree(suite).write(path, encoding="utf-8", xml_declaration=True)


def markdown(report: ParityReport) -> str:
    m = report.metrics
    lines = [f"## Parity: {report.target} vs {report.reference}: {'PASS' if report.passed else 'FAIL'}", "",
             "| check | observed | threshold | result |", "|---|---|---|---|"]
    lines += [f"| {c.metric} | {c.observed:.4g} | {c.op} {c.threshold:g} | {'pass' if c.passed else 'FAIL'} |"
              for c in report.checks]
    lines += ["", f"{m.prompts} prompts, {m.positions} positions (prompt pass + decode steps through the KV cache): "
              f"max |diff| {m.max_abs_diff:.3g}, mean |diff| {m.mean_abs_diff:.3g}, mean KL {m.mean_kl:.3g}, "
              f"max KL {m.max_kl:.3g}, top-1 {m.top1_agreement:.1%}, identical greedy continuations "
              f"{m.greedy_match:.0%}.", ""]
    return "\n".join(lines)


def write_reports(report: ParityReport, out_dir: Path) -> None:
    write_json(report, out_dir / "parity.json")
    write_junit(report, out_dir / "parity.xml")
    (out_dir / "parity.md").write_text(markdown(report))


def read_report(path: Path) -> dict:
    return json.loads(path.read_text())
