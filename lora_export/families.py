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
MOE_NAMES = re.compile(r"Moe|MoE|Mixtral|GptOss|Dbrx|Jamba|Deepseek|Olmoe|Arctic")


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


def _text(config: dict) -> dict:
    text = config.get("text_config")
    return text if isinstance(text, dict) and text else config


def is_moe(config: dict) -> bool:
    """Any expert count or routing field set (to anything but 0/null) at the top level, in ``text_config`` or in
    DBRX's ``ffn_config``; or an architecture named as a mixture of experts."""
    arch = str((config.get("architectures") or [""])[0])
    if MOE_NAMES.search(arch):
        return True
    places = [config, _text(config)] + [d for d in (config.get("ffn_config"),) if isinstance(d, dict)]
    return any(place.get(k) not in (None, 0, False) for place in places for k in MOE_FIELDS)


#: the builder's rope types (make_rope_init of its base, Llama and Phi-3 classes); another is refused up front
BUILDER_ROPE = ("default", "linear", "yarn", "llama3", "longrope", "su")


def rope_settings(config: dict) -> tuple[dict | None, str]:
    """The rope settings as written (transformers 5's ``rope_parameters`` or 4's ``rope_scaling``; per layer type,
    the global one) and their type."""
    rope = config.get("rope_parameters") or config.get("rope_scaling")
    if isinstance(rope, dict) and isinstance(rope.get("full_attention"), dict):
        rope = rope["full_attention"]
    if not isinstance(rope, dict):
        return None, "default"
    return rope, str(rope.get("rope_type") or rope.get("type") or "default")


def check_family(config: dict, backend: str, where: str, known_wrong: bool = True, accept: bool = True) -> str | None:
    """BadInput for a checkpoint ``backend`` must not export; else None for a tested family, or the note that
    says it is not among them. ``known_wrong=False``: KNOWN_WRONG is left to the caller (the pipeline checks it
    up front; the backends, called after, check the rest again for callers of their own). ``accept=False``: only
    the refusals (MoE, multimodal, KNOWN_WRONG), not whether the backend takes the architecture (for a config
    that transformers will refuse anyway, with its own message)."""
    archs = config.get("architectures")
    arch = str(archs[0]) if isinstance(archs, list) and archs else None
    other = "torch-dynamo" if backend == "genai-builder" else "genai-builder"
    other_target = "ort-cpu-fp32-generic" if other == "torch-dynamo" else "ort-cpu-fp32"
    if is_moe(config):
        raise BadInput.one(where, f"{arch or config.get('model_type')} is a mixture-of-experts model, which "
                           "lora-export does not export", "export a dense causal LM (Llama, Mistral, Qwen2/3, "
                           "Gemma 1-3, Phi-2/3/4, Granite, OLMo, SmolLM3 ...)")
    if arch is None:
        if backend == "genai-builder" and accept:
            raise BadInput.one(where, "config.json names no architectures, which the onnxruntime-genai builder "
                               "dispatches on", 'add "architectures": ["<Family>ForCausalLM"] as save_pretrained() '
                               f"writes it, or use --target {other_target}")
        return None if not accept else (f"config.json names no architecture (model_type "
                                        f"{config.get('model_type')!r}); the parity verdict is the proof")
    if arch.endswith("ForConditionalGeneration"):
        raise BadInput.one(where, f"{arch} is a multimodal (or encoder-decoder) checkpoint; lora-export exports "
                           "text-only causal LMs", "export the text model alone (a ...ForCausalLM checkpoint of "
                           "the same family, e.g. Gemma3ForCausalLM for Gemma 3 1B)")
    wrong = KNOWN_WRONG.get((backend, arch)) if known_wrong else None
    if wrong:
        raise BadInput.one(where, f"the {backend} backend cannot export {arch} right: {wrong}",
                           f'use a target with backend = "{other}", e.g. --target {other_target}'
                           if (other, arch) not in KNOWN_WRONG else
                           "no backend exports this family right yet")
    if not accept:
        return None
    if backend == "genai-builder":
        if arch not in builder_architectures():
            raise BadInput.one(where, f"architecture {arch} is not built by the installed onnxruntime-genai "
                               "(genai-builder backend)", f'use a target with backend = "torch-dynamo", e.g. '
                               f"--target {other_target}")
        kind = rope_settings(_text(config))[1]
        if kind not in BUILDER_ROPE:
            raise BadInput.one(where, f"rope type {kind!r} is not built by the installed "
                               "onnxruntime-genai (it builds " + ", ".join(BUILDER_ROPE) + ")",
                               f'use a target with backend = "torch-dynamo", e.g. --target {other_target}')
    elif not (arch.endswith("ForCausalLM") or arch.endswith("LMHeadModel")):
        raise BadInput.one(where, f"architecture {arch} is not a causal LM", "pass a ...ForCausalLM checkpoint")
    if arch in TESTED.get(backend, ()):
        return None
    builder = "onnxruntime-genai" if backend == "genai-builder" else "torch.onnx"
    return (f"{arch} is built by {builder}, not among the families tested by lora-export; the parity verdict is "
            "the proof")


def family_note(base, backend: str) -> str | None:
    """``check_family`` on a base directory's config.json (which check_base has read: a JSON object), before any
    work. A config with ``auto_map`` may need remote code: the refusals apply, whether the backend takes the
    architecture waits for transformers, which refuses remote code with its own message (Phi-3's auto_map loads
    without it)."""
    import json
    from pathlib import Path

    where = Path(base) / "config.json"
    config = json.loads(where.read_text())
    return check_family(config, backend, str(where), accept=not config.get("auto_map"))
