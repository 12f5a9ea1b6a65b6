"""The interface of a graph backend: turn a merged Hugging Face checkpoint into ``model.onnx``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Backend:
    name: str
    #: the architectures (``config.architectures[0]``) tested on their families' quirk configs; what the backend
    #: takes beyond them is families.check_family's call
    tested: tuple[str, ...]
    #: (checkpoint dir, output dir, Target, log file, adapter dir or None) -> None; writes model.onnx (+ data)
    #: and genai_config.json. With an adapter dir, the LoRA stays unmerged: a side path beside each MatMul.
    build: Callable[..., None]
    #: False: ``build`` loads the model in the calling process (the pipeline then calls it in a child
    #: process, so that the export's own process stays light); True: it runs its own subprocess already
    own_process: bool = False
    #: the ai.onnx opsets the graphs can be written in (lowest, highest), and the one used when a target
    #: names none; a target asking for another is refused, never silently changed
    opsets: tuple[int, int] = (21, 21)
    default_opset: int = 21
    #: the quantization schemes it can produce (a target asking for another is refused)
    schemes: tuple[str, ...] = ("none", "int4", "int8", "nf4")
    #: whether ``build`` can keep an adapter unmerged as side paths (a target's graph = "unmerged")
    side_paths: bool = True
