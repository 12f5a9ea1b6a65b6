"""sha256 fingerprints of model and adapter files, so a manifest can tell which weights it was made from."""

from __future__ import annotations

import hashlib
from pathlib import Path

WEIGHT_PATTERNS = ("*.safetensors", "*.bin")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def weight_files(model_dir: Path, patterns: tuple[str, ...] = WEIGHT_PATTERNS) -> list[Path]:
    return sorted(p for pattern in patterns for p in Path(model_dir).glob(pattern))


def fingerprint(model_dir: Path, known: dict[str, str] | None = None,
                patterns: tuple[str, ...] = WEIGHT_PATTERNS) -> dict[str, str]:
    """{file name: sha256} of every weight file in a model directory (``patterns``). ``known``: hashes this
    command already took of files in it, not taken again."""
    known = known or {}
    return {p.name: known[p.name] if p.name in known else sha256_file(p) for p in weight_files(model_dir, patterns)}


def safetensors_fingerprint(model_dir: Path) -> dict[str, str]:
    """The fingerprint of a model's safetensors files only: what an export records of its base."""
    return fingerprint(model_dir, patterns=("*.safetensors",))
