"""Merge a LoRA adapter into the base weights, in fp32, with PEFT's own semantics.

The merge base matters for QLoRA: the adapter was trained against dequant(NF4(W)), not W. Merging into
W adds the 4-bit quantization error back; merging into dequant(NF4(W)), reproduced with bitsandbytes and
the exact settings recorded at training time, gives back the trained model. ``nf4`` is the default for
adapters trained on a 4-bit base; ``original`` is offered and recorded, and parity measures either.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .adapters import Adapter
from .base import Nf4Settings, load_fp32, load_tokenizer
from .errors import BadInput

MERGE_BASES = ("nf4", "original")


@dataclass(frozen=True)
class MergeResult:
    checkpoint: Path
    merge_base: str
    changed: tuple[str, ...]  # modules whose weight the merge changed
    max_abs_delta: float  # the largest |change| of any merged weight


def default_merge_base(adapter: Adapter) -> str:
    return "nf4" if adapter.trained_on_4bit else "original"


def nf4_round_trip(model, names: list[str], nf4: Nf4Settings) -> None:
    """Replace each named linear weight W by dequant(NF4(W)), bit for bit what bitsandbytes trained on."""
    import bitsandbytes.functional as bnbf
    import torch

    modules = dict(model.named_modules())
    for name in names:
        w = modules[name].weight
        q, state = bnbf.quantize_4bit(w.data.to(getattr(torch, nf4.load_dtype)), blocksize=nf4.blocksize,
                                      compress_statistics=nf4.double_quant, quant_type=nf4.quant_type,
                                      quant_storage=getattr(torch, nf4.quant_storage))
        w.data.copy_(bnbf.dequantize_4bit(q, state).to(w.dtype))


def quantization_of(adapter: Adapter) -> tuple[list[str], Nf4Settings]:
    """The 4-bit modules and NF4 settings a QLoRA adapter was trained against, from its training manifest."""
    quant = dict(adapter.manifest["quantization"])
    return quant.pop("quantized_modules"), Nf4Settings(**quant)


def merged_model(base_dir: Path, adapter: Adapter, merge_base: str):
    """The merged model in memory (fp32), after the sanity checks. Returns (model, changed modules, max |dW|)."""
    import torch
    from peft import PeftModel

    if merge_base not in MERGE_BASES:
        raise BadInput.one("--merge-base", f"unknown merge base '{merge_base}'", f"use one of {', '.join(MERGE_BASES)}")
    model = load_fp32(base_dir)
    if merge_base == "nf4":
        if not adapter.trained_on_4bit:
            raise BadInput.one(str(adapter.path), "merge base nf4 needs the training manifest's quantization settings, "
                               "and this adapter has none", "use --merge-base original")
        nf4_round_trip(model, *quantization_of(adapter))

    modules = dict(model.named_modules())
    before = {name: modules[name].weight.detach().clone() for name in adapter.targeted}
    peft_model = PeftModel.from_pretrained(model, str(adapter.path), is_trainable=False)
    merged = peft_model.merge_and_unload()
    merged_modules = dict(merged.named_modules())

    deltas = {name: (merged_modules[name].weight.detach() - w).abs().max().item() for name, w in before.items()}
    unchanged = [name for name, d in deltas.items() if d == 0.0]
    if unchanged:
        raise BadInput.one(str(adapter.path), f"merging changed nothing in {len(unchanged)} targeted modules "
                           f"(e.g. {unchanged[0]}): their lora_B is zero", "train the adapter before exporting it")
    bad = [n for n, p in merged.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise BadInput.one(str(adapter.path), f"the merged weights hold NaN or Inf ({bad[0]})",
                           "check the adapter's scaling (lora_alpha) and weights")
    merged.config.__dict__.pop("quantization_config", None)
    return merged.eval(), tuple(sorted(deltas)), max(deltas.values())


def save_merged(model, base_dir: Path, out_dir: Path) -> None:
    """Save a merged model as a checkpoint the graph builder reads: safetensors, config, tokenizer."""
    model.save_pretrained(str(out_dir), safe_serialization=True)
    load_tokenizer(base_dir).save_pretrained(str(out_dir))


def merge(base_dir: Path, adapter: Adapter, out_dir: Path, merge_base: str) -> MergeResult:
    """Merge and save the checkpoint (safetensors, tokenizer, no quantization_config) to ``out_dir``."""
    merged, changed, max_delta = merged_model(base_dir, adapter, merge_base)
    save_merged(merged, base_dir, out_dir)
    return MergeResult(checkpoint=out_dir, merge_base=merge_base, changed=changed, max_abs_delta=max_delta)
