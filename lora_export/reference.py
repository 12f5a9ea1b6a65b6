"""The reference an export is judged against: the adapted model as it was trained, in PyTorch.

For a QLoRA adapter that is the 4-bit NF4 base (bitsandbytes, with the recorded settings) plus the adapter,
unmerged, exactly as the trainer ran it; for a plain LoRA adapter, the fp32 base plus the adapter. Several
adapters are all active at once, each output scaled by its weight: PEFT's unmerged linear combination.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .adapters import Adapter
from .base import Nf4Settings, load_fp32, load_nf4


def load_adapted(base_dir: Path, adapters: Adapter | Sequence[Adapter], weights: Sequence[float] | None = None):
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    adapters = [adapters] if isinstance(adapters, Adapter) else list(adapters)
    weights = list(weights or [1.0] * len(adapters))
    first = adapters[0]
    if first.trained_on_4bit:
        quant = {k: v for k, v in first.manifest["quantization"].items() if k != "quantized_modules"}
        model = load_nf4(base_dir, Nf4Settings(**quant))
    else:
        model = load_fp32(base_dir)
    if len(adapters) == 1 and weights[0] == 1.0:
        return PeftModel.from_pretrained(model, str(first.path), is_trainable=False).eval()
    names = [f"a{i}" for i in range(len(adapters))]
    model = PeftModel.from_pretrained(model, str(first.path), adapter_name=names[0], is_trainable=False)
    for name, adapter in zip(names[1:], adapters[1:]):
        model.load_adapter(str(adapter.path), adapter_name=name, is_trainable=False)
    model.base_model.set_adapter(names)  # all active: their outputs add up
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name, w in zip(names, weights):
                if name in module.scaling:
                    module.scaling[name] *= w
    return model.eval()
