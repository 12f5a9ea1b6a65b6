"""int8 block-wise weight-only quantization for ONNX Runtime's MatMulNBits (8 bits), by the same
``MatMulNBitsQuantizer`` path as int4; every MatMul, lm_head included, is int8 ("int8 or higher" holds)."""

from .int4 import _check, _common
from .scheme import Scheme

INT8 = Scheme(
    name="int8",
    builder_precision=lambda q, precision: "int8",
    builder_options=_common,
    check=lambda q: [p for p in _check(q) if "lm_head" not in p and "sensitive" not in p],
    honours=("block_size", "symmetric", "accuracy_level"),  # every MatMul is int8: no lm_head/sensitive choice
)
