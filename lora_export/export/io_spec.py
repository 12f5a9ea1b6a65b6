"""The I/O contract every graph backend honours, and the checks on an exported model's files.

Inputs: ``input_ids``, ``attention_mask`` (``position_ids`` when the graph does not derive positions
from the mask), ``past_key_values.N.key/value``. Outputs: ``logits``, ``present.N.key/value``.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath, PureWindowsPath

from ..errors import BadInput, UnreadableModel


def kv_input_names(num_layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def kv_output_names(num_layers: int) -> list[str]:
    return [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def check_io(input_names: set[str], output_names: set[str], num_layers: int, where: str) -> None:
    missing = ({"input_ids", "attention_mask"} | set(kv_input_names(num_layers))) - input_names
    missing |= ({"logits"} | set(kv_output_names(num_layers))) - output_names
    if missing:
        raise BadInput.one(where, f"the graph lacks {', '.join(sorted(missing))}",
                           "re-export the model with `lora-export export`")


def check_external_data(model_path: Path):
    """Refuse external-data locations that are not bare file names inside the model's directory.
    Returns the graph read without its data (a ModelProto), for callers that need its structure.

    ONNX's own loader has had path-traversal bugs here (CVE-2022-25882, CVE-2024-27318/27319,
    CVE-2025-51480), so we read the graph without its data and check every location first.
    """
    import onnx

    if not model_path.is_file():
        raise BadInput.one(str(model_path), "no ONNX model here", "pass a directory written by `lora-export export`")
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends
        raise UnreadableModel.one(str(model_path), f"not a readable ONNX model ({type(e).__name__})",
                           "re-export it with `lora-export export`") from e
    bad = set()
    for tensor in _all_initializers(model.graph):
        for entry in tensor.external_data:
            if entry.key != "location":
                continue
            loc = entry.value
            if (PurePosixPath(loc).name != loc or PureWindowsPath(loc).name != loc or loc in ("", ".", "..")):
                bad.add(loc)
            elif not (model_path.parent / loc).is_file():
                bad.add(loc + " (missing)")
    if bad:
        raise BadInput.one(str(model_path), f"external data locations outside the model directory or missing: "
                           f"{', '.join(sorted(bad))}",
                           "do not load this model; re-export it so its data file sits beside model.onnx")
    return model


def _all_initializers(graph):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.g is not None and attr.g.node:
                yield from _all_initializers(attr.g)
            for g in attr.graphs:
                yield from _all_initializers(g)
