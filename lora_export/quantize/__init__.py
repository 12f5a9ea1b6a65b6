"""Weight quantization schemes, registered by name. Targets name one in ``[quantization] scheme``."""

from .int4 import INT4
from .int8 import INT8
from .nf4 import NF4_SCHEME
from .none import NONE
from .scheme import Scheme

SCHEMES: dict[str, Scheme] = {s.name: s for s in (NONE, INT8, INT4, NF4_SCHEME)}


def graph_layout(export_dir, target, side_paths: bool) -> tuple:
    """The scheme's layout checks of the export's model.onnx against the target (see ``Scheme.layout``); a graph
    with LoRA side paths against the settings such a graph is built with (``Quantization.for_graph``)."""
    from pathlib import Path

    q = target.quantization.for_graph(side_paths)
    return tuple(SCHEMES[q.scheme].layout(Path(export_dir) / "model.onnx", q))


__all__ = ["SCHEMES", "Scheme", "graph_layout"]
