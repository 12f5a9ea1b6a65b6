"""int8 block-wise weight-only quantization for ONNX Runtime's MatMulNBits (8 bits), by the same
``MatMulNBitsQuantizer`` path as int4; every MatMul, lm_head included, is int8 ("int8 or higher" holds)."""

from .nbits import accuracy_problems, block_problems, layout, options
from .scheme import Scheme

INT8 = Scheme(
    name="int8",
    builder_precision=lambda q, precision: "int8",
    builder_options=options,
    check=lambda q: block_problems(q) + accuracy_problems(q),
    honours=("block_size", "symmetric", "accuracy_level", "algo"),  # every MatMul is int8: no lm_head/sensitive choice
    layout=lambda model_path, q: layout(model_path, q, (8,), 8),
    reproducible=lambda q: q.algo == "rtn",
)
