"""The recipe. Each stage is one visible call, in order: check inputs, merge, build the graph, validate.

Module map: data flows one way, down the stages; the records between them are ``manifests``' dataclasses.

    train.py      base + data   -> adapter dir + training_manifest.json (manifests.TrainingManifest)
    adapters.py   adapter dir   -> Adapter, checked against the base (reads the manifest, never the trainer)
    merge.py      base + Adapters -> merged fp32 checkpoint (+ the base as trained), streamed shard by shard
    export/       checkpoint    -> model.onnx (a graph backend by name); quantize/: its weights (a scheme by name)
    parity.py     export dir    -> parity verdict against reference.py (the adapted model as trained), via runtime.py
    latency.py    export dir    -> latency: merged vs base (vs unmerged)
    exportdir.py  an export's records of its base and adapters (manifests.BaseEntry, AdapterEntry), and the
                  checks that find them again: the base is hashed once per command and the fingerprint handed on
    prompts.py, sidepath.py, reference.py: the parity prompts, the base a side path sits on, the model as trained
    pipeline.py   this file: export() runs the stages above and writes export_manifest.json
                  (manifests.ExportManifest); validate() and bench() read it back. switchable*.py: the same
                  for one base graph with an adapter file per adapter; they import the modules above, never this
                  one (validate and bench here hand a switchable export to them). cli.py and demo.py import this.

export(), top to bottom: check_inputs -> prepare (child: adapters, merge, fp16 check) -> build -> _manifest
-> quantized_weights (child: training scales, survival) -> write the manifest -> validate_new -> the manifest
again with parity_summary.

    lora-export export  -> export()     base + adapter -> merged fp32 -> ONNX (target precision) -> parity
    lora-export validate -> validate()  an export dir against the adapted model as it was trained
    lora-export bench   -> bench()      the merged export against the base export, interleaved

Every output directory is written as a temporary sibling and renamed into place only when complete.
This process never imports torch before the graph is built: the checks and the merge, the graph build,
and each parity model run in child processes one after the other (``isolate.run_in_child``), so the peak
memory of the whole command is that of its biggest single stage, not their sum.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from .adapters import Adapter, attach, base_name_note, load_adapter
from .base import check_base, is_prequantized, load_fp32, load_tokenizer
from .checkpoint import parameter_count
from .errors import BadInput, ToolchainFailed, UnreadableModel
from .export import BACKENDS
from .export.io_spec import check_external_data
from .exportdir import (
    PARITY_TMP,
    adapter_entry,
    adapters_of,
    base_entry,
    check_base_unchanged,
    check_memory_of,
    check_report_path,
    context_of,
    export_bytes,
    export_disk_note,
    locate,
)
from .families import family_note
from .fingerprint import safetensors_fingerprint
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
from .merge import MergeResult, merge
from .outputs import check_free_disk, check_new_output, scratch, staged, sweep_temp
from .precision import check_fp16_range
from .progress import Progress, quiet
from .prompts import bench_prompt, check_prompt_lengths, load_prompts
from .quantize import graph_layout, has_source_check, source_check
from .quantized_base import QuantRequest, plain_base, resolve
from .quantized_base import check_request as check_quant_request
from .reference import COMPUTE_DTYPE as REFERENCE_DTYPE
from .reference import DEVICE as REFERENCE_DEVICE
from .reference import describe as describe_reference
from .reference import as_trained_dir, layerwise_for, reference_model, torch_model
from .sidepath import build_unmerged, check_side_path, unmerged_source
from .targets import (
    check_against_context,
    load_target,
    parse_target,
    tolerance_differences,
    tomllib,
)
from .versions import package_versions

if TYPE_CHECKING:  # imported where used: numpy and ONNX Runtime stay out of the export's process until parity
    from . import parity

@dataclass(frozen=True)
class ExportRequest:
    base: Path
    adapter: Path | tuple[Path, ...]  # several adapters are combined linearly
    target: str
    out: Path
    adapter_weights: tuple[float, ...] | None = None  # one per adapter; default 1.0 each
    merge_base: str | None = None  # None: the 4-bit base for a QLoRA adapter (nf4/fp4), else original
    quant: QuantRequest = QuantRequest()  # what the command line says about that 4-bit base
    allow_pickle: bool = False  # accept a pickle-only adapter (read with torch.load(weights_only=True))
    keep_adapter: bool = False  # export the unmerged graph: the LoRA as a side path beside each MatMul


@dataclass(frozen=True)
class ExportResult:
    out: Path
    merge_base: str
    parity: parity.ParityReport


@dataclass(frozen=True)
class Prepared:
    """What the preparing child hands back: checked adapters, the merge, and what the graph builder reads."""

    adapters: tuple[Adapter, ...]
    weights: tuple[float, ...]
    merge_base: str
    merged: MergeResult
    graph_source: Path  # the merged checkpoint; for --keep-adapter the base as trained (the side path's base)
    prompt_ids: tuple | None = None  # the default parity prompts, tokenized (prompts, documents)
    base: Path | None = None  # the base in full precision: itself, or a pre-quantized base dequantized
    base_sha: dict | None = None  # the base's fingerprint, hashed once for the adapters' checks and the manifest


def check_request(req: ExportRequest) -> None:
    """The export's own arguments, before anything is read."""
    check_quant_request(req.quant)
    paths = [req.adapter] if isinstance(req.adapter, (str, Path)) else list(req.adapter)
    if req.adapter_weights is not None:
        if len(req.adapter_weights) != len(paths):
            raise BadInput.one("--adapter-weight", f"{len(req.adapter_weights)} weights for {len(paths)} adapters",
                               "pass one --adapter-weight per --adapter, in the same order (or none: 1.0 each)")
        bad = [w for w in req.adapter_weights if not math.isfinite(w)]
        if bad:
            raise BadInput.one("--adapter-weight", f"{bad[0]} is not a finite number",
                               "pass a finite weight such as 1.0 or 0.5 for each adapter")


def export(req: ExportRequest, progress: Progress = quiet) -> ExportResult:
    """Base + adapter(s) -> a checked ONNX export at ``req.out``, step by step (each step a function below)."""
    base, target, out, untested = check_inputs(req)
    if untested:
        progress(untested)
    if target.graph == "unmerged" and not req.keep_adapter:
        progress(f"target {target.name} keeps the adapter unmerged: a float side path beside each MatMul of the base "
                 "as trained (its graph = \"unmerged\")")
        req = replace(req, keep_adapter=True)
    with staged(out) as tmp, scratch(out, "merged") as work:
        # a child process: torch, PEFT and the merge's memory are gone before the graph builder starts
        prep: Prepared = run_in_child(prepare, req, base, target, work, progress=progress)
        build(req, target, prep, tmp, progress)
        manifest = _manifest(req, base, out, target, prep)
        manifest = replace(manifest, quantization=quantized_weights(req, target, prep, base, tmp, progress),
                           family=untested)
        write_export_manifest(tmp, manifest)  # validate reads the target and the inputs from it
        report = validate_new(tmp, target, prep, progress)
        write_export_manifest(tmp, replace(manifest, parity=parity_summary(report)))
    return ExportResult(out=out, merge_base=prep.merge_base, parity=report)


def check_inputs(req: ExportRequest) -> tuple[Path, object, Path, str | None]:
    """(base, target, out, the note for a family lora-export has not tested): the request, the target, the base
    against it (a family the backend must not export is refused here), a new output and the disk it needs."""
    check_request(req)
    target = load_target(req.target)
    base = check_base(req.base)
    untested = family_note(base, target.backend)
    check_against_context(target, context_of(base)[0], str(base / "config.json"))
    out = Path(req.out)
    check_new_output(out)
    check_free_disk(out, export_bytes(base, target), export_disk_note(base))
    check_memory("export", base, target, str(base / "config.json"))
    return base, target, out, untested


def build(req: ExportRequest, target, prep: Prepared, tmp: Path, progress: Progress = quiet) -> None:
    """The graph, merged or (--keep-adapter) with the adapter as a side path, into ``tmp``."""
    progress(f"building the {'unmerged' if req.keep_adapter else 'merged'} ONNX graph with {target.backend} "
             f"({target.precision}, weights {target.quantization.scheme})")
    graph_args = (target, prep.graph_source, tmp, prep.adapters[0].path if req.keep_adapter else None)
    if BACKENDS[target.backend].own_process:
        build_graph(*graph_args)
    else:
        run_in_child(build_graph, *graph_args, progress=progress)


def quantized_weights(req: ExportRequest, target, prep: Prepared, base: Path, tmp: Path,
                      progress: Progress = quiet) -> dict | None:
    """For quantized weights: the training's scales if asked, and what survives of the adapter (the manifest's
    ``quantization``); for an unmerged NF4 graph the base's trained codes. None for unquantized weights and the
    other unmerged graphs (their side paths are float, their base quantized as the target says)."""
    if target.quantization.scheme == "none" or (req.keep_adapter and target.quantization.scheme != "nf4"):
        return None
    if req.keep_adapter:
        return run_in_child(trained_codes, tmp, prep, target, progress=progress)
    return run_in_child(requantized, tmp, prep, base, target, progress=progress)


def validate_new(tmp: Path, target, prep: Prepared, progress: Progress = quiet) -> parity.ParityReport:
    """Parity of the graph just built (a model our own build cannot load is the toolchain's failure)."""
    progress("validating parity against the adapted model as trained")
    try:
        return validate(tmp, prepared=prep, progress=progress)
    except UnreadableModel as e:  # the model was written a moment ago by our own build
        raise ToolchainFailed(f"the {target.backend} backend wrote a model that cannot be loaded: {e}") from e


def parity_summary(report: parity.ParityReport) -> ParitySummary:
    """The manifest's ``parity``: the verdict and the total stage's numbers."""
    total = report.stages["total"]
    return ParitySummary(passed=report.passed, failures=tuple(str(c) for c in report.failures),
                         ran_on=tuple(report.ran_on), not_checked_on=tuple(report.not_checked_on),
                         max_abs_diff=total.max_abs_diff, max_rel_diff=total.max_rel_diff, mean_kl=total.mean_kl,
                         top1_agreement=total.top1_agreement, adapter_retention=report.adapter_retention)


def build_graph(target, checkpoint: Path, out_dir: Path, adapter: Path | None, progress: Progress = quiet) -> None:
    """The target's graph backend on a checkpoint (in a child process: the torch-dynamo backend loads the
    model in-process, and the export's own process stays light)."""
    BACKENDS[target.backend].build(checkpoint, out_dir, target, out_dir / "build.log",
                                   **({"adapter": adapter} if adapter is not None else {}))


def requantized(export_dir: Path, prep: Prepared, base: Path, target, progress: Progress = quiet) -> dict:
    """After the build of a quantized graph: NF4 with the training's scales if asked, and how much of the
    adapter's change survives the weight quantization (for the manifest). Runs in a child process."""
    from .quantize.survival import ERASED, measure_survival

    adapters = list(prep.adapters)
    if target.quantization.scales == "original":
        from .quantize.nf4 import reuse_training_scales

        n = reuse_training_scales(export_dir, prep.merged.checkpoint, prep.base or base, adapters[0],
                                  target.quantization)
        progress(f"re-coded {n} NF4 weights with the block scales the adapter was trained against")
    progress("measuring how much of the adapter's change survives the weight quantization")
    survival = measure_survival(export_dir, prep.merged.checkpoint, prep.base or base, adapters, prep.merge_base,
                                target.quantization)
    if survival.tensors:
        progress(f"adapter change kept through {survival.scheme} weights: median {survival.median_survival:.2f}, "
                 f"worst {survival.min_survival:.2f} over {len(survival.tensors)} tensors"
                 + (f"; ERASED (< {ERASED}) in {len(survival.erased)}: {survival.erased[0].node} ..."
                    if survival.erased else ""))
    return survival.to_dict()


def trained_codes(export_dir: Path, prep: Prepared, target, progress: Progress = quiet) -> dict:
    """An unmerged NF4 graph of a QLoRA adapter: every base block re-coded with the absmax it was trained with, so
    each base weight holds the 4-bit code the adapter was trained beside (the fine-tune is the float side path).
    Other adapters keep the fresh scales of the post-process. Runs in a child process."""
    from .quantize.nf4 import reuse_training_scales
    from .quantized_base import quantization_of

    adapter, q = prep.adapters[0], target.quantization
    nf4 = quantization_of(adapter)[1] if adapter.trained_on_4bit and prep.merge_base == "nf4" else None
    if nf4 is None or nf4.quant_type != "nf4" or nf4.blocksize != q.block_size:
        why = (f"the adapter was trained with {nf4.quant_type} blocks of {nf4.blocksize}" if nf4 is not None else
               f"the adapter was not trained on an NF4 base (merge base {prep.merge_base})")
        progress(f"base weights: NF4 with fresh block scales ({why})")
        return {"scheme": "nf4", "graph": "unmerged", "base_codes": "fresh scales", "why": why}
    n = reuse_training_scales(export_dir, prep.graph_source, prep.base, adapter, q)
    progress(f"re-coded {n} NF4 base weights with the block scales they were trained with: the trained 4-bit codes")
    return {"scheme": "nf4", "graph": "unmerged", "base_codes": "as trained", "recoded_matmuls": n}


def prepare(req: ExportRequest, base: Path, target, work: Path, progress: Progress = quiet) -> Prepared:
    """Check every adapter against the base, merge them in fp32 shard by shard (and for fp16 targets check
    the range). For --keep-adapter, also write the base the side path sits on (the NF4 round trip for QLoRA)."""
    paths = [req.adapter] if isinstance(req.adapter, (str, Path)) else list(req.adapter)
    prompt_ids = load_prompts(load_tokenizer(base))  # a broken tokenizer is refused before the merge
    base_sha = safetensors_fingerprint(base)
    adapters = [load_adapter(p, base, allow_pickle=req.allow_pickle, base_fingerprint=base_sha) for p in paths]
    weights = tuple(req.adapter_weights or [1.0] * len(adapters))
    resolved = [resolve(a, base, req.merge_base, req.quant, progress) for a in adapters]
    adapters, merge_base = [a for a, _ in resolved], resolved[0][1]
    check_same_base(adapters)
    for a in adapters:
        note = base_name_note(a, base)
        if note:
            progress(note)
        if a.quantization:
            progress(f"  4-bit base of {a.path.name}: {a.quantization.describe()}")
    if req.keep_adapter:
        check_side_path(adapters, target if target.graph == "unmerged" else None)
    plain = plain_base(base, work, progress)
    progress(f"merging {len(adapters)} adapter(s) in fp32 into the {merge_base} base, shard by shard")
    merged = merge(plain, adapters, work / "checkpoint", merge_base, weights, progress=progress,
                   as_trained_dir=as_trained_dir(work, parameter_count(plain)))
    if target.precision == "fp16":
        progress("checking that weights and activations fit fp16")
        if layerwise_for(parameter_count(merged.checkpoint)):  # one decoder layer in memory, as parity's models
            from .layerwise import load as load_layerwise
            from .precision import checkpoint_abs_max

            check_fp16_range(load_layerwise(merged.checkpoint), prompt_ids[0], str(adapters[0].path),
                             weight_max=checkpoint_abs_max(merged.checkpoint))
        else:
            check_fp16_range(load_fp32(merged.checkpoint), prompt_ids[0], str(adapters[0].path))
    source = merged.checkpoint
    if req.keep_adapter:
        source = unmerged_source(plain, adapters[0], merge_base, work)
    return Prepared(adapters=tuple(adapters), weights=weights, merge_base=merge_base, merged=merged,
                    graph_source=source, prompt_ids=prompt_ids, base=plain, base_sha=base_sha)


def check_same_base(adapters) -> None:
    """Adapters combined in one export were trained against one base (the reference and the merge use one)."""
    def said(a):
        return a.quantization.describe() if a.quantization else "its full-precision weights (nothing on record)"

    if len({a.quantization.key() if a.quantization else None for a in adapters}) > 1:
        first, other = adapters[0], next(a for a in adapters if (a.quantization and a.quantization.key()) !=
                                         (adapters[0].quantization and adapters[0].quantization.key()))
        raise BadInput.one(str(other.path), f"was trained against another base than {first.path.name}: {said(other)}, "
                           f"against {said(first)}", "export these adapters one at a time, or, if they were trained on "
                           "the same 4-bit base, give its settings with --merge-base nf4 and --bnb-* for all")


def _manifest(req: ExportRequest, base: Path, out: Path, target, prep: Prepared) -> ExportManifest:
    result = prep.merged
    return ExportManifest(
        base=base_entry(base, out, prep.base_sha),
        adapters=tuple(adapter_entry(a, out, weight=w) for a, w in zip(prep.adapters, prep.weights)),
        target=tomllib.loads(Path(target.source).read_text()),  # validate and bench apply this one
        merge_base=prep.merge_base,
        graph="unmerged" if req.keep_adapter else "merged",
        merged_modules=len(result.changed),
        max_abs_weight_change=result.max_abs_delta,
        replaced_modules=list(result.replaced),
        untied_embeddings=result.untied,
        versions=package_versions(),
    )


def validate(export_dir: Path, report_json: Path | None = None, junit: Path | None = None,
             prompts: Path | None = None, progress: Progress = quiet,
             prepared: Prepared | None = None) -> parity.ParityReport:
    """Parity of an export against the adapted model as trained, with the target's tolerances.

    ``prepared`` is the checked adapters and the merge (with the base as trained beside it) when the caller
    has them (export does); else the adapters are checked and the merge redone into a temporary folder.
    This process stays light (no torch): the checks, the merge and each runtime's models run in child
    processes one after the other, one model in memory at a time (see ``parity.measure``).
    """
    from . import parity  # numpy and ONNX Runtime only here: the export's process stays light until parity
    from .runtime import OrtCausalLM

    export_dir = Path(export_dir)
    manifest = read_export_manifest(export_dir)
    if prepared is None:  # the command itself (an export's own parity run is in the estimate check_inputs made)
        check_memory_of(export_dir, manifest, "validate")
    if manifest.graph == SWITCHABLE:  # --switchable: a section per adapter (lora_export/switchable.py)
        from .switchable_parity import validate as validate_switchable

        return validate_switchable(export_dir, report_json, junit, prompts, progress=progress)
    target = parse_target(manifest.target, f"{export_dir / EXPORT_MANIFEST}:target")
    for path in (report_json, junit):
        check_report_path(path)
    base = check_base(locate(manifest.base, export_dir, "base model"))
    base_sha = None if prepared is not None else check_base_unchanged(base, manifest)  # (export hashed it just now)
    check_external_data(export_dir / "model.onnx")
    max_positions, vocab_size = context_of(base)
    check_against_context(target, max_positions, str(base / "config.json"))
    steps = max(parity.MIN_STEPS, target.tolerances.greedy_tokens)
    from .runtime import check_providers, parity_providers

    run_with, not_here = parity_providers(target.execution_providers)
    check_providers(run_with, export_dir / "model.onnx")
    if not_here:
        progress(f"{', '.join(not_here)} not installed here: parity runs the graph on {', '.join(run_with)} with "
                 "the target's thresholds; the target's own kernels need a machine that has them")
    sweep_temp(PARITY_TMP)  # what a killed validate left: the merged fp32 checkpoint, stored logits
    with tempfile.TemporaryDirectory(prefix=f"{PARITY_TMP}{os.getpid()}-") as tmp:
        if prepared is not None and prepared.prompt_ids is not None and prompts is None:
            token_ids = prepared.prompt_ids
        else:
            prepared, token_ids = run_in_child(validation_inputs, export_dir, manifest, base, prompts, Path(tmp),
                                               prepared, max_positions, steps, base_sha, progress=progress)
        shapes = parity.make_shapes(*token_ids, max_positions, steps)
        adapters, merged = list(prepared.adapters), prepared.merged
        params = parameter_count(prepared.base or base)
        tolerances, size_note = target.tolerances.for_model(params)
        by_layer = layerwise_for(params)  # PyTorch models over 5 GiB: one decoder layer in memory at a time
        if by_layer:
            progress("parity: the PyTorch models are read from disk one decoder layer at a time")
        models = parity.Models(
            reference=functools.partial(reference_model, prepared.base or base, prepared.adapters, prepared.weights,
                                        merged.as_trained, by_layer),
            candidate=functools.partial(OrtCausalLM, export_dir, run_with),
            merged=functools.partial(torch_model, merged.checkpoint, by_layer),
            base=functools.partial(torch_model, prepared.base or base, by_layer),
            isolate=True,
            draft=by_layer,  # a layerwise reference checks the export's greedy tokens rather than decode its own
        )
        per_shape, stages, retention = parity.measure(models, shapes, steps, Path(tmp), progress=progress,
                                                      vocab_size=vocab_size)
        side_paths = manifest.graph != "merged"
        layout = graph_layout(export_dir, target, side_paths)
        if has_source_check(target, side_paths):
            layout += run_in_child(source_check, export_dir, prepared.graph_source, progress=progress)
    report = parity.judge(per_shape, stages, retention, tolerances, target.name, describe_reference(adapters),
                          steps, notes=(*tolerance_differences(target), *([size_note] if size_note else [])),
                          reference_compute=(REFERENCE_DTYPE, REFERENCE_DEVICE), ran_on=run_with,
                          not_checked_on=not_here, layout=layout)
    parity.write_reports(report, export_dir)
    if report_json:
        parity.write_json(report, Path(report_json))
    if junit:
        parity.write_junit(report, Path(junit))
    return report


def validation_inputs(export_dir: Path, manifest: ExportManifest, base: Path, prompts: Path | None, tmp: Path,
                      prepared: Prepared | None, max_positions: int, steps: int, base_sha: dict | None = None,
                      progress: Progress = quiet):
    """(Prepared, parity prompt token ids): the adapters checked unchanged and merged again unless given
    (``base_sha``: the base's fingerprint, already checked). Runs in a child process (it imports torch)."""
    token_ids = load_prompts(load_tokenizer(base), prompts)
    check_prompt_lengths(token_ids[0], max_positions, steps, prompts)
    if prepared is None:
        adapters, weights = adapters_of(manifest.adapters, export_dir, base, base_sha)
        plain = plain_base(base, tmp, progress)
        progress("merging again into a temporary folder (the reference's base and the merge/export breakdown)")
        merged = merge(plain, adapters, tmp / "merged", manifest.merge_base, weights,
                       as_trained_dir=as_trained_dir(tmp, parameter_count(plain)))
        source = (merged.checkpoint if manifest.graph == "merged"  # what the graph was built from (see export)
                  else unmerged_source(plain, adapters[0], manifest.merge_base, tmp))
        prepared = Prepared(adapters=tuple(adapters), weights=tuple(weights), merge_base=manifest.merge_base,
                            merged=merged, graph_source=source, base=plain)
    return prepared, token_ids


def bench(export_dir: Path, json_path: Path | None = None, progress: Progress = quiet, rounds: int = 100,
          plot_path: Path | None = None, memory: bool = True, eager: bool = False, providers=None,
          new_tokens: int = 64):
    """Time the export against the unadapted base export for the same target (built once, into bench-base/),
    and, for a merged export of a plain LoRA adapter, against the unmerged side-path graph (bench-unmerged/).
    ``providers``, ``new_tokens``: run with these providers instead of the target's, and decode this many tokens
    per round (benchmarks/gpu_check.py's CPU dry run)."""
    from . import latency
    from .runtime import TorchCausalLM

    export_dir = Path(export_dir)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or not 2 <= rounds <= 100_000:
        raise BadInput.one("--rounds", f"{rounds!r} interleaved rounds: the median and its interval need at least 2",
                           "pass --rounds between 2 and 100000 (default 100)")
    for path in (json_path, plot_path):
        check_report_path(path)
    manifest = read_export_manifest(export_dir)
    check_memory_of(export_dir, manifest, "bench")
    if manifest.graph == SWITCHABLE:  # each adapter active vs none vs merged: lora_export/switchable_bench.py
        from .switchable_bench import bench_export

        check_external_data(export_dir / "model.onnx")
        return bench_export(export_dir, manifest, json_path, rounds, new_tokens, providers, progress)
    target = parse_target(manifest.target, f"{export_dir / EXPORT_MANIFEST}:target")
    check_external_data(export_dir / "model.onnx")  # refuse a tampered export before building anything
    base = check_base(locate(manifest.base, export_dir, "base model"))
    base_sha = check_base_unchanged(base, manifest)
    adapters, weights = adapters_of(manifest.adapters, export_dir, base, base_sha)
    adapter = adapters[0]
    base_export = export_dir / "bench-base"
    unmerged = export_dir / "bench-unmerged"
    side_path = manifest.graph == "merged" and len(adapters) == 1 and adapter.plain_lora
    with contextlib.ExitStack() as stack:
        plain = base
        if is_prequantized(base) and (eager or not (base_export / "model.onnx").is_file() or
                                      (side_path and not (unmerged / "model.onnx").is_file())):
            plain = plain_base(base, stack.enter_context(scratch(base_export, "dequantized")), progress)
        if not (base_export / "model.onnx").is_file():
            progress(f"building the unadapted base export for {target.name} to compare against")
            with staged(base_export) as tmp:
                BACKENDS[target.backend].build(plain, tmp, target, tmp / "build.log")
        if side_path and not (unmerged / "model.onnx").is_file():
            progress("building the unmerged graph (LoRA as a side path) to show what merging saves")
            with staged(unmerged) as tmp, scratch(unmerged, "merged") as work:
                build_unmerged(plain, adapter, manifest.merge_base, target, tmp, work)
        extra = {}
        if eager:  # what users run without an export: the fp32 base with the adapter(s) unmerged, in PyTorch
            extra["peft-unmerged"] = TorchCausalLM(attach(load_fp32(plain), adapters, weights)[0].eval())
    prompt = bench_prompt(load_tokenizer(base))
    progress(f"timing {'merged, base and unmerged' if side_path else 'this export and base'}, "
             f"{rounds} interleaved rounds")
    result = latency.bench(export_dir, base_export, prompt, target.latency.max_ratio,
                           tuple(providers) if providers else target.execution_providers,
                           new_tokens=new_tokens, rounds=rounds, progress=progress,
                           unmerged_dir=unmerged if side_path else None,
                           memory=memory, extra=extra)
    latency.write_reports(result, Path(json_path) if json_path else export_dir / "bench.json",
                          export_dir / "bench.md", Path(plot_path) if plot_path else export_dir / "bench.png")
    return result
