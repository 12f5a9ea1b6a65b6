"""The shape of a quantization scheme entry."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable


def _nothing(model_dir: Path, quantization) -> None:
    return None


def _no_layout(model_path: Path, quantization) -> list:
    return []


@dataclass(frozen=True)
class Scheme:
    name: str
    #: (Quantization, activation precision) -> the onnxruntime-genai builder's ``--precision``
    builder_precision: Callable[[object, str], str]
    #: (Quantization) -> the builder's ``--extra_options`` for this scheme
    builder_options: Callable[[object], dict]
    #: (Quantization) -> problems with the scheme's parameters, as sentences
    check: Callable[[object], list]
    #: (export dir, Quantization) -> None: rewrites model.onnx after the builder, for schemes it lacks
    post_process: Callable[[Path, object], None] = _nothing
    #: the [quantization] fields this scheme reads; a target that sets another is refused (it would be ignored)
    honours: tuple[str, ...] = ()
    #: (model.onnx, Quantization) -> [(metric, op, expected, observed)]: the graph's weights stored as the target
    #: says (bits of lm_head and of the body, block size), checked by validate beside the numbers
    layout: Callable[[Path, object], list] = _no_layout
    #: (Quantization) -> whether validate can redo the graph's weight quantization from the checkpoint the graph was
    #: built from and compare (ONNX Runtime's round-to-nearest MatMulNBits: survival.off_source)
    reproducible: Callable[[object], bool] = lambda q: False
