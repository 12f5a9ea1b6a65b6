"""The reference an export is judged against: the adapted model as it was trained, in PyTorch.

For a QLoRA adapter that is the 4-bit NF4 base (bitsandbytes, with the recorded settings) plus the adapter,
unmerged, exactly as the trainer ran it; for a plain LoRA adapter, the fp32 base plus the adapter.
"""

from __future__ import annotations

from pathlib import Path

from .adapters import Adapter
from .base import Nf4Settings, load_fp32, load_nf4


def load_adapted(base_dir: Path, adapter: Adapter):
    from peft import PeftModel

    if adapter.trained_on_4bit:
        quant = {k: v for k, v in adapter.manifest["quantization"].items() if k != "quantized_modules"}
        model = load_nf4(base_dir, Nf4Settings(**quant))
    else:
        model = load_fp32(base_dir)
    return PeftModel.from_pretrained(model, str(adapter.path), is_trainable=False).eval()
