"""No weight quantization: weights stay in the target's precision (fp32, fp16 or bf16)."""

from .scheme import Scheme

NONE = Scheme(
    name="none",
    builder_precision=lambda q, precision: precision,
    builder_options=lambda q: {},
    check=lambda q: [],
)
