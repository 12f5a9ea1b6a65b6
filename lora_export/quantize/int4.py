"""int4 block-wise weight-only quantization for ONNX Runtime's MatMulNBits.

The quantization itself is ONNX Runtime's own ``MatMulNBitsQuantizer`` (round-to-nearest, per block),
run by the onnxruntime-genai builder on the merged fp32 weights. The output projection is kept at int8
by default: an int4 lm_head is a known cause of repetition (FACTS.md, failure 9).
"""

from .scheme import Scheme

BLOCK_SIZES = (16, 32, 64, 128, 256)
LM_HEAD = ("int8", "int4", "fp32")


def _options(q) -> dict:
    opts = {"block_size": str(q.block_size), "is_symmetric": str(q.symmetric).lower()}
    # The builder shares a tied embedding with lm_head; a shared matrix cannot be int4 on one side and
    # int8/fp32 on the other (it emits an invalid graph), so the two are stored separately then.
    if q.lm_head == "int8":
        opts.update(matmul_mixed_precision="last_matmul:int8", shared_embeddings="false")
    elif q.lm_head == "fp32":
        opts.update(nodes_to_exclude="/lm_head/MatMul", shared_embeddings="false")
    return opts


def _check(q) -> list[str]:
    problems = []
    if q.block_size not in BLOCK_SIZES:
        problems.append(f"int4 block_size {q.block_size} is not supported (use one of {BLOCK_SIZES})")
    if q.lm_head not in LM_HEAD:
        problems.append(f"lm_head = '{q.lm_head}' is not one of {LM_HEAD}")
    return problems


INT4 = Scheme(
    name="int4",
    builder_precision=lambda q, precision: "int4",
    builder_options=_options,
    check=_check,
)
