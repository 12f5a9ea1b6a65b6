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


def weight_files(model_dir: Path) -> list[Path]:
    return sorted(p for pattern in WEIGHT_PATTERNS for p in Path(model_dir).glob(pattern))


def fingerprint(model_dir: Path) -> dict[str, str]:
    """{file name: sha256} of every weight file in a model directory."""
    return {p.name: sha256_file(p) for p in weight_files(model_dir)}
