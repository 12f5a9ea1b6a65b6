"""Checks that the merged model fits the target's precision before it is exported.

fp16 tops out at 65504: a merged weight or an activation beyond it becomes Inf in the exported graph and
then NaN logits. We look before exporting (weights directly; activations with forward hooks on a few
prompts through the merged fp32 model) and name the layers, with the fix. bf16 has fp32's range.
"""

from __future__ import annotations

from .errors import BadInput

FP16_MAX = 65504.0
MARGIN = 0.5  # activations are measured on a few prompts only: refuse at half the range


def checkpoint_abs_max(checkpoint) -> dict[str, float]:
    """Each floating tensor's max |value| in a checkpoint, read one tensor at a time (for a layerwise model, whose
    parameters stay on disk between forwards)."""
    from .layerwise import checkpoint_index
    from .tensorfile import read_tensor

    found = {}
    for name, (file, entry) in checkpoint_index(checkpoint).items():
        with open(file, "rb") as f:
            t = read_tensor(f, entry)
        if t.is_floating_point() and t.numel():
            found[name] = t.abs().max().float().item()
    return found


def check_fp16_range(model, prompts: list[list[int]], where: str,
                     weight_max: dict[str, float] | None = None) -> tuple[dict, dict]:
    """Refuse weights beyond fp16's range and activations beyond half of it; returns (weights' max |value|, each
    leaf module's activation peak). ``weight_max``: the weights' max, read from the checkpoint (layerwise models)."""
    import torch

    weights = weight_max if weight_max is not None else \
        {n: p.detach().abs().max().item() for n, p in model.named_parameters()}
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
    return weights, peaks
