"""The interface of a graph backend: turn a merged Hugging Face checkpoint into ``model.onnx``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class Backend:
    name: str
    #: architectures (``config.architectures[0]``) this backend can export
    architectures: tuple[str, ...]
    #: (checkpoint dir, output dir, Target, log file) -> None; writes model.onnx (+ data) and genai_config.json
    build: Callable[[Path, Path, object, Path], None]
