"""Parity of a switchable export: one section for the base (no adapter active) and one per adapter, each
against its own reference with the target's tolerances (lora_export/switchable.py writes the export)."""

from __future__ import annotations

import functools
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from .base import check_base, load_tokenizer
from .checkpoint import parameter_count
from .errors import Problem, raise_if
from .export.io_spec import check_external_data
from .exportdir import (
    PARITY_TMP,
    adapters_of,
    check_base_unchanged,
    check_report_path,
    context_of,
    locate,
)
from .fingerprint import sha256_file
from .isolate import run_in_child
from .manifests import EXPORT_MANIFEST, SWITCHABLE, ExportManifest, read_export_manifest
from .outputs import sweep_temp
from .progress import Progress, quiet
from .prompts import check_prompt_lengths, load_prompts
from .quantize import graph_layout, has_source_check, source_check
from .quantized_base import plain_base
from .sidepath import unmerged_source
from .targets import check_against_context, parse_target

BASE_SECTION = "base"  # the section for no adapter active


@dataclass(frozen=True)
class SwitchableReport:
    """One parity report per section: the base (no adapter active) and each adapter."""

    target: str
    sections: tuple  # ((name, parity.ParityReport), ...)
    ran_on: tuple[str, ...] = ()
    not_checked_on: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return all(r.passed for _, r in self.sections)

    @property
    def failures(self) -> list:
        return [replace(c, shape=f"{name}: {c.shape}") for name, r in self.sections for c in r.failures]

    def markdown(self) -> str:
        from .parity import markdown

        head = [f"# Parity of a switchable export: {self.target}: {'PASS' if self.passed else 'FAIL'}", "",
                "| section | adapter active | result |", "|---|---|---|"]
        head += [f"| {n} | {'none' if n == BASE_SECTION else n} | {'PASS' if r.passed else 'FAIL'} |"
                 for n, r in self.sections]
        body = [f"# Section: {n}\n\n" + markdown(r).replace("## Parity:", "## Parity:", 1) for n, r in self.sections]
        return "\n".join(head) + "\n\n" + "\n".join(body)


def _validation_prep(export_dir: Path, manifest: ExportManifest, base: Path, prompts, tmp: Path, max_positions: int,
                     steps: int, extra: list, base_sha: dict, progress: Progress = quiet):
    """(adapters, plain base, graph base, prompt token ids). Runs in a child process (torch)."""
    token_ids = load_prompts(load_tokenizer(base), prompts)
    check_prompt_lengths(token_ids[0], max_positions, steps, prompts)
    adapters, _ = adapters_of(list(manifest.adapters) + list(extra), export_dir, base, base_sha)
    plain = plain_base(base, tmp, progress)
    source = unmerged_source(plain, adapters[0], manifest.merge_base, tmp)
    return tuple(adapters), plain, source, token_ids


def validate(export_dir: Path, report_json: Path | None = None, junit: Path | None = None, prompts: Path | None = None,
             progress: Progress = quiet, extra: tuple | None = None, base_sha: dict | None = None) -> SwitchableReport:
    """Parity of the base section and of every adapter, each against its own reference, with the target's
    tolerances (the base section without the adapter-retention check: there is no adapter). ``extra``:
    (entries, folder) of adapters being added by --into: only they are checked, from their files in folder.
    ``base_sha``: the base's fingerprint when the caller has just checked it against the manifest."""
    from . import parity
    from .reference import COMPUTE_DTYPE, DEVICE, describe, reference_model, torch_model
    from .runtime import OrtCausalLM, check_providers, parity_providers
    from .targets import tolerance_differences

    export_dir = Path(export_dir)
    manifest = read_export_manifest(export_dir)
    target = parse_target(manifest.target, f"{export_dir / EXPORT_MANIFEST}:target")
    for path in (report_json, junit):
        check_report_path(path)
    base = check_base(locate(manifest.base, export_dir, "base model"))
    base_sha = base_sha if base_sha is not None else check_base_unchanged(base, manifest)
    check_external_data(export_dir / "model.onnx")
    new_entries, folder = extra if extra else ([], export_dir)
    entries = new_entries or manifest.adapters
    problems = []
    for e in entries:
        f = folder / e.file
        if not f.is_file():
            problems.append(Problem(str(f), "the adapter file is missing", "restore it, or re-export"))
        elif sha256_file(f) != e.file_sha256:
            problems.append(Problem(str(f), "the adapter file changed since the export wrote it (sha256 differs)",
                                    "restore it, or re-export"))
    raise_if(problems)
    max_positions, vocab_size = context_of(base)
    check_against_context(target, max_positions, str(base / "config.json"))
    steps = max(parity.MIN_STEPS, target.tolerances.greedy_tokens)
    run_with, not_here = parity_providers(target.execution_providers)
    check_providers(run_with, export_dir / "model.onnx")
    sweep_temp(PARITY_TMP)
    sections = []
    with tempfile.TemporaryDirectory(prefix=f"{PARITY_TMP}{os.getpid()}-") as tmp:
        adapters, plain, source, token_ids = run_in_child(_validation_prep, export_dir, manifest, base, prompts,
                                                          Path(tmp), max_positions, steps, new_entries, base_sha,
                                                          progress=progress)
        layout = graph_layout(export_dir, target, side_paths=True)
        if has_source_check(target, side_paths=True):
            layout += run_in_child(source_check, export_dir, source, progress=progress)
        shapes = parity.make_shapes(*token_ids, max_positions, steps)
        runs = [] if new_entries else [(BASE_SECTION, None, None)]
        n_old = len(manifest.adapters)
        runs += [(e.name, adapters[(n_old if new_entries else 0) + i], folder / e.file)
                 for i, e in enumerate(entries)]
        for name, adapter, path in runs:
            progress(f"parity of section {name}: {'no adapter active' if adapter is None else path.name}")
            models = parity.Models(
                reference=(functools.partial(torch_model, source) if adapter is None else
                           functools.partial(reference_model, plain, (adapter,), (1.0,), None)),
                candidate=functools.partial(OrtCausalLM, export_dir, run_with, 0, False, path),
                base=None if adapter is None else functools.partial(torch_model, source), isolate=True)
            per_shape, stages, retention = parity.measure(models, shapes, steps, Path(tmp), progress=progress,
                                                          vocab_size=vocab_size)
            tol, size_note = target.tolerances.for_model(parameter_count(plain))
            tol = tol if adapter else replace(tol, min_adapter_retention=None)
            ref = (f"the {manifest.merge_base} base the graph is built on, no adapter" if adapter is None
                   else describe([adapter]))
            report = parity.judge(per_shape, stages, retention, tol, target.name, ref, steps,
                                  notes=(*tolerance_differences(target), *([size_note] if size_note else [])),
                                  reference_compute=(COMPUTE_DTYPE, DEVICE), ran_on=run_with, not_checked_on=not_here,
                                  layout=layout)
            sections.append((name, report))
    result = SwitchableReport(target=target.name, sections=tuple(sections), ran_on=run_with, not_checked_on=not_here)
    if not new_entries:
        write_reports(result, export_dir, report_json, junit)
    return result


def report_dict(report: SwitchableReport) -> dict:
    from .parity import report_dict as section

    return {"passed": report.passed, "target": report.target, "graph": SWITCHABLE,
            "sections": {n: section(r) for n, r in report.sections}}


def section_from_dict(d: dict):
    """A section's ParityReport back from its ``report_dict`` (the top-level parity.json holds every section)."""
    from .parity import Check, Metrics, ParityReport

    def metrics(v: dict):
        return Metrics(**{k: tuple(x) if isinstance(x, list) else x for k, x in v.items()})

    return ParityReport(target=d["target"], reference=d["reference"], steps=d["steps"],
                        shapes={k: metrics(v) for k, v in d["shapes"].items()},
                        stages={k: metrics(v) for k, v in d["stages"].items()},
                        adapter_retention=d["adapter_retention"], checks=tuple(Check(**c) for c in d["checks"]),
                        reference_dtype=d["reference_dtype"], reference_device=d["reference_device"],
                        tolerance_notes=tuple(d["tolerance_notes"]), ran_on=tuple(d["ran_on"]),
                        not_checked_on=tuple(d["not_checked_on"]))


def recorded_sections(export_dir: Path) -> dict:
    """{name: ParityReport} of the sections the export's top-level parity.json holds ({} when it has none or
    cannot be read: then only the sections checked now are reported)."""
    import json

    try:
        sections = json.loads((Path(export_dir) / "parity.json").read_text())["sections"]
        return {n: section_from_dict(d) for n, d in sections.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _replace_text(path: Path, text: str) -> None:
    """Write a temporary sibling, then rename it into place: a reader never sees half a report."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_reports(report: SwitchableReport, export_dir: Path, report_json: Path | None = None,
                  junit: Path | None = None) -> None:
    """parity.md/json at the top (every section), and each section's full reports under parity/NAME/."""
    import json

    from . import parity

    for name, r in report.sections:
        folder = export_dir / "parity" / name
        folder.mkdir(parents=True, exist_ok=True)
        parity.write_reports(r, folder)
    _replace_text(export_dir / "parity.md", report.markdown())
    text = json.dumps(report_dict(report), indent=2) + "\n"
    _replace_text(export_dir / "parity.json", text)
    if report_json:
        Path(report_json).write_text(text)
    if junit:  # one JUnit file per section beside the requested one, and the requested one for the first failure
        for name, r in report.sections:
            parity.write_junit(r, Path(junit).with_name(f"{Path(junit).stem}-{name}.xml"))
        failing = next((r for _, r in report.sections if not r.passed), report.sections[0][1])
        parity.write_junit(failing, Path(junit))
