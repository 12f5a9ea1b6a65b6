"""Which model families each graph backend takes, decided on config.json before any heavy work.

The fused backend takes what the installed onnxruntime-genai builder dispatches: its ``create_model`` names each
architecture it builds (``config.architectures[0] == "..."``), and we read that list from the builder's source
instead of keeping a whitelist that lags it. The generic backend takes any causal LM transformers knows; whether
torch.onnx can trace it shows when it runs. Families outside ``TESTED`` still go through, with a note: the parity
verdict is the proof for them.

Refused up front, with what is supported: mixture-of-experts checkpoints (LoRA on routed experts, the builder's
MoE ops that ONNX Runtime runs on CUDA only, and a reference that has to route tokens the same way are all out of
scope here), multimodal ``...ForConditionalGeneration`` checkpoints, and families where a backend is known to
build a wrong graph (``KNOWN_WRONG``: each has a test that shows when a builder upgrade mends it).
"""

from __future__ import annotations

import functools
import importlib.util
import re

from .errors import BadInput

#: architectures tests/test_families.py exports on configs with their families' real quirks, per backend
TESTED = {
    "genai-builder": ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                      "Phi3ForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM", "GraniteForCausalLM"),
    "torch-dynamo": ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                     "Phi3ForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM",
                     "GraniteForCausalLM", "OlmoForCausalLM", "Olmo2ForCausalLM", "PhiForCausalLM",
                     "GPTNeoXForCausalLM", "SmolLM3ForCausalLM", "GPT2LMHeadModel", "OPTForCausalLM"),
}

#: (backend, architecture) -> what goes wrong: measured on the quirk configs of tests/families.py, each shown still
#: wrong by test_families.py's test_a_refused_family_is_refused_up_front_and_still_wrong (which fails once a backend
#: upgrade mends it, so that the entry is dropped)
KNOWN_WRONG: dict[tuple[str, str], str] = {
    ("genai-builder", "Gemma3ForCausalLM"):
        "it stops with an error on Gemma-3's rope settings as transformers 5 reads them (one per layer type)",
    ("genai-builder", "OlmoForCausalLM"): "its graph of OLMo FAILs parity",
    ("genai-builder", "PhiForCausalLM"): "its graph of Phi-2 FAILs parity (logits about 1e-3 off)",
    ("genai-builder", "SmolLM3ForCausalLM"): "it stops with an error on SmolLM3's NoPE layers",
}

# config fields that only mixture-of-experts models set (Mixtral, Qwen2/3-MoE, DeepSeek, gpt-oss, Granite-MoE,
# PhiMoE, LFM2-MoE, OLMoE)
MOE_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts", "num_experts_per_tok")


@functools.cache
def builder_architectures() -> tuple[str, ...]:
    """The architectures the installed onnxruntime-genai builder dispatches, read from its source (importing it
    would pull in torch and its model classes); () when onnxruntime-genai is not installed."""
    spec = importlib.util.find_spec("onnxruntime_genai")
    if spec is None or not spec.submodule_search_locations:
        return ()
    from pathlib import Path

    source = Path(next(iter(spec.submodule_search_locations))) / "models" / "builder.py"
    if not source.is_file():
        return ()
    return tuple(sorted(set(re.findall(r'config\.architectures\[0\] == "(\w+)"', source.read_text()))))


def is_moe(config: dict) -> bool:
    text = config.get("text_config") or config
    return any((text.get(k) or 0) > 1 for k in MOE_FIELDS if isinstance(text.get(k), int))


def check_family(config: dict, backend: str, where: str, known_wrong: bool = True) -> str | None:
    """BadInput for a checkpoint ``backend`` must not export; else None for a tested family, or the note that
    says it is not among them. ``known_wrong=False``: KNOWN_WRONG is left to the caller (the pipeline checks it
    up front; the backends, called after, check the rest again for callers of their own)."""
    arch = (config.get("architectures") or ["?"])[0]
    if is_moe(config):
        raise BadInput.one(where, f"{arch} is a mixture-of-experts model, which lora-export does not export",
                           "export a dense causal LM (Llama, Mistral, Qwen2/3, Gemma 1-3, Phi-2/3/4, Granite, "
                           "OLMo, SmolLM3 ...); `lora-export targets` lists the targets")
    if arch.endswith("ForConditionalGeneration"):
        raise BadInput.one(where, f"{arch} is a multimodal (or encoder-decoder) checkpoint; lora-export exports "
                           "text-only causal LMs", "export the text model alone (a ...ForCausalLM checkpoint of "
                           "the same family, e.g. Gemma3ForCausalLM for Gemma 3 1B)")
    wrong = KNOWN_WRONG.get((backend, arch)) if known_wrong else None
    other = "torch-dynamo" if backend == "genai-builder" else "genai-builder"
    other_target = "ort-cpu-fp32-generic" if other == "torch-dynamo" else "ort-cpu-fp32"
    if wrong:
        raise BadInput.one(where, f"the {backend} backend cannot export {arch} right: {wrong}",
                           f'use a target with backend = "{other}", e.g. --target {other_target}'
                           if (other, arch) not in KNOWN_WRONG else
                           "no backend exports this family right yet")
    if backend == "genai-builder":
        if arch not in builder_architectures():
            raise BadInput.one(where, f"architecture {arch} is not built by the installed onnxruntime-genai "
                               "(genai-builder backend)", f'use a target with backend = "torch-dynamo", e.g. '
                               f"--target {other_target}")
    elif not (arch.endswith("ForCausalLM") or arch.endswith("LMHeadModel")):
        raise BadInput.one(where, f"architecture {arch} is not a causal LM", "pass a ...ForCausalLM checkpoint")
    if arch in TESTED.get(backend, ()):
        return None
    builder = "onnxruntime-genai" if backend == "genai-builder" else "torch.onnx"
    return (f"{arch} is built by {builder}, not among the families tested by lora-export; the parity verdict is "
            "the proof")
