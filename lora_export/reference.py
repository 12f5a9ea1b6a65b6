"""The reference an export is judged against: the adapted model as it was trained, in PyTorch.

For a QLoRA adapter that is the 4-bit NF4 base (bitsandbytes, with the recorded settings) plus the adapter,
unmerged, exactly as the trainer ran it; for a plain LoRA adapter, the fp32 base plus the adapter. Several
adapters are all active at once, each output scaled by its weight: PEFT's unmerged linear combination.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .adapters import Adapter, attach
from .base import load_fp32, load_nf4
from .merge import quantization_of


def load_adapted(base_dir: Path, adapters: Adapter | Sequence[Adapter], weights: Sequence[float] | None = None):
    adapters = [adapters] if isinstance(adapters, Adapter) else list(adapters)
    first = adapters[0]
    if first.trained_on_4bit:
        model = load_nf4(base_dir, quantization_of(first)[1])
    else:
        model = load_fp32(base_dir)
    return attach(model, adapters, weights)[0].eval()
