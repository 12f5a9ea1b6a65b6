"""Switchable adapters: one base graph with LoRA inputs, one ``.onnx_adapter`` file per adapter.

    export --switchable  -> export()   base graph (the genai builder's side path, LoRA weights made inputs)
                                       + adapters/NAME.onnx_adapter per adapter + a manifest entry each
    export --into X      -> add()      another adapter file for X, checked against X's graph, no rebuild
    validate X           -> switchable_parity.validate(): the base (no adapter active) and each adapter, each
                                       against its own reference, one report section each

The graph is built on the base the adapters were trained against: for QLoRA adapters dequant(NF4(W)) (as for
--keep-adapter), so all of them must share that 4-bit base; with no adapter active the LoRA inputs default to
rank-0 tensors and the graph is that base.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

from .adapters import load_adapter
from .base import check_base, load_tokenizer
from .errors import BadInput, Problem, ToolchainFailed, UnreadableModel, raise_if
from .export import BACKENDS
from .export.lora_inputs import (
    SUFFIX,
    LoraInput,
    adapter_arrays,
    lora_inputs,
    make_switchable,
    union_adapter,
    write_adapter,
)
from .exportdir import adapter_entry, base_entry, export_bytes, locate
from .families import family_note
from .fingerprint import safetensors_fingerprint, sha256_file
from .isolate import run_in_child
from .manifests import (
    EXPORT_MANIFEST,
    SWITCHABLE,
    ExportManifest,
    ParitySummary,
    read_export_manifest,
    write_export_manifest,
)
from .memory import check_memory
from .outputs import check_free_disk, check_new_output, scratch, staged
from .progress import Progress, quiet
from .prompts import load_prompts
from .quantized_base import QuantRequest, plain_base, resolve
from .sidepath import check_side_path, unmerged_source
from .switchable_parity import BASE_SECTION, recorded_sections, validate, write_reports
from .targets import load_target, parse_target, tomllib
from .versions import package_versions

ADAPTERS = "adapters"
SCHEMES = ("none", "int4")  # weight quantization of the base graph --switchable can write
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


@dataclass(frozen=True)
class SwitchRequest:
    base: Path
    adapters: tuple[Path, ...]
    target: str | None  # None with ``into``: the export's own target
    out: Path | None = None  # a new export (--switchable) ...
    into: Path | None = None  # ... or an existing switchable export to add the adapters to (--into)
    names: tuple[str, ...] | None = None  # --adapter-name, one per adapter; default the directory names
    merge_base: str | None = None
    quant: QuantRequest = QuantRequest()
    allow_pickle: bool = False


def base_key(merge_base: str, quantization) -> tuple:
    """What makes two adapters' merge bases the same: the merge base and the 4-bit settings and modules (not
    where the settings were read from)."""
    return merge_base, quantization.key() if quantization else None, bool(quantization and quantization.prequantized)


def check_request(req: SwitchRequest, taken: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The names the adapters get, after checking the request's own arguments."""
    names = req.names or tuple(Path(p).resolve().name for p in req.adapters)
    where = "--adapter-name" if req.names else "--adapter"
    if len(names) != len(req.adapters):
        raise BadInput.one("--adapter-name", f"{len(names)} names for {len(req.adapters)} adapters",
                           "pass one --adapter-name per --adapter, in the same order (or none: the directory names)")
    problems = [Problem(where, f"adapter name {n!r} is not a usable file name", "use letters, digits, '.', '_', '-'")
                for n in names if not NAME.match(n) or n == BASE_SECTION]
    seen = set(taken)
    for n in names:
        if n in seen:
            problems.append(Problem(where, f"adapter name {n!r} is used twice" +
                                    (" (the export already has it)" if n in taken else ""),
                                    "give each adapter its own name with --adapter-name"))
        seen.add(n)
    raise_if(problems)
    return names


def prepare(req: SwitchRequest, base: Path, work: Path, base_sha: dict, need_source: bool = True,
            progress: Progress = quiet):
    """Check each adapter (plain LoRA/rsLoRA, one shared merge base); the full-precision base; the base the
    graph is built on and (``need_source``) a zero adapter on the union of the adapters' target modules for the
    builder. ``base_sha``: the base's fingerprint. Runs in a child process (it imports torch)."""
    load_prompts(load_tokenizer(base))
    adapters, bases = [], set()
    for p in req.adapters:
        adapter = load_adapter(p, base, allow_pickle=req.allow_pickle, base_fingerprint=base_sha)
        a, merge_base = resolve(adapter, base, req.merge_base, req.quant, progress)
        if not a.plain_lora:
            raise BadInput.one(str(a.path / "adapter_config.json"), "--switchable supports plain LoRA and rsLoRA "
                               "adapters only (this one uses DoRA or modules_to_save)",
                               "export it merged (without --switchable)")
        check_side_path([a])
        adapters.append(a)
        bases.add(base_key(merge_base, a.quantization))
    if len(bases) > 1:
        described = "; ".join(f"{a.path.name}: {a.quantization.describe() if a.quantization else 'original weights'}"
                              for a in adapters)
        raise BadInput.one("--adapter", f"the adapters were trained against different bases ({described}): one base "
                           "graph cannot be faithful to all of them",
                           "export adapters trained on the same 4-bit base together, or each merged on its own")
    merge_base = next(iter(bases))[0]
    plain = plain_base(base, work, progress)
    if not need_source:
        return tuple(adapters), merge_base, plain, plain, None
    source = unmerged_source(plain, adapters[0], merge_base, work)
    return tuple(adapters), merge_base, plain, source, union_adapter(plain, adapters, work / "lora-union")


def write_files(plain: Path, adapters, names, inputs: tuple[LoraInput, ...], folder: Path,
                progress: Progress = quiet) -> dict:
    """One .onnx_adapter per adapter; returns {name: sha256}. Runs in a child process (PEFT, torch)."""
    folder.mkdir(exist_ok=True)
    hashes = {}
    for adapter, name in zip(adapters, names):
        progress(f"writing {ADAPTERS}/{name}{SUFFIX}")
        path = folder / f"{name}{SUFFIX}"
        write_adapter(path, adapter_arrays(plain, adapter, inputs))
        hashes[name] = sha256_file(path)
    return hashes


def _entry(adapter, name: str, sha: str, out: Path):
    return adapter_entry(adapter, out, name=name, file=f"{ADAPTERS}/{name}{SUFFIX}", file_sha256=sha)


def export(req: SwitchRequest, progress: Progress = quiet):
    """A new switchable export: base graph + one adapter file per adapter, then parity of each."""
    names = check_request(req)
    target = load_target(req.target)
    if target.backend != "genai-builder":
        raise BadInput.one(target.source, f"--switchable needs the genai-builder backend (this target uses "
                           f"{target.backend})", "use a genai-builder target such as ort-cpu-fp32")
    if target.quantization.scheme not in SCHEMES:
        raise BadInput.one(target.source, f"--switchable writes unquantized or int4 base weights (MatMulNBits, the "
                           f"LoRA side paths float); this target quantizes to {target.quantization.scheme}",
                           f"use a target with scheme {' or '.join(repr(s) for s in SCHEMES)}, e.g. ort-cpu-fp32 or "
                           "ort-cpu-int4, or export each adapter merged")
    base = check_base(req.base)
    untested = family_note(base, target.backend)  # refused here before any work, or the note for the manifest
    if untested:
        progress(untested)
    out = Path(req.out)
    check_new_output(out)
    check_free_disk(out, export_bytes(base, target), "the base as trained plus 2.2 x the export")
    check_memory("export", base, target, str(base / "config.json"))
    with staged(out) as tmp, scratch(out, "work") as work:
        base_sha = safetensors_fingerprint(base)
        adapters, merge_base, plain, source, union = run_in_child(prepare, req, base, work, base_sha,
                                                                  progress=progress)
        progress(f"building the base graph with LoRA inputs ({target.precision}) on the {merge_base} base, for "
                 "the union of the adapters' target modules")
        # the LoRA side paths stay float with quantized base weights (the backend excludes and checks them)
        BACKENDS[target.backend].build(source, tmp, target, tmp / "build.log", adapter=union)
        inputs = make_switchable(tmp / "model.onnx")
        hashes = run_in_child(write_files, plain, adapters, names, inputs, tmp / ADAPTERS, progress=progress)
        manifest = ExportManifest(
            base=base_entry(base, out, base_sha),
            adapters=tuple(_entry(a, n, hashes[n], out) for a, n in zip(adapters, names)),
            target=tomllib.loads(Path(target.source).read_text()),
            merge_base=merge_base,
            graph=SWITCHABLE,
            lora_inputs=len(inputs),
            versions=package_versions(),
            family=untested,
        )
        write_export_manifest(tmp, manifest)
        progress("validating parity: the base, then each adapter against its own reference")
        try:
            report = validate(tmp, progress=progress, base_sha=base_sha)
        except UnreadableModel as e:
            raise ToolchainFailed(f"the genai builder wrote a model that cannot be loaded: {e}") from e
        write_export_manifest(tmp, replace(manifest, parity=ParitySummary(
            passed=report.passed, failures=tuple(str(c) for c in report.failures),
            sections={n: r.passed for n, r in report.sections})))
    return out, merge_base, report


def add(req: SwitchRequest, progress: Progress = quiet):
    """--into: add adapter files to an existing switchable export, after checking that they fit its graph and
    base, and that each passes parity; the graph is not rebuilt."""
    into = Path(req.into)
    manifest = read_export_manifest(into)
    if manifest.graph != SWITCHABLE:
        raise BadInput.one(str(into), f"not a switchable export (its graph is {manifest.graph})",
                           "pass a directory written by `lora-export export --switchable`, or export anew")
    entries = manifest.adapters
    names = check_request(req, taken=tuple(e.name or "" for e in entries))
    base = check_base(req.base)
    check_memory("validate", base, parse_target(manifest.target, f"{into / EXPORT_MANIFEST}:target"), str(into))
    base_sha = safetensors_fingerprint(base)
    if base_sha != manifest.base.files_sha256:  # the same weight files, byte for byte
        raise BadInput.one(str(base), f"its weights are not those of the base {into} was exported from "
                           f"({manifest.base.path}: the sha256 of its weight files differ)",
                           "pass the export's own base with --base (an adapter for another base needs its own export)")
    inputs = lora_inputs(into / "model.onnx")
    with scratch(into, "add") as work:
        adapters, merge_base, plain, _, _ = run_in_child(prepare, req, base, work, base_sha, False, progress=progress)
        if base_key(merge_base, adapters[0].quantization) != base_key(
                manifest.merge_base, entries[0].resolved_quantization):
            raise BadInput.one(str(adapters[0].path), f"trained against another base than the export's (merge base "
                               f"{merge_base} vs {manifest.merge_base}, or other 4-bit settings)",
                               "add adapters trained on the export's 4-bit base, or make a new export")
        hashes = run_in_child(write_files, plain, adapters, names, inputs, work / ADAPTERS, progress=progress)
        new = [_entry(a, n, hashes[n], into) for a, n in zip(adapters, names)]
        progress("validating parity of the added adapter(s)")
        # validate loads the base at the path the export recorded: these hashes are of that base only if it is --base
        same = locate(manifest.base, into, "base model").resolve() == base.resolve()
        report = validate(into, progress=progress, extra=(new, work), base_sha=base_sha if same else None)
        if report.passed:
            # the top-level parity.md/json: the sections recorded so far, then the ones added now
            listed = (BASE_SECTION, *(e.name or "" for e in entries))
            old = recorded_sections(into)
            whole = replace(report, sections=tuple((n, old[n]) for n in listed if n in old) + report.sections)
            (into / ADAPTERS).mkdir(exist_ok=True)
            for n in names:
                os.replace(work / ADAPTERS / f"{n}{SUFFIX}", into / ADAPTERS / f"{n}{SUFFIX}")
            recorded = manifest.parity.sections if manifest.parity and manifest.parity.sections else {}
            summary = ParitySummary(passed=whole.passed, failures=tuple(str(c) for c in whole.failures),
                                    sections={**recorded, **{n: r.passed for n, r in report.sections}})
            write_export_manifest(into, replace(manifest, adapters=tuple(entries) + tuple(new), parity=summary))
            write_reports(whole, into)
    return into, merge_base, report


def export_command(args, progress: Progress = quiet):
    """The CLI's export arguments: (dir, merge base, report) for --switchable/--into, else None (after checking
    the options that only they take, and the --target/--out the other exports need)."""
    switched = args.switchable or args.into is not None
    problems = []
    if not switched:
        if args.adapter_name:
            problems.append(Problem("--adapter-name", "names adapter files, which only --switchable/--into write",
                                    "add --switchable, or drop --adapter-name"))
        for flag, value in (("--target", args.target), ("--out", args.out)):
            if value is None:
                problems.append(Problem(flag, "is required", f"pass {flag} (see `lora-export export --help`)"))
        raise_if(problems)
        return None
    flag = "--into" if args.into is not None else "--switchable"
    for other, value in (("--keep-adapter", args.keep_adapter), ("--adapter-weight", args.adapter_weight)):
        if value:
            problems.append(Problem(other, f"cannot be combined with {flag}: each adapter is its own file, active "
                                    "one at a time at its own weight", f"drop {other}, or drop {flag}"))
    if args.into is not None:
        if args.out is not None:
            problems.append(Problem("--out", "--into adds to an existing export", "drop --out, or drop --into"))
        if args.target is not None:
            problems.append(Problem("--target", "--into uses the export's own target", "drop --target"))
    else:
        for name, value in (("--target", args.target), ("--out", args.out)):
            if value is None:
                problems.append(Problem(name, "is required with --switchable", f"pass {name}"))
    raise_if(problems)
    req = SwitchRequest(base=args.base, adapters=tuple(args.adapter), target=args.target, out=args.out,
                        into=args.into, names=tuple(args.adapter_name) if args.adapter_name else None,
                        merge_base=args.merge_base, allow_pickle=args.allow_pickle,
                        quant=QuantRequest(quant_type=args.bnb_quant_type, blocksize=args.bnb_block_size,
                                           double_quant=args.bnb_double_quant, load_dtype=args.bnb_load_dtype,
                                           training_config=args.training_config))
    return add(req, progress) if args.into is not None else export(req, progress)
