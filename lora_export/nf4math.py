"""bitsandbytes 4-bit (NF4/FP4) arithmetic on one weight, with the settings a QLoRA adapter was trained with.

The merge, the parity reference, the survival measurement and NF4 with the training's scales all build on
these, so dequant(Q4(W)) is computed one way everywhere.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .base import Nf4Settings


def round_trip(w, nf4: Nf4Settings):
    """dequant(NF4(W)) with bitsandbytes, bit for bit what the 4-bit base computed with during training.

    The weights are quantized from ``load_dtype`` (what training loaded) and dequantized in fp32: code x block
    scale exactly, as bitsandbytes' 4-bit matmul computes it for fp32 inputs (from bf16-loaded weights too;
    ``dequantize_4bit`` with the state's own dtype would round each product to bf16 first)."""
    import bitsandbytes.functional as bnbf
    import torch

    q, state = bnbf.quantize_4bit(w.to(getattr(torch, nf4.load_dtype)), blocksize=nf4.blocksize,
                                  compress_statistics=nf4.double_quant, quant_type=nf4.quant_type,
                                  quant_storage=getattr(torch, nf4.quant_storage))
    state.dtype = torch.float32
    return bnbf.dequantize_4bit(q, state).to(w.dtype)


def training_absmax(w, nf4):
    """The per-block absmax (fp32) bitsandbytes computes for W with the training's NF4 settings."""
    import bitsandbytes.functional as bnbf
    import torch

    _, state = bnbf.quantize_4bit(w.to(getattr(torch, nf4.load_dtype)), blocksize=nf4.blocksize,
                                  compress_statistics=nf4.double_quant, quant_type=nf4.quant_type)
    absmax = state.absmax
    if state.nested:  # double quantization: the absmax are themselves 8-bit blockwise, plus an offset
        absmax = bnbf.dequantize_blockwise(absmax, state.state2) + state.offset
    return absmax.to(torch.float32)


def quantize_with_absmax(w, absmax, blocksize: int, quant_type: str = "nf4"):
    """W (N x K) coded to the nearest NF4 level of W / absmax per block; bitsandbytes' packed bytes."""
    import bitsandbytes.functional as bnbf
    import torch

    levels = bnbf.get_4bit_type(quant_type, device="cpu").to(torch.float32)
    midpoints = (levels[1:] + levels[:-1]) / 2
    x = (w.to(torch.float32).reshape(-1, blocksize) / absmax.reshape(-1, 1)).clamp(-1, 1).reshape(-1)
    codes = torch.bucketize(x, midpoints).to(torch.uint8)
    return (codes[0::2] << 4) | codes[1::2]
