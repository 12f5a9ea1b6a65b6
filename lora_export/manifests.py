"""The two records that pass between stages, typed: the training manifest and the export manifest.

    train  --writes-->  TRAINING_MANIFEST (training_manifest.json, beside the adapter)  --read by--> adapters
    export --writes-->  EXPORT_MANIFEST (export_manifest.json, in the export)  --read by--> validate, bench, --into

Each is a frozen dataclass with ``to_dict``/``from_dict`` for its JSON on disk, and has one reader that checks
the file (every problem at once, as ``BadInput`` naming the file, the problem and the fix) and its version.
What the tool reads back is typed (``Quantization``, ``BaseEntry``, ``AdapterEntry``, ``ParitySummary``). Some
blocks stay JSON objects on purpose: the export's ``target`` is the target file's TOML table verbatim
(``targets.parse_target`` types and checks it when validate and bench apply it); the training's ``lora``,
``data`` and ``training``, the export's ``quantization`` (the survival measurement) and both ``versions`` are
records for people and CI scripts that nothing in the tool reads back.
One version number, ``SCHEMA_VERSION``, for both. Training manifests written before it existed say
``"schema": 1`` and are read as the version 1 they are (their content is that of version 2).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BadInput, Problem, raise_if
from .jsonfile import read_object
from .quantized_base import FOUR_BIT, Quantization

SCHEMA_VERSION = 2  # both manifests; a reader refuses a newer one and says what to do with an older one
TRAINING_MANIFEST = "training_manifest.json"
EXPORT_MANIFEST = "export_manifest.json"
SWITCHABLE = "switchable"  # the graph of `export --switchable`: a base graph, an adapter file per adapter
GRAPHS = ("merged", "unmerged", SWITCHABLE)
MERGE_BASES = FOUR_BIT + ("original",)  # what a merge starts from: the 4-bit base as trained, or the original


# --- the training manifest ------------------------------------------------------------------------------------

TRAINING_FIX = "restore the training_manifest.json the trainer wrote, or delete it for an adapter made by another tool"
QUANT_BLOCK_KEYS = {"quant_type", "double_quant", "blocksize", "compute_dtype", "load_dtype", "quant_storage",
                    "quantized_modules", "prequantized"}


@dataclass(frozen=True)
class TrainingManifest:
    """What ``lora-export train`` records beside an adapter: above all how the base was quantized, which the nf4
    merge reproduces. ``lora``, ``data`` and ``training`` are records for people; the export reads
    ``kind``, ``base_weights_sha256`` and ``quantization``."""

    kind: str  # "qlora" (a 4-bit base) or "lora"
    base_path: str
    base_weights_sha256: dict  # fingerprint.fingerprint(base): file -> sha256
    quantization: Quantization | None  # kind "qlora": the 4-bit base it was trained against; else None
    lora: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict:
        q = self.quantization  # on disk without its sources: every setting was chosen by the training
        block = {k: v for k, v in q.to_dict().items() if k != "sources"} if q is not None else None
        return {"schema_version": self.schema_version, "kind": self.kind,
                "base": {"path": self.base_path, "weights_sha256": dict(self.base_weights_sha256)},
                "quantization": block, "lora": self.lora, "data": self.data, "training": self.training,
                "versions": self.versions}

    @classmethod
    def from_dict(cls, d: dict) -> TrainingManifest:
        """From a dict that ``training_problems`` passed."""
        base = d.get("base", {})
        quant = Quantization.from_dict(d["quantization"]) if d["kind"] == "qlora" else None
        return cls(kind=d["kind"], base_path=base.get("path"), base_weights_sha256=base.get("weights_sha256", {}),
                   quantization=quant, lora=d.get("lora", {}), data=d.get("data", {}),
                   training=d.get("training", {}), versions=d.get("versions", {}), schema_version=_training_version(d))

    def write(self, adapter_dir: Path) -> None:
        (Path(adapter_dir) / TRAINING_MANIFEST).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def _training_version(d: dict):
    """``schema_version``; manifests written before it say ``"schema": 1``."""
    return d["schema_version"] if "schema_version" in d else d.get("schema", None)


def read_training_manifest(adapter_dir: Path, problems: list[Problem]) -> TrainingManifest | None:
    """The adapter's training manifest, or None when there is none (an adapter made by another tool) or it is
    wrong (then every problem is added to ``problems``)."""
    path = Path(adapter_dir) / TRAINING_MANIFEST
    if not path.is_file():
        return None
    raw = read_object(path, "restore the file the trainer wrote, or delete it for an adapter made by another tool",
                      problems)
    if raw is None:
        return None
    wrong = training_problems(raw, path)
    problems += wrong
    return None if wrong else TrainingManifest.from_dict(raw)


def training_problems(manifest: dict, where: Path) -> list[Problem]:
    """A training manifest's shape: what the export reads from it must be there, with the right types."""
    from .base import BLOCKSIZES

    fix = TRAINING_FIX
    problems = []
    version = _training_version(manifest)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        problems.append(Problem(str(where), f"schema_version = {version!r}: not a version of the training manifest "
                                f"(1 to {SCHEMA_VERSION})", fix))
    elif version > SCHEMA_VERSION:
        problems.append(Problem(str(where), f"schema_version {version} was written by a newer lora-export (this one "
                                f"reads up to {SCHEMA_VERSION})", "upgrade lora-export, or delete the file to export "
                                "the adapter as one made by another tool (give its 4-bit settings with --bnb-*)"))
    kind = manifest.get("kind")
    if kind not in ("qlora", "lora"):
        problems.append(Problem(str(where), f"kind = {kind!r}: it must be \"qlora\" or \"lora\"", fix))
    base = manifest.get("base", {})
    if not isinstance(base, dict) or not isinstance(base.get("weights_sha256", {}), dict):
        problems.append(Problem(str(where), "base must be an object with a weights_sha256 object", fix))
    quant = manifest.get("quantization")
    if kind == "qlora":
        if not isinstance(quant, dict):
            problems.append(Problem(str(where), "a QLoRA manifest without its quantization block (how the base was "
                                    "quantized is what the nf4 merge reproduces)", fix))
        else:
            wrong = [k for k, ok in (
                ("quant_type", quant.get("quant_type") in ("nf4", "fp4")),
                ("double_quant", isinstance(quant.get("double_quant"), bool)),
                ("blocksize", quant.get("blocksize") in BLOCKSIZES),
                ("compute_dtype", quant.get("compute_dtype") in ("float32", "bfloat16", "float16")),
                ("load_dtype", quant.get("load_dtype", "float32") in ("float32", "bfloat16", "float16")),
                ("quant_storage", quant.get("quant_storage", "uint8") in ("uint8", "bfloat16", "float16", "float32")),
                ("quantized_modules", isinstance(quant.get("quantized_modules"), list)
                 and all(isinstance(m, str) for m in quant["quantized_modules"])),
            ) if not ok]
            unknown = sorted(set(quant) - QUANT_BLOCK_KEYS)
            if not isinstance(quant.get("prequantized", False), bool):
                unknown.append("prequantized")
            if wrong or unknown:
                problems.append(Problem(str(where), "quantization block has missing or invalid "
                                        f"{', '.join(wrong + unknown)}", fix))
    return problems


# --- the export manifest --------------------------------------------------------------------------------------

EXPORT_FIX = "restore the export_manifest.json that `lora-export export` wrote, or re-export"
QUANT_KEYS = {"quant_type", "double_quant", "blocksize", "compute_dtype", "quant_storage", "load_dtype",
              "quantized_modules", "sources", "prequantized"}  # Quantization.to_dict()


@dataclass(frozen=True)
class BaseEntry:
    """The base an export was made from: where, and the sha256 of each weight file."""

    path: str
    files_sha256: dict
    relative_path: str | None = None  # from the export: survives moving both together
    prequantized: bool | None = None

    def to_dict(self) -> dict:
        d = {"path": self.path, **({"relative_path": self.relative_path} if self.relative_path is not None else {}),
             "files_sha256": self.files_sha256}
        return {**d, "prequantized": self.prequantized} if self.prequantized is not None else d


NOT_RECORDED = "not recorded"  # AdapterEntry.quantization of an export older than that record


@dataclass(frozen=True)
class AdapterEntry:
    """One adapter of an export. ``name``, ``file``, ``file_sha256``: its adapter file in a switchable export."""

    path: str
    adapter_model_sha256: str
    relative_path: str | None = None
    weights_file: str | None = None  # adapter_model.safetensors, or .bin when pickle was allowed
    weight: float = 1.0  # its coefficient in the linear combination
    quantization: Quantization | None | str = NOT_RECORDED  # the 4-bit base the export resolved; None: none
    name: str | None = None
    file: str | None = None
    file_sha256: str | None = None

    @property
    def resolved_quantization(self) -> Quantization | None:
        """The 4-bit base the export resolved (None also for an export older than that record)."""
        return self.quantization if isinstance(self.quantization, Quantization) else None

    def to_dict(self) -> dict:
        d = {"path": self.path, **({"relative_path": self.relative_path} if self.relative_path is not None else {})}
        d.update({k: v for k, v in (("name", self.name), ("file", self.file), ("file_sha256", self.file_sha256),
                                    ("weights_file", self.weights_file)) if v is not None})
        d.update({"adapter_model_sha256": self.adapter_model_sha256, "weight": self.weight})
        if self.quantization == NOT_RECORDED:
            return d
        return {**d, "quantization": self.quantization.to_dict() if self.quantization is not None else None}

    @classmethod
    def from_dict(cls, d: dict) -> AdapterEntry:
        quant = d.get("quantization", NOT_RECORDED)
        return cls(path=d["path"], adapter_model_sha256=d["adapter_model_sha256"], relative_path=d.get("relative_path"),
                   weights_file=d.get("weights_file"), weight=d.get("weight", 1.0),
                   quantization=Quantization.from_dict(quant) if isinstance(quant, dict) else quant,
                   name=d.get("name"), file=d.get("file"),
                   file_sha256=d.get("file_sha256"))


MERGED_PARITY = ("ran_on", "not_checked_on", "max_abs_diff", "max_rel_diff", "mean_kl", "top1_agreement",
                 "adapter_retention")  # a merged or unmerged graph's summary: the total stage's numbers


@dataclass(frozen=True)
class ParitySummary:
    """The manifest's record of the parity verdict (parity.md/json hold the whole report): for a merged or
    unmerged graph the total stage's numbers, for a switchable one each section's verdict."""

    passed: bool
    failures: tuple[str, ...] = ()
    ran_on: tuple[str, ...] = ()
    not_checked_on: tuple[str, ...] = ()
    max_abs_diff: float | None = None
    max_rel_diff: float | None = None
    mean_kl: float | None = None
    top1_agreement: float | None = None
    adapter_retention: float | None = None
    sections: dict[str, bool] | None = None  # switchable: section name -> passed

    def to_dict(self) -> dict:
        d = {"passed": self.passed, "failures": list(self.failures)}
        if self.sections is not None:
            return {**d, "sections": dict(self.sections)}
        values = {k: getattr(self, k) for k in MERGED_PARITY}
        return {**d, **{k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> ParitySummary:
        """From a dict that ``parity_problems`` passed (a key that is not recorded keeps its default)."""
        known = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()
                 if k in ("passed", "failures", "sections", *MERGED_PARITY)}
        return cls(**known)


@dataclass(frozen=True)
class ExportManifest:
    """What an export directory was made from and how: validate and bench re-check and re-apply it."""

    base: BaseEntry
    adapters: tuple[AdapterEntry, ...]
    target: dict  # the target's TOML table: validate and bench apply this one
    merge_base: str
    graph: str = "merged"  # merged | unmerged (--keep-adapter) | switchable
    versions: dict = field(default_factory=dict)
    merged_modules: int | None = None  # merged and unmerged graphs: what the merge did
    max_abs_weight_change: float | None = None
    replaced_modules: list | None = None
    untied_embeddings: bool | None = None
    lora_inputs: int | None = None  # switchable: the graph's LoRA weight inputs
    quantization: dict | None = None  # quantized weights: how much of the adapter's change survived (for people)
    family: str | None = None  # a family not among those tested by lora-export: the note that says so
    parity: ParitySummary | None = None  # the verdict, once validated
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict:
        entries = [a.to_dict() for a in self.adapters]
        d = {"schema_version": self.schema_version, "base": self.base.to_dict(), "adapter": entries[0],
             "adapters": entries, "target": self.target, "merge_base": self.merge_base, "graph": self.graph}
        d.update({k: v for k, v in (("merged_modules", self.merged_modules),
                                    ("max_abs_weight_change", self.max_abs_weight_change),
                                    ("replaced_modules", self.replaced_modules),
                                    ("untied_embeddings", self.untied_embeddings),
                                    ("lora_inputs", self.lora_inputs)) if v is not None})
        d["versions"] = self.versions
        if self.quantization is not None:
            d["quantization"] = self.quantization
        if self.family is not None:
            d["family"] = self.family
        if self.parity is not None:
            d["parity"] = self.parity.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ExportManifest:
        """From a dict that ``export_problems`` passed (older exports hold one ``adapter`` entry only)."""
        b = d["base"]
        base = BaseEntry(path=b["path"], files_sha256=b["files_sha256"], relative_path=b.get("relative_path"),
                         prequantized=b.get("prequantized"))
        return cls(base=base, adapters=tuple(AdapterEntry.from_dict(e) for e in d.get("adapters") or [d["adapter"]]),
                   target=d["target"], merge_base=d["merge_base"], graph=d.get("graph", "merged"),
                   versions=d.get("versions", {}), merged_modules=d.get("merged_modules"),
                   max_abs_weight_change=d.get("max_abs_weight_change"), replaced_modules=d.get("replaced_modules"),
                   untied_embeddings=d.get("untied_embeddings"), lora_inputs=d.get("lora_inputs"),
                   quantization=d.get("quantization"), family=d.get("family"),
                   parity=ParitySummary.from_dict(d["parity"]) if d.get("parity") is not None else None,
                   schema_version=d["schema_version"])


def write_export_manifest(export_dir: Path, manifest: ExportManifest) -> None:
    """Written to a temporary name and renamed: a reader never sees half a manifest."""
    tmp = Path(export_dir) / (EXPORT_MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
    tmp.replace(Path(export_dir) / EXPORT_MANIFEST)


def read_export_manifest(export_dir: Path) -> ExportManifest:
    """The export's manifest, checked for what validate and bench read from it (a wrong type or a missing
    entry is bad input naming the field, not a crash later)."""
    path = Path(export_dir) / EXPORT_MANIFEST
    if not path.is_file():
        raise BadInput.one(str(export_dir), f"no {EXPORT_MANIFEST}: not an export directory",
                           "pass a directory written by `lora-export export`")
    problems: list[Problem] = []
    raw = read_object(path, "re-export the model", problems)
    raise_if(problems)
    raise_if(export_problems(raw, path))
    return ExportManifest.from_dict(raw)


def export_problems(manifest: dict, path: Path) -> list[Problem]:
    fix = EXPORT_FIX

    def bad(field: str, what: str, fix: str = fix) -> None:
        problems.append(Problem(f"{path}:{field}", what, fix))

    def located(entry, field: str) -> bool:
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or not entry["path"]:
            bad(field, "must be an object with the path it was made from")
            return False
        if not isinstance(entry.get("relative_path", ""), str):
            bad(f"{field}.relative_path", "must be a string")
        return True

    problems: list[Problem] = []
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        newer = isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION
        bad("schema_version", f"{version!r} is not {SCHEMA_VERSION}, the version this lora-export reads",
            "upgrade lora-export to read this export" if newer else
            "re-export with this lora-export (an export from an older one is not read)" if isinstance(version, int)
            else fix)
    if not isinstance(manifest.get("target"), dict):
        bad("target", "missing: the target table the export was made for")
    if located(manifest.get("base"), "base") and not isinstance(manifest["base"].get("files_sha256"), dict):
        bad("base.files_sha256", "missing: the sha256 of each base weight file")
    entries = manifest.get("adapters") or ([manifest["adapter"]] if "adapter" in manifest else None)
    if not isinstance(entries, list) or not entries:
        bad("adapters", "missing: the adapters the export was made from")
    else:
        for i, entry in enumerate(entries):
            if not located(entry, f"adapters[{i}]"):
                continue
            if not isinstance(entry.get("adapter_model_sha256"), str):
                bad(f"adapters[{i}].adapter_model_sha256", "missing: the sha256 of the adapter's weights")
            weight = entry.get("weight", 1.0)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                bad(f"adapters[{i}].weight", f"{weight!r} is not a finite number")
            quant = entry.get("quantization")
            if quant is not None and not (isinstance(quant, dict) and isinstance(quant.get("quantized_modules"), list)
                                          and quant.get("quant_type") in FOUR_BIT and set(quant) <= QUANT_KEYS
                                          and isinstance(quant.get("prequantized", False), bool)
                                          and isinstance(quant.get("double_quant", True), bool)
                                          and isinstance(quant.get("blocksize", 64), int)):
                bad(f"adapters[{i}].quantization", "must be null or the 4-bit settings the export resolved")
            for key in ("weights_file", "name", "file", "file_sha256"):
                if not isinstance(entry.get(key, ""), str):
                    bad(f"adapters[{i}].{key}", "must be a string")
    if manifest.get("merge_base") not in MERGE_BASES:
        bad("merge_base", f"{manifest.get('merge_base')!r} is not one of {', '.join(MERGE_BASES)}")
    if manifest.get("graph", "merged") not in GRAPHS:
        bad("graph", f"{manifest.get('graph')!r} is not merged, unmerged or switchable")
    problems += parity_problems(manifest.get("parity"), path)
    return problems


def parity_problems(summary, path: Path) -> list[Problem]:
    """The manifest's parity summary: null (not validated yet) or the verdict with its numbers."""
    if summary is None:
        return []
    where, fix = f"{path}:parity", EXPORT_FIX
    if not isinstance(summary, dict) or not isinstance(summary.get("passed"), bool):
        return [Problem(where, "must be null or an object with the verdict \"passed\" (true or false)", fix)]
    wrong = [k for k in ("failures", "ran_on", "not_checked_on")
             if not (isinstance(summary.get(k, []), list) and all(isinstance(x, str) for x in summary.get(k, [])))]
    wrong += [k for k in MERGED_PARITY[2:] if summary.get(k) is not None and (
        isinstance(summary[k], bool) or not isinstance(summary[k], (int, float)))]
    sections = summary.get("sections")
    if sections is not None and not (isinstance(sections, dict) and all(isinstance(v, bool) for v in sections.values())):
        wrong.append("sections")
    return [Problem(where, f"invalid {', '.join(wrong)}", fix)] if wrong else []
