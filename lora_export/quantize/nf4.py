"""NF4 weights for ONNX Runtime's MatMulBnb4 (the bitsandbytes 4-bit format, CPU and CUDA kernels).

The builder emits the graph in the target's precision; ONNX Runtime's own ``MatMulBnb4Quantizer`` then
re-quantizes every MatMul weight to NF4 with fresh per-block absmax scales (no double quantization). The
output projection and an unmerged graph's LoRA side paths stay unquantized; on an unmerged graph of a QLoRA
adapter the base's blocks are then re-coded with the scales it was trained with, so they hold its trained codes.
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
    # an unmerged graph's LoRA side paths stay in the graph's float precision (the builder names them .../lora_A|B/)
    side_paths = [n.name for n in model.graph.node if n.op_type == "MatMul" and "/lora_" in n.name]
    quantizer = MatMulBnb4Quantizer(model, quant_type=NF4, block_size=q.block_size,
                                    nodes_to_exclude=["/lm_head/MatMul", *side_paths])
    quantizer.process()
    _replace_model(quantizer.model.model, model_dir)


def _replace_model(model, model_dir: Path) -> None:
    """Save ``model`` as model_dir's model.onnx + model.onnx.data: written beside, then moved over the old ones
    (the external data file's name must stay model.onnx.data)."""
    import onnx

    with tempfile.TemporaryDirectory(dir=model_dir) as tmp:
        onnx.save_model(model, str(Path(tmp) / "model.onnx"), save_as_external_data=True,
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
    honours=("block_size", "lm_head", "scales"),
)


# --- "original" scales: keep the NF4 blocks' absmax the adapter was trained against --------------------
#
# With fresh scales every block of W + dW gets a new absmax. With the original scales, each block keeps
# the absmax bitsandbytes gave dequant(NF4(W)) during training, so a weight the adapter did not move keeps
# exactly its trained 4-bit code. Neither bitsandbytes (quantize_4bit overwrites a given absmax) nor ONNX
# Runtime (quantize_matmul_bnb4 computes its own) quantizes with given scales, so the nearest-level coding
# is written by hand (``nf4math.quantize_with_absmax``); with a block's own absmax it reproduces bitsandbytes'
# bytes exactly (tested), and MatMulBnb4 reads bitsandbytes' packing as is (two codes per byte, first in the
# high nibble).


def reuse_training_scales(export_dir: Path, checkpoint: Path, base_dir: Path, adapter, q) -> int:
    """Re-code every MatMulBnb4 weight of a trained-4-bit module with its training absmax. Returns the count."""
    import onnx
    import torch
    from onnx import numpy_helper

    from ..checkpoint import CheckpointTensors
    from ..errors import BadInput
    from ..nf4math import quantize_with_absmax, training_absmax
    from ..quantized_base import quantization_of
    from .survival import candidate_modules

    if not adapter.trained_on_4bit:
        raise BadInput.one(str(adapter.path), 'scales = "original" needs the NF4 scales the adapter was trained '
                           "against, and this adapter was not trained on a 4-bit base", 'use scales = "fresh"')
    quantized, nf4 = quantization_of(adapter)
    if nf4.blocksize != q.block_size or nf4.quant_type != "nf4":
        raise BadInput.one(str(adapter.path), f"the adapter was trained with {nf4.quant_type} blocks of "
                           f"{nf4.blocksize}; the target asks for nf4 blocks of {q.block_size}",
                           f"set block_size = {nf4.blocksize} in the target, or scales = \"fresh\"")
    merged, base = CheckpointTensors(checkpoint), CheckpointTensors(base_dir)
    model = onnx.load(str(export_dir / "model.onnx"), load_external_data=True)
    inits = {i.name: i for i in model.graph.initializer}
    done = 0
    for node in model.graph.node:
        if node.op_type != "MatMulBnb4":
            continue
        modules = candidate_modules(node.name, set(merged.keys) & set(base.keys))
        if not modules or not set(modules) <= set(quantized):
            continue
        w = torch.cat([merged.get(f"{m}.weight") for m in modules])
        absmax = torch.cat([training_absmax(base.get(f"{m}.weight"), nf4) for m in modules])
        packed = quantize_with_absmax(w, absmax, nf4.blocksize)
        b_name, absmax_name = node.input[1], node.input[2]
        inits[b_name].CopyFrom(numpy_helper.from_array(packed.numpy(), b_name))
        dtype = numpy_helper.to_array(inits[absmax_name]).dtype  # fp16 in an fp16 graph (MatMulBnb4's T1)
        inits[absmax_name].CopyFrom(numpy_helper.from_array(absmax.numpy().astype(dtype), absmax_name))
        done += 1
    _replace_model(model, export_dir)
    return done
