"""ONNX graph backends, registered by name. A target names one in ``backend``."""

from .backend import Backend
from .dynamo import TORCH_DYNAMO
from .genai_builder import GENAI_BUILDER

BACKENDS: dict[str, Backend] = {b.name: b for b in (GENAI_BUILDER, TORCH_DYNAMO)}

__all__ = ["BACKENDS", "Backend"]
