"""An export directory's record of its inputs, and the checks that find them again.

Every recipe writes the same records (``manifests.BaseEntry``/``AdapterEntry``) and every reader checks them the
same way: the merged and unmerged export (``pipeline``), the switchable one (``switchable*``), validate and bench.
It sits between the stages and the recipes: it reads adapters through ``adapters`` and imports no recipe; it
hashes, locates and loads, nothing more.

The base is hashed once per command: ``base_sha`` (the sha256 of each safetensors file) is taken by the first check
that needs it and handed on to the export's record and to ``adapters.load_adapter``, which compares the training
manifest's fingerprint and hashes only what it lacks (``.bin`` files beside the safetensors, as before).
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

from .adapters import Adapter, load_adapter
from .base import is_prequantized
from .errors import BadInput
from .fingerprint import safetensors_fingerprint, sha256_file
from .manifests import (
    EXPORT_MANIFEST,
    NOT_RECORDED,
    AdapterEntry,
    BaseEntry,
    ExportManifest,
)
from .memory import check_memory

PARITY_TMP = "lora-export-parity-"  # + pid: validate's temporary folder, swept once its process is gone
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")
BYTES_PER_WEIGHT = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1.1, "int4": 0.6, "nf4": 0.6}  # with scales


def base_entry(base: Path, out: Path, base_sha: dict[str, str] | None = None) -> BaseEntry:
    """The manifest's record of the base: where (also relative to the export) and each safetensors file's sha256
    (``base_sha``: ``safetensors_fingerprint(base)`` when the caller has it, else hashed here)."""
    hashes = base_sha if base_sha is not None else safetensors_fingerprint(base)
    return BaseEntry(**_where(base, out), files_sha256=dict(sorted(hashes.items())), prequantized=is_prequantized(base))


def adapter_entry(adapter: Adapter, out: Path, weight: float = 1.0, **switchable) -> AdapterEntry:
    """The manifest's record of an adapter: where, its weights' sha256, and the 4-bit base the export resolved."""
    return AdapterEntry(**_where(adapter.path, out), weights_file=adapter.weights_file.name,
                        adapter_model_sha256=sha256_file(adapter.weights_file), weight=weight,
                        quantization=adapter.quantization, **switchable)


def _where(path: Path, out: Path) -> dict:
    """Absolute path, and the path relative to the export: the latter survives moving both together."""
    return {"path": str(path.resolve()), "relative_path": os.path.relpath(path.resolve(), out.resolve())}


def locate(entry: BaseEntry | AdapterEntry, export_dir: Path, what: str) -> Path:
    """Where a recorded base or adapter is now: its absolute path, else its path relative to the export."""
    candidates = [Path(entry.path)] + ([export_dir / entry.relative_path] if entry.relative_path is not None else [])
    for candidate in candidates:
        if candidate.exists():
            return candidate
    raise BadInput.one(str(export_dir / EXPORT_MANIFEST),
                       f"the {what} this export was made from is gone ({entry.path})",
                       f"restore the {what} at that path, or re-export")


def check_base_unchanged(base: Path, manifest: ExportManifest) -> dict[str, str]:
    """The base's weight files are the ones the export was made from (else a parity failure would blame the
    export for a changed base). Returns ``safetensors_fingerprint(base)``, for ``adapters_of``."""
    recorded = manifest.base.files_sha256
    now = safetensors_fingerprint(base)
    changed = sorted(set(recorded) ^ set(now)) or [n for n in sorted(recorded) if now[n] != recorded[n]]
    if changed:
        raise BadInput.one(str(base), f"the base's weights changed since this export was made ({', '.join(changed[:3])} "
                           f"differ from the sha256 in {EXPORT_MANIFEST})",
                           "validate against the base that was exported, or re-export")
    return now


def check_memory_of(export_dir: Path, manifest: ExportManifest, command: str) -> None:
    """``validate`` or ``bench`` of an export refused up front when its estimated peak exceeds the memory here
    (``memory.check_memory``), after its target and base are found and checked, before the base is hashed."""
    from .base import check_base
    from .targets import parse_target

    target = parse_target(manifest.target, f"{export_dir / EXPORT_MANIFEST}:target")
    base = check_base(locate(manifest.base, export_dir, "base model"))
    check_memory(command, base, target, str(export_dir))


def adapters_of(entries, export_dir: Path, base: Path, base_sha: dict[str, str] | None = None):
    """The adapters an export was made from (its manifest's ``AdapterEntry``s), checked unchanged since, and
    their weights. ``base_sha``: the base's hashes from ``check_base_unchanged`` (else each adapter hashes it)."""
    adapters, weights = [], []
    for entry in entries:
        adapter = load_adapter(locate(entry, export_dir, "adapter"), base,
                               allow_pickle=entry.weights_file == "adapter_model.bin", base_fingerprint=base_sha)
        if entry.quantization != NOT_RECORDED:  # the 4-bit base the export resolved (older exports: the training's)
            adapter = replace(adapter, quantization=entry.resolved_quantization)
        if sha256_file(adapter.weights_file) != entry.adapter_model_sha256:
            raise BadInput.one(str(adapter.path), "the adapter's weights changed since this export was made",
                               "validate against the adapter that was exported, or re-export")
        adapters.append(adapter)
        weights.append(entry.weight)
    return adapters, weights


def check_report_path(path: Path | None) -> None:
    """A --report/--junit path must be a file we can write, checked before parity runs."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise BadInput.one(str(path), "is a directory", "pass a file path (e.g. reports/parity.json)")
    if not path.parent.is_dir():
        raise BadInput.one(str(path), f"its folder {path.parent} does not exist", "create the folder first")
    if not os.access(path.parent, os.W_OK):
        raise BadInput.one(str(path), f"its folder {path.parent} is not writable", "write the report elsewhere")


def context_of(base: Path) -> tuple[int, int]:
    """(context length, vocabulary size) of the base model, read from its config.json (no torch needed).

    Architectures name the context differently (GPT-2 ``n_positions``, Llama ``max_position_embeddings``)."""
    config = json.loads((base / "config.json").read_text())
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    positions = next((text[k] for k in CONTEXT_KEYS if isinstance(text.get(k), int) and text[k] > 0), 2048)
    vocab = text.get("vocab_size")
    return positions, vocab if isinstance(vocab, int) and vocab > 0 else 50_000


def export_bytes(base: Path, target) -> int:
    """Disk an export needs at its peak: the merged fp32 checkpoint and, below the layerwise size
    (``reference.as_trained_dir``), the as-trained one (scratch), a pre-quantized base's dequantized copy, and 2.2 x
    the ONNX output (the graph builder's own temporaries and our re-save), from the parameter count in the headers."""
    from .checkpoint import parameter_count
    from .reference import layerwise_for

    params = parameter_count(base, unpack_4bit=True)
    scheme = target.quantization.scheme
    weights = BYTES_PER_WEIGHT[scheme if scheme != "none" else target.precision]
    fp32_copies = 1 + (not layerwise_for(params)) + is_prequantized(base)
    return int(4 * fp32_copies * params + 2.2 * weights * params)


def export_disk_note(base: Path) -> str:
    """What ``export_bytes`` counts, for the free-disk refusal."""
    from .checkpoint import parameter_count
    from .reference import layerwise_for

    copies = "the merged fp32 checkpoint" if layerwise_for(parameter_count(base, unpack_4bit=True)) else \
        "the merged and the as-trained fp32 checkpoints"
    return copies + (", the base dequantized" if is_prequantized(base) else "") + " plus 2.2 x the export"
