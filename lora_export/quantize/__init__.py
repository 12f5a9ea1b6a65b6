"""Weight quantization schemes, registered by name. Targets name one in ``[quantization] scheme``."""

from .int4 import INT4
from .none import NONE
from .scheme import Scheme

SCHEMES: dict[str, Scheme] = {s.name: s for s in (NONE, INT4)}

__all__ = ["SCHEMES", "Scheme"]
