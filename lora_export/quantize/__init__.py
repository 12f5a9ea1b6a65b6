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


def has_source_check(target, side_paths: bool) -> bool:
    q = target.quantization.for_graph(side_paths)
    return SCHEMES[q.scheme].reproducible(q)


def source_check(export_dir, source, progress=None) -> tuple:
    """The layout check that the graph's quantized weights are the target's quantizer applied to ``source``, the
    checkpoint the graph was built from (the merge; for side paths the base the adapter was trained against):
    ``graph/matmuls_off_their_source``, and ``graph/matmuls_compared`` >= 1 so that a graph whose MatMuls no longer
    map to checkpoint tensors (another builder's node names) cannot pass by comparing nothing. Only for graphs whose
    quantization can be redone here (``has_source_check``: not k_quant, nf4 or float weights), which callers ask
    first. Imports torch: call it in a child process."""
    from pathlib import Path

    from .survival import off_source

    if progress is not None:  # (a stage of its own: at 8B it re-quantizes every MatMul, minutes)
        progress(f"checking the graph's quantized weights against {Path(source).name} quantized again")
    compared, off, worst = off_source(Path(export_dir) / "model.onnx", Path(source))
    if progress is not None:
        progress(f"quantized weights against {Path(source).name} quantized again: {off} of {compared} MatMuls off "
                 f"(worst {worst})")
    return ("matmuls_off_their_source", "<=", 0, off), ("matmuls_compared", ">=", 1, compared)


__all__ = ["SCHEMES", "Scheme", "graph_layout", "has_source_check", "source_check"]
