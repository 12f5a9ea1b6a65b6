"""int4 block-wise weight-only quantization for ONNX Runtime's MatMulNBits.

The quantization itself is ONNX Runtime's own ``MatMulNBitsQuantizer`` (round-to-nearest, per block),
run by the onnxruntime-genai builder on the merged fp32 weights. The output projection is kept
at int8 by default: an int4 lm_head is a known cause of repetition (FACTS.md, failure 9).
``sensitive_layers = "int8"`` also keeps the most quantization-sensitive MatMuls at int8 (llama.cpp's mixed
strategy: the first and last eighth of the layers and every third layer's qkv and down projections).
"""

from .nbits import BITS, accuracy_problems, block_problems
from .nbits import layout as nbits_layout
from .nbits import options as nbits_options
from .scheme import Scheme

LM_HEAD = ("int8", "int4", "unquantized")
SENSITIVE = ("int4", "int8")


def _options(q) -> dict:
    opts = nbits_options(q)
    mixed = []
    # The builder shares a tied embedding with lm_head; a shared matrix cannot be int4 on one side and
    # int8/unquantized on the other, and a shared int4 one comes out as an invalid graph too in 0.18 (the embedding's
    # Gather reads the packed uint8 weights: seen on SmolLM2-135M), so the two are always stored separately.
    opts["shared_embeddings"] = "false"
    if q.lm_head == "int8":
        mixed.append("last_matmul:int8")
    elif q.lm_head == "unquantized":
        opts["nodes_to_exclude"] = "/lm_head/MatMul"
    if q.sensitive_layers == "int8":
        mixed.append("mixed_layers:int8")
    if mixed:
        opts["matmul_mixed_precision"] = ",".join(mixed)
    return opts


def _check(q) -> list[str]:
    problems = block_problems(q)
    if q.lm_head not in LM_HEAD:
        problems.append(f"lm_head = '{q.lm_head}' is not one of {LM_HEAD}")
    problems += accuracy_problems(q)
    if q.sensitive_layers not in SENSITIVE:
        problems.append(f"sensitive_layers = '{q.sensitive_layers}' is not one of {SENSITIVE}")
    return problems


def _layout(model_path, q) -> list:
    body = (4, 8) if q.sensitive_layers == "int8" else (4,)
    return nbits_layout(model_path, q, body, BITS.get(q.lm_head, -1))


INT4 = Scheme(name="int4", builder_precision=lambda q, precision: "int4", builder_options=_options, check=_check,
              honours=("block_size", "symmetric", "lm_head", "sensitive_layers", "accuracy_level", "algo",
                       "side_path_block_size"),
              layout=_layout, reproducible=lambda q: q.algo == "rtn")
