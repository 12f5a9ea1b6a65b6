"""The unmerged graph's source: the adapter as a side path on the base it was trained against.

Used by ``export --keep-adapter`` and bench's unmerged comparison graph (``pipeline``), by the switchable
export's base graph and its parity (``switchable``, ``switchable_parity``) and by benchmarks/decode_vs_peers.py:
for a QLoRA adapter that base is dequant(NF4(W)), the 4-bit round trip of the full-precision base, so the side
path sits on the weights it was trained beside.
"""

from __future__ import annotations

from pathlib import Path

from .errors import BadInput
from .export import BACKENDS
from .merge import rewrite_checkpoint
from .quantized_base import FOUR_BIT, quantization_of


def check_side_path(adapters, target=None) -> None:
    """--keep-adapter, or a target whose graph = "unmerged": one plain LoRA or rsLoRA adapter, which the builder can
    emit as a side path. ``target``: the Target that asks for it (None: the command line does)."""
    asked = f'the target {target.name} (graph = "unmerged", {target.source})' if target is not None else "--keep-adapter"
    merged = ('export it with a target whose graph = "merged", e.g. ort-cuda-fp16 or ort-cuda-int4'
              if target is not None else "export it merged (without --keep-adapter)")
    if len(adapters) > 1:
        raise BadInput.one(target.source if target is not None else "--keep-adapter",
                           f"an unmerged graph carries one adapter, and {asked} keeps the adapter unmerged",
                           f"pass a single --adapter, or {merged}")
    if not adapters[0].plain_lora:
        raise BadInput.one(str(adapters[0].path / "adapter_config.json"), f"{asked} keeps the adapter as a side path, "
                           "which supports plain LoRA and rsLoRA only (this adapter uses DoRA or modules_to_save)",
                           merged)


def unmerged_source(base: Path, adapter, merge_base: str, work: Path) -> Path:
    """The checkpoint a side-path graph is built on: the base the adapter was trained against. ``base`` is in
    full precision (a pre-quantized base already dequantized: nothing to round again)."""
    if merge_base not in FOUR_BIT or adapter.quantization.prequantized:
        return base
    rewrite_checkpoint(base, [], (), work / "base-nf4", merge_base, nf4=quantization_of(adapter))
    return work / "base-nf4"


def build_unmerged(base: Path, adapter, merge_base: str, target, out_dir: Path, work: Path) -> None:
    """The adapter as a side path on the base it was trained against (the NF4 round trip for QLoRA)."""
    check_side_path([adapter])
    source = unmerged_source(base, adapter, merge_base, work)
    BACKENDS[target.backend].build(source, out_dir, target, out_dir / "build.log", adapter=adapter.path)
