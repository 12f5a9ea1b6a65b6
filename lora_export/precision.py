"""Checks that the merged model fits the target's precision before it is exported.

fp16 tops out at 65504: a merged weight or an activation beyond it becomes Inf in the exported graph and
then NaN logits. We look before exporting (weights directly; activations with forward hooks on a few
prompts through the merged fp32 model) and name the layers, with the fix. bf16 has fp32's range.
"""

from __future__ import annotations

from .errors import BadInput

FP16_MAX = 65504.0
MARGIN = 0.5  # activations are measured on a few prompts only: refuse at half the range


def check_fp16_range(model, prompts: list[list[int]], where: str) -> None:
    import torch

    weights = {n: p.detach().abs().max().item() for n, p in model.named_parameters()}
    too_big = sorted((n for n, v in weights.items() if v > FP16_MAX), key=weights.get, reverse=True)
    peaks: dict[str, float] = {}

    def hook(name):
        def record(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            if isinstance(out, torch.Tensor) and out.is_floating_point():
                peaks[name] = max(peaks.get(name, 0.0), out.detach().abs().max().item())
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n and not list(m.children())]
    try:
        with torch.no_grad():
            for p in prompts:
                model(input_ids=torch.tensor([p]))
    finally:
        for h in handles:
            h.remove()
    hot = sorted((n for n, v in peaks.items() if v > FP16_MAX * MARGIN), key=peaks.get, reverse=True)
    if too_big or hot:
        parts = []
        if too_big:
            parts.append(f"merged weights beyond fp16's range ({FP16_MAX:g}) in {', '.join(too_big[:5])} "
                         f"(max {weights[too_big[0]]:.3g})")
        if hot:
            parts.append(f"activations reaching {peaks[hot[0]]:.3g} in {', '.join(hot[:5])}")
        raise BadInput.one(where, "; ".join(parts) + ", which would be Inf/NaN in fp16",
                           "use a bf16 or fp32 target for this model (bf16 has fp32's range)")
