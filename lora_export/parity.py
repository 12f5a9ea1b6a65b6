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
from typing import Any, Callable

import numpy as np

from .isolate import run_in_child
from .progress import Progress, quiet
from .runtime import Generation, LogitStore, generate, greedy_tokens, release, teacher_forced
from .targets import Tolerances

SCHEMA_VERSION = 4  # 3: max_rel_diff, the reference's dtype and device, tolerance notes; 4: metrics along the continuation
LOGIT_BUDGET_BYTES = 16 << 20  # logits one teacher-forced batch may produce at once (about one sequence)
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
    max_rel_diff: float = 0.0  # max |logit diff| / max |reference logit|: scales with the model's logits
    reference_max_abs: float = 0.0  # max |reference logit| over the compared positions
    # along the generated continuation, position by position (0: the prompt pass's last row), over sequences:
    along_max_abs_diff: tuple[float, ...] = ()  # max |logit diff|
    along_mean_kl: tuple[float, ...] = ()  # mean KL(reference || candidate)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


class Accumulator:
    """Metrics of candidate rows against reference rows, added a sequence at a time in small row chunks
    (float64 temporaries of a few MB), so that no set of logits has to be held whole."""

    CHUNK = 8  # rows per step: float64 temporaries of a few MB even for a 150k vocabulary

    def __init__(self) -> None:
        self.sequences = self.rows = self.elements = self.top1 = 0
        self.max_abs = self.sum_abs = self.sum_d2 = self.sum_r2 = self.cos = self.kl = self.max_kl = 0.0
        self.ref_max = 0.0
        self.prefixes: list[int] = []
        self.along_max: list[float] = []  # per continuation position: max |diff| over sequences
        self.along_kl: list[float] = []  # per continuation position: summed KL, and how many sequences
        self.along_n: list[int] = []

    def add(self, r: np.ndarray, c: np.ndarray, prefix: int | None = None, *also: "Accumulator",
            continuation: int | None = None) -> None:
        """Add one sequence's rows; ``also``: other accumulators that take the same rows (computed once);
        ``continuation``: the row where the generated continuation starts, to record metrics along it."""
        if r.shape != c.shape:
            raise ValueError(f"logit rows of shape {c.shape} compared with reference rows {r.shape}")
        for acc in (self, *also):
            acc.sequences += 1
        for i in range(0, len(r), self.CHUNK):
            rr, cc = r[i:i + self.CHUNK].astype(np.float64), c[i:i + self.CHUNK].astype(np.float64)
            d = np.abs(rr - cc)
            lp, lq = _log_softmax(rr), _log_softmax(cc)
            kl = (np.exp(lp) * (lp - lq)).sum(-1)
            if continuation is not None:
                self._along(i - continuation, d.max(-1), kl)
            norms = np.maximum(np.linalg.norm(rr, axis=-1) * np.linalg.norm(cc, axis=-1), 1e-30)
            part = (len(rr), d.size, float(d.max()), float(np.abs(rr).max()), float(d.sum()), float((d * d).sum()),
                    float((rr * rr).sum()), float(((rr * cc).sum(-1) / norms).sum()), float(kl.sum()),
                    float(kl.max()), int((rr.argmax(-1) == cc.argmax(-1)).sum()))
            for acc in (self, *also):
                acc._absorb(part)
        if prefix is not None:
            self.prefixes.append(prefix)

    def _along(self, first: int, row_max: np.ndarray, row_kl: np.ndarray) -> None:
        for k, (dm, kl) in enumerate(zip(row_max.tolist(), row_kl.tolist())):
            pos = first + k
            if pos < 0:
                continue
            while len(self.along_max) <= pos:
                self.along_max.append(0.0), self.along_kl.append(0.0), self.along_n.append(0)
            self.along_max[pos] = max(self.along_max[pos], dm)
            self.along_kl[pos] += kl
            self.along_n[pos] += 1

    def _absorb(self, part: tuple) -> None:
        rows, elements, max_abs, ref_max, sum_abs, sum_d2, sum_r2, cos, kl, max_kl, top1 = part
        self.rows += rows
        self.elements += elements
        self.max_abs, self.ref_max, self.max_kl = max(self.max_abs, max_abs), max(self.ref_max, ref_max), \
            max(self.max_kl, max_kl)
        self.sum_abs += sum_abs
        self.sum_d2 += sum_d2
        self.sum_r2 += sum_r2
        self.cos += cos
        self.kl += kl
        self.top1 += top1

    def metrics(self) -> Metrics:
        n = max(self.rows, 1)
        return Metrics(
            sequences=self.sequences, positions=self.rows, max_abs_diff=self.max_abs,
            mean_abs_diff=self.sum_abs / max(self.elements, 1),
            rel_l2=float(np.sqrt(self.sum_d2) / max(np.sqrt(self.sum_r2), 1e-30)), cosine=self.cos / n,
            mean_kl=self.kl / n, max_kl=self.max_kl, top1_agreement=self.top1 / n,
            greedy_min_identical=min(self.prefixes) if self.prefixes else None,
            greedy_mean_identical=float(np.mean(self.prefixes)) if self.prefixes else None,
            max_rel_diff=self.max_abs / max(self.ref_max, 1e-30), reference_max_abs=self.ref_max,
            along_max_abs_diff=tuple(self.along_max),
            along_mean_kl=tuple(k / max(n, 1) for k, n in zip(self.along_kl, self.along_n)),
        )


def identical_prefix(reference_tokens: list[int], own_tokens: list[int]) -> int:
    same = [x == y for x, y in zip(reference_tokens, own_tokens)]
    return same.index(False) if False in same else len(same)


def forced_prefix(reference_tokens: list[int], candidate_rows: np.ndarray, prompt_len: int) -> int:
    """The candidate's own greedy continuation, read off its teacher-forced logits: up to the first token
    where its argmax differs from the reference's, its inputs were the reference's tokens, so its own
    greedy run would have computed exactly these logits. One run gives both measurements."""
    own = candidate_rows[prompt_len - 1:].argmax(-1).tolist()
    return identical_prefix(reference_tokens, own)


def compare(ref: list[Generation], cand: list[Generation], own: list[Generation] | None = None) -> Metrics:
    """Metrics of candidate logits against reference logits on the same positions (and greedy texts, if given)."""
    acc = Accumulator()
    for i, (r, c) in enumerate(zip(ref, cand)):
        acc.add(r.logits, c.logits, None if own is None else identical_prefix(r.tokens, own[i].tokens))
    return acc.metrics()


@dataclass(frozen=True)
class Check:
    shape: str
    metric: str
    op: str  # "<=" or ">="
    threshold: float
    observed: float
    passed: bool

    def __str__(self) -> str:
        line = f"{self.shape}/{self.metric} = {self.observed:.4g} (needs {self.op} {self.threshold:g})"
        if self.shape == "merge" and not self.passed:
            line += (": the merged weights the graph was built from are not the model as trained (a QLoRA adapter "
                     "merged into the original weights? see --merge-base)")
        return line


@dataclass(frozen=True)
class ParityReport:
    target: str
    reference: str
    steps: int  # tokens generated per sequence (prompt pass + steps - 1 decode steps)
    shapes: dict  # shape name -> Metrics of the export against the reference
    stages: dict  # "merge", "export", "total", "adapter" -> Metrics pooled over shapes
    adapter_retention: float | None  # 1 - KL(adapted || export) / KL(adapted || base)
    checks: tuple[Check, ...]
    reference_dtype: str = "float32"
    reference_device: str = "cpu"
    # thresholds that differ from the target file they came from, and the small-model thresholds where they apply
    tolerance_notes: tuple[str, ...] = ()
    ran_on: tuple[str, ...] = ()  # the execution providers the export ran with here
    not_checked_on: tuple[str, ...] = ()  # the target's device providers this machine lacks (CPU stood in)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]


@dataclass(frozen=True)
class Models:
    """What parity runs, as zero-argument loaders (or ready models): loaded one at a time, in turn, and
    released before the next, so that peak memory is one model plus a few MB of logits."""

    reference: Callable[[], Any]  # the adapted model as trained (PyTorch)
    candidate: Callable[[], Any]  # the export (ONNX Runtime)
    merged: Callable[[], Any] | None = None  # the merged fp32 model (PyTorch): splits the error by stage
    base: Callable[[], Any] | None = None  # the unadapted base (PyTorch): the adapter's own effect
    # run the reference (PEFT), the other PyTorch models, and the export each in a child process of its own
    # (the loaders must then pickle): the caller stays light, and no stage's memory is stacked on another's
    isolate: bool = False
    # the reference's greedy tokens verified from the export's own greedy run (``verified_greedy``) instead of
    # decoded token by token: for a layerwise reference, where every decode step reads all the weights again
    draft: bool = False


def _open(model):
    return model if hasattr(model, "step") else model()


def _call(fn, *args, progress: Progress = quiet):
    return fn(*args, progress=progress)


def reference_stage(reference, seqs: list[list[int]], steps: int, budget: int, store: Path,
                    draft: list[list[int]] | None = None, progress: Progress = quiet):
    """The reference's greedy continuations and its logits for every position (to a file). Without ``draft``: it
    generates them (one batch, KV cache, last-position logits only), then one teacher-forced pass gives the logits.
    With ``draft`` (another model's greedy tokens): ``verified_greedy``. Returns (tokens, store state)."""
    model, ref_store = _open(reference), LogitStore(store)
    if draft is None:
        progress(f"parity: the reference generates {len(seqs)} sequences x {steps} tokens")
        tokens = [[] for _ in seqs]
        _decode_into(model, seqs, list(range(len(seqs))), steps, budget, ref_store, tokens)
    else:
        tokens = verified_greedy(model, seqs, draft, budget, ref_store, progress)
    state = ref_store.state()
    ref_store.close()
    return tokens, state


def verified_greedy(model, seqs: list[list[int]], draft: list[list[int]], budget: int, store: LogitStore,
                    progress: Progress = quiet) -> list[list[int]]:
    """The model's greedy continuations found by checking a guess instead of decoding token by token.

    One teacher-forced pass over prompt + guess gives the model's argmax at every position. Where it equals the
    guess at every position but the last (the last token is no input), the argmax row is the model's greedy
    continuation: up to any position its inputs were the model's own choices. The logits of that pass are then the
    ones greedy decoding reads, and go to ``store``.
    Elsewhere the argmax row becomes the next guess, agreeing with greedy decoding at least one token further, so a
    sequence needs at most as many passes as it has tokens (past that, as a guard, it is decoded). A layerwise model
    reads all its weights once per pass, so a guess that agrees (an export that keeps the model: the export's own
    greedy run) turns one read per token into one or two reads in all; one that departs early costs about a pass per
    token after the departure, as decoding would (the argmax row after it is a guess from the wrong tokens)."""
    tokens, todo, passes = [list(d) for d in draft], list(range(len(seqs))), 0
    while todo:
        if passes == len(tokens[todo[0]]):  # (a guard: batches of other widths can move a near tie by an ulp)
            progress(f"parity: {len(todo)} continuation(s) not settled in {passes} passes: the reference decodes them")
            _decode_into(model, [seqs[i] for i in todo], todo, passes, budget, store, tokens)
            break
        passes += 1
        progress(f"parity: the reference checks {len(todo)} greedy continuation(s) of {len(tokens[todo[0]])} tokens "
                 f"in one teacher-forced pass (pass {passes})")
        left = []
        for j, rows in teacher_forced(model, [seqs[i] + tokens[i][:-1] for i in todo], budget):
            i = todo[j]
            own = rows[len(seqs[i]) - 1:].argmax(-1).tolist()
            if own[:-1] != tokens[i][:-1]:
                left.append(i)
            else:  # (the last token is no input: a guess wrong only there is mended without another pass)
                store.put(i, rows)
            tokens[i] = own
        todo = sorted(left)
    return tokens


def _decode_into(model, seqs: list[list[int]], keys: list[int], steps: int, budget: int, store: LogitStore,
                 tokens: list[list[int]]) -> None:
    """Greedy decoding through the KV cache, then one teacher-forced pass for the logits (the path without a guess),
    for the sequences ``keys``; their tokens and rows go to ``tokens`` and ``store``."""
    decoded = greedy_tokens(model, seqs, steps)
    for j, rows in teacher_forced(model, [p + t[:-1] for p, t in zip(seqs, decoded)], budget):
        tokens[keys[j]] = decoded[j]
        store.put(keys[j], rows)


def draft_stage(candidate, shapes: list[Shape], steps: int, progress: Progress = quiet) -> list[list[int]]:
    """The export's own greedy continuations, each shape as its batches (the reference's guess, ``draft``)."""
    progress("parity: the export's greedy continuations, for the reference to check in one pass")
    model, tokens = _open(candidate), []
    for shape in shapes:
        for batch in shape.batches:
            tokens += [g.tokens for g in generate(model, [list(p) for p in batch], steps)]
    return tokens


def comparison_stages(merged, base, seqs: list[list[int]], tokens: list[list[int]], budget: int, ref_state: tuple,
                      store: Path, progress: Progress = quiet):
    """The merged and the unadapted model (PyTorch), one after the other, teacher-forced on the reference's
    tokens and compared with its logits as they go; the merged logits go to a file for the export stage.
    Returns (stage Metrics, merged store state or None)."""
    full = [p + t[:-1] for p, t in zip(seqs, tokens)]
    ref_store, merged_store = LogitStore.reader(ref_state), LogitStore(store)
    stages: dict[str, Metrics] = {}
    for key, loader, out in (("merge", merged, merged_store), ("adapter", base, None)):
        if loader is None:
            continue
        progress("parity: the merged fp32 model (PyTorch)" if key == "merge" else
                 "parity: the unadapted base (PyTorch)")
        model, acc = _open(loader), Accumulator()
        for i, rows in teacher_forced(model, full, budget):
            acc.add(ref_store[i], rows)
            if out is not None:
                out.put(i, rows)
        stages[key] = acc.metrics()
        del model
        release()
    state = merged_store.state() if "merge" in stages else None
    ref_store.close()
    merged_store.close()
    return stages, state


def candidate_stage(candidate, shapes: list[Shape], steps: int, ref_tokens: list[list[int]], ref_state: tuple,
                    merged_state: tuple | None, progress: Progress = quiet):
    """The export's run: each shape as its batches, teacher-forced with the reference's tokens through its KV
    cache, compared as it goes with the reference's (and the merged model's) stored logits.
    Returns (per-shape Metrics, total Metrics, export-stage Metrics or None)."""
    model = _open(candidate)
    ref_rows, merged_rows = LogitStore.reader(ref_state), LogitStore.reader(merged_state) if merged_state else None
    per_shape, total, export = {}, Accumulator(), Accumulator()
    i = 0
    for shape in shapes:
        acc = Accumulator()
        for batch in shape.batches:
            out = generate(model, [list(p) for p in batch], steps, forced=[ref_tokens[i + j] for j in range(len(batch))])
            for j, g in enumerate(out):
                r = ref_rows[i + j]
                acc.add(r, g.logits, forced_prefix(ref_tokens[i + j], g.logits, len(batch[j])), total,
                        continuation=len(batch[j]) - 1)
                if merged_rows is not None:
                    export.add(merged_rows[i + j], g.logits)
            i += len(batch)
        per_shape[shape.name] = acc.metrics()
    for store in (ref_rows, merged_rows):
        if store is not None:
            store.close()
    return per_shape, total.metrics(), export.metrics() if merged_rows is not None else None


def _sequences(shapes: list[Shape]) -> list[list[int]]:
    return [list(p) for shape in shapes for batch in shape.batches for p in batch]


def measure(models: Models, shapes: list[Shape], steps: int, work_dir: Path, progress: Progress = quiet,
            vocab_size: int = 50_000):
    """Run every model on every shape. Returns (per-shape Metrics, pooled stage Metrics, adapter retention).

    1. The reference generates its greedy continuations (one batch, KV cache, last-position logits only),
       then its logits come from one teacher-forced pass over prompt + continuation; they go to a file.
       With ``models.draft``, the export first decodes greedily and the reference checks those tokens in one
       teacher-forced pass (``verified_greedy``): its greedy continuations as computed without the KV cache,
       in one or two reads of its weights instead of one per token.
    2. The merged and the unadapted model (PyTorch) each take the same teacher-forced pass, compared with
       the reference as they go (the merged logits go to a file too, for the export stage).
    3. The export runs each shape as its batches, prompt pass then decode steps through its KV cache,
       teacher-forced with the reference's tokens; compared with the reference and the merged model.
    Only one model is in memory at a time; logits live in files, read back a sequence at a time.
    """
    run = run_in_child if models.isolate else _call
    seqs, budget = _sequences(shapes), max(1, LOGIT_BUDGET_BYTES // (4 * vocab_size))
    stores = (work_dir / "reference.f32", work_dir / "merged.f32")
    try:
        draft = run(draft_stage, models.candidate, shapes, steps, progress=progress) if models.draft else None
        tokens, ref_state = run(reference_stage, models.reference, seqs, steps, budget, stores[0], draft,
                                progress=progress)
        stages, merged_state = {}, None
        if models.merged is not None or models.base is not None:
            stages, merged_state = run(comparison_stages, models.merged, models.base, seqs, tokens, budget, ref_state,
                                       stores[1], progress=progress)
        progress("parity: the export (ONNX Runtime), each shape through its KV cache")
        per_shape, total, export = run(candidate_stage, models.candidate, shapes, steps, tokens, ref_state,
                                       merged_state, progress=progress)
    finally:
        for path in stores:
            path.unlink(missing_ok=True)
    stages["total"] = total
    if export is not None:
        stages["export"] = export
    retention = None
    if "adapter" in stages:
        effect = stages["adapter"].mean_kl
        retention = float(1 - stages["total"].mean_kl / effect) if effect > 0 else None
    return per_shape, stages, retention


def judge(per_shape: dict, stages: dict, retention: float | None, tol: Tolerances, target: str, reference: str,
          steps: int, notes: tuple[str, ...] = (), reference_compute: tuple[str, str] = ("float32", "cpu"),
          ran_on: tuple[str, ...] = (), not_checked_on: tuple[str, ...] = (),
          layout: tuple = ()) -> ParityReport:
    """``layout``: (metric, op, expected, observed) of how the graph stores its weights (the scheme's ``layout``),
    judged as checks of the shape "graph" beside the numbers."""
    checks = [Check("graph", metric, op, expected, observed,
                    observed == expected if op == "==" else observed <= expected if op == "<=" else observed >= expected)
              for metric, op, expected, observed in layout]
    for name, m in per_shape.items():
        if tol.max_abs_diff is not None:
            checks.append(Check(name, "max_abs_diff", "<=", tol.max_abs_diff, m.max_abs_diff,
                                m.max_abs_diff <= tol.max_abs_diff))
        if tol.max_rel_diff is not None:
            checks.append(Check(name, "max_rel_diff", "<=", tol.max_rel_diff, m.max_rel_diff,
                                m.max_rel_diff <= tol.max_rel_diff))
        if tol.mean_kl is not None:
            checks.append(Check(name, "mean_kl", "<=", tol.mean_kl, m.mean_kl, m.mean_kl <= tol.mean_kl))
        if tol.top1_agreement is not None:
            checks.append(Check(name, "top1_agreement", ">=", tol.top1_agreement, m.top1_agreement,
                                m.top1_agreement >= tol.top1_agreement))
        if tol.greedy_tokens:
            need = min(tol.greedy_tokens, steps)
            checks.append(Check(name, "greedy_identical_tokens", ">=", need, m.greedy_min_identical,
                                m.greedy_min_identical >= need))
    if tol.max_merge_kl is not None and "merge" in stages:
        kl = stages["merge"].mean_kl
        checks.append(Check("merge", "mean_kl", "<=", tol.max_merge_kl, kl, kl <= tol.max_merge_kl))
    if tol.min_adapter_retention is not None:
        observed = retention if retention is not None else float("nan")
        checks.append(Check("all", "adapter_retention", ">=", tol.min_adapter_retention, observed,
                            retention is not None and retention >= tol.min_adapter_retention))
    return ParityReport(target=target, reference=reference, steps=steps, shapes=per_shape, stages=stages,
                        adapter_retention=retention, checks=tuple(checks), tolerance_notes=tuple(notes),
                        reference_dtype=reference_compute[0], reference_device=reference_compute[1],
                        ran_on=tuple(ran_on), not_checked_on=tuple(not_checked_on))


def report_dict(report: ParityReport) -> dict:
    return {"schema_version": SCHEMA_VERSION, "target": report.target, "reference": report.reference,
            "reference_dtype": report.reference_dtype, "reference_device": report.reference_device,
            "passed": report.passed, "steps": report.steps, "tolerance_notes": list(report.tolerance_notes),
            "ran_on": list(report.ran_on), "not_checked_on": list(report.not_checked_on),
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


def pending_on_device(report: ParityReport, export_dir: str = "EXPORT_DIR") -> str:
    """What this run could not check: the target's own execution providers."""
    return (f"**Not yet checked on {', '.join(report.not_checked_on)}**: this machine's ONNX Runtime lacks "
            f"{'it' if len(report.not_checked_on) == 1 else 'them'}, so the graph ran on {', '.join(report.ran_on)} "
            "with the target's thresholds (the numbers above). The target's own kernels are checked by "
            f"`lora-export validate {export_dir}` on a machine that has them (`lora-export[gpu]`).")


def markdown(report: ParityReport) -> str:
    lines = [f"## Parity: {report.target}: {'PASS' if report.passed else 'FAIL'}", "",
             f"Reference: {report.reference}.", ""]
    if report.not_checked_on:
        lines += [pending_on_device(report), ""]
    if report.tolerance_notes:
        lines += ["**About the thresholds** (edited since the target file, or chosen by the model's size):", ""]
        lines += [f"- {n}" for n in report.tolerance_notes] + [""]
    lines += ["| shape | check | observed | threshold | result |", "|---|---|---|---|---|"]
    lines += [f"| {c.shape} | {c.metric} | {c.observed:.4g} | {c.op} {c.threshold:g} | {'pass' if c.passed else 'FAIL'} |"
              for c in report.checks]
    lines += ["", "| shape | sequences | positions | max abs diff | max rel diff | mean KL | top-1 | cosine | rel L2 | "
              "greedy identical (min/mean) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in report.shapes.items():
        lines.append(f"| {name} | {m.sequences} | {m.positions} | {m.max_abs_diff:.3g} | {m.max_rel_diff:.3g} | {m.mean_kl:.3g} | "
                     f"{m.top1_agreement:.1%} | {m.cosine:.6f} | {m.rel_l2:.3g} | {m.greedy_min_identical}/"
                     f"{m.greedy_mean_identical:.1f} of {report.steps} |")
    lines += ["", "Where the difference comes from (all shapes pooled):", "",
              "| step | max abs diff | max rel diff | mean KL | top-1 |", "|---|---|---|---|---|"]
    for key, label in STAGE_LABELS.items():
        if key in report.stages:
            m = report.stages[key]
            lines.append(f"| {label} | {m.max_abs_diff:.3g} | {m.max_rel_diff:.3g} | {m.mean_kl:.3g} | "
                         f"{m.top1_agreement:.1%} |")
    if any(m.along_max_abs_diff for m in report.shapes.values()):
        lines += ["", f"Where along the {report.steps}-token continuation the export drifts, per shape "
                  "(max |logit diff| and mean KL at each position): [parity.png](parity.png)", "",
                  "![per-position logit difference and KL](parity.png)"]
    if report.adapter_retention is not None:
        lines += ["", f"Adapter retention: the export keeps {report.adapter_retention:.1%} of the adapter's effect "
                  "(1 - KL(trained || export) / KL(trained || base))."]
    return "\n".join(lines) + "\n"


def write_plot(report: ParityReport, path: Path) -> bool:
    """Max |logit diff| and mean KL at each position of the continuation, one line per shape (log scale):
    where parity drifts is where a user looks first. Returns False when there is nothing to plot."""
    curves = {name: m for name, m in report.shapes.items() if m.along_max_abs_diff}
    if not curves:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    floor = 1e-12  # an exact match is drawn at the floor (a log axis has no zero)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for name, m in curves.items():
        x = np.arange(len(m.along_max_abs_diff))
        top.plot(x, np.maximum(m.along_max_abs_diff, floor), label=name)
        bottom.plot(x, np.maximum(m.along_mean_kl, floor), label=name)
    for ax, label in ((top, "max |logit diff|"), (bottom, "mean KL(reference || export)")):
        ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    bottom.set_xlabel("position in the continuation (0: the prompt pass)")
    top.legend()
    top.set_title(f"Parity along the continuation: {report.target} ({'PASS' if report.passed else 'FAIL'})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_reports(report: ParityReport, out_dir: Path) -> None:
    write_json(report, out_dir / "parity.json")
    write_junit(report, out_dir / "parity.xml")
    write_plot(report, out_dir / "parity.png")
    (out_dir / "parity.md").write_text(markdown(report))
