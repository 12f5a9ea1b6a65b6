"""NF4 weights for ONNX Runtime's MatMulBnb4 (the bitsandbytes 4-bit format, CPU and CUDA kernels).

The builder emits the graph in the target's precision; ONNX Runtime's own ``MatMulBnb4Quantizer`` then
re-quantizes every MatMul weight to NF4 with fresh per-block absmax scales (no double quantization). The
output projection stays unquantized.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from .scheme import Scheme

BLOCK_SIZES = (64, 128, 256)
NF4 = 1  # MatMulBnb4Quantizer's quant_type for NF4 (0 is FP4)


def _post_process(model_dir: Path, q) -> None:
    import onnx
    from onnxruntime.quantization.matmul_bnb4_quantizer import MatMulBnb4Quantizer

    model = onnx.load(str(model_dir / "model.onnx"))
    quantizer = MatMulBnb4Quantizer(model, quant_type=NF4, block_size=q.block_size, nodes_to_exclude=["/lm_head/MatMul"])
    quantizer.process()
    # write beside, then replace: the external data file's name must stay model.onnx.data
    with tempfile.TemporaryDirectory(dir=model_dir) as tmp:
        onnx.save_model(quantizer.model.model, str(Path(tmp) / "model.onnx"), save_as_external_data=True,
                        all_tensors_to_one_file=True, location="model.onnx.data")
        for name in ("model.onnx", "model.onnx.data"):
            shutil.move(str(Path(tmp) / name), str(model_dir / name))


def _check(q) -> list[str]:
    problems = []
    if q.block_size not in BLOCK_SIZES:
        problems.append(f"nf4 block_size {q.block_size} is not supported (use one of {BLOCK_SIZES})")
    if q.lm_head != "unquantized":
        problems.append('nf4 keeps the output projection unquantized: set lm_head = "unquantized"')
    return problems


NF4_SCHEME = Scheme(
    name="nf4",
    builder_precision=lambda q, precision: precision,
    builder_options=lambda q: {},
    check=_check,
    post_process=_post_process,
)
