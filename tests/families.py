"""Model families on configs that carry each family's real quirks, and an ONNX runner independent of lora-export's.

Every value below is the one a public checkpoint's config.json has (named in ``source``); only the sizes are
shrunk (hidden 64, 2-4 layers, 4 heads), and lengths the quirk hinges on (a sliding window, LongRoPE's original
context) are shrunk below the test prompts so that the quirk is exercised. Each family gets a PEFT adapter on all
linear layers with random (non-zero) B matrices, so the adapter changes every projection.

The runner here reads model.onnx with a bare onnxruntime.InferenceSession, on purpose not through
lora_export.runtime or lora_export.parity: the test holds the exported graph against PEFT's own forward, so a
bug shared by our gate and our runner cannot hide.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

EMBEDDED = Path(__file__).resolve().parents[1] / "lora_export" / "embedded"
SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)
# padded batch of 2; the long one passes every shrunk window below (sliding windows 4, LongRoPE's original 16)
PROMPTS = [[0, 11, 52, 301, 7, 99, 1500, 42, 17, 230, 18, 77, 3, 990, 64, 12, 501, 33, 8, 1020],
           [5, 6, 7, 8, 9, 410, 1200]]
SHORT_PROMPTS = [[0, 11, 52, 301, 7, 99, 1500, 42], [5, 6, 7, 8, 9]]


@dataclass(frozen=True)
class Family:
    name: str
    arch: str
    config: dict  # the config class's arguments (sizes shrunk)
    quirks: str
    source: str  # the public checkpoint whose config the values come from
    backends: tuple[str, ...] = ("genai-builder", "torch-dynamo")  # the backends that export it right
    refused: tuple[str, ...] = ()  # backends lora-export refuses it on (families.KNOWN_WRONG), shown still wrong
    prompts: list = field(default_factory=lambda: PROMPTS)
    #: rewrite config.json as transformers 4 wrote it (rope_scaling + rope_theta at the top level)
    transformers4_json: bool = False


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "high_freq_factor": 4.0,
               "low_freq_factor": 1.0, "original_max_position_embeddings": 64}  # 8192, shrunk

FAMILIES = [
    Family("llama-3.2", "LlamaForCausalLM", dict(SHAPE, rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True,
                                                 head_dim=16),
           "llama3 rope scaling (rope_parameters), tied embeddings", "meta-llama/Llama-3.2-1B-Instruct"),
    Family("llama-3.1-tf4", "LlamaForCausalLM", dict(SHAPE, rope_parameters=LLAMA3_ROPE, tie_word_embeddings=False),
           "llama3 rope scaling written as transformers 4's rope_scaling, untied embeddings",
           "meta-llama/Llama-3.1-8B-Instruct", transformers4_json=True),
    Family("llama-linear", "LlamaForCausalLM", dict(SHAPE, rope_parameters={"rope_type": "linear", "factor": 4.0,
                                                                           "rope_theta": 10000.0}),
           "linear rope scaling (position interpolation)", "lmsys/longchat-7b-16k (rope_scaling linear, factor 8)"),
    Family("mistral-v0.1", "MistralForCausalLM", dict(SHAPE, sliding_window=4, rope_parameters={
        "rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False),
           "sliding window (4096, shrunk to 4) shorter than the prompt", "mistralai/Mistral-7B-v0.1"),
    Family("qwen2.5", "Qwen2ForCausalLM", dict(SHAPE, tie_word_embeddings=True, rope_parameters={
        "rope_type": "default", "rope_theta": 1000000.0}, use_sliding_window=False),
           "q/k/v biases, tied embeddings", "Qwen/Qwen2.5-0.5B-Instruct"),
    Family("qwen2.5-yarn", "Qwen2ForCausalLM", dict(SHAPE, tie_word_embeddings=False, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "rope_theta": 1000000.0}),
           "yarn rope scaling (factor 4, original context 32768 shrunk to 32), q/k/v biases, untied",
           "Qwen/Qwen2.5-7B-Instruct with its README's yarn rope_scaling"),
    Family("qwen2.5-yarn-tf4", "Qwen2ForCausalLM", dict(SHAPE, tie_word_embeddings=False, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "rope_theta": 1000000.0}),
           "yarn rope scaling written as transformers 4's rope_scaling", "Qwen/Qwen2.5-7B-Instruct",
           transformers4_json=True),
    Family("qwen2-swa", "Qwen2ForCausalLM", dict(SHAPE, use_sliding_window=True, sliding_window=4,
                                                 max_window_layers=1, tie_word_embeddings=False),
           "use_sliding_window: layers from max_window_layers on slide (window shrunk to 4)",
           "Qwen/Qwen2-7B-Instruct with use_sliding_window set"),
    Family("qwen3", "Qwen3ForCausalLM", dict(SHAPE, head_dim=32, tie_word_embeddings=True, rope_parameters={
        "rope_type": "default", "rope_theta": 1000000.0}),
           "qk-norm, head_dim 32 != hidden/heads 16, tied", "Qwen/Qwen3-0.6B (head_dim 128, hidden 1024, 16 heads)"),
    # original context 512 (4096, shrunk): lora-export's parity prompts plus 64 decoded tokens stay below it. A sequence
    # that crosses it is another model in transformers' full forward (long factors at every position) than in its
    # cached decode (short factors kept for the cached keys); the graph follows the cached decode
    Family("phi-3-mini-4k", "Phi3ForCausalLM", dict(SHAPE, max_position_embeddings=256,
                                                    original_max_position_embeddings=256, sliding_window=4,
                                                    tie_word_embeddings=False),
           "sliding window (2047, shrunk to 4) on every layer, plain rope", "microsoft/Phi-3-mini-4k-instruct"),
    Family("phi-3.5-short", "Phi3ForCausalLM", dict(SHAPE, max_position_embeddings=2048,
                                                    original_max_position_embeddings=512, rope_parameters={
        "rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0 + 0.05 * i for i in range(8)],
        "long_factor": [1.0 + 0.6 * i for i in range(8)]}, tie_word_embeddings=False),
           "LongRoPE, short regime (prompt + continuation within original 4096, shrunk to 512)",
           "microsoft/Phi-3.5-mini-instruct", prompts=SHORT_PROMPTS),

    Family("phi-3.5-long", "Phi3ForCausalLM", dict(SHAPE, original_max_position_embeddings=16, rope_parameters={
        "rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0 + 0.05 * i for i in range(8)],
        "long_factor": [1.0 + 0.6 * i for i in range(8)]}, tie_word_embeddings=False),
           "LongRoPE, long regime (prompt longer than original 4096, shrunk to 16)", "microsoft/Phi-3.5-mini-instruct"),
    # head_dim 64 (hidden 256): rotary 48, a half of 24, a multiple of 8 as ONNX Runtime's kernel needs (Phi-4: 96)
    Family("phi-4-mini", "Phi3ForCausalLM", dict(SHAPE, hidden_size=256, original_max_position_embeddings=16,
                                                 partial_rotary_factor=0.75,
                                                 rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                                                  "short_factor": [1.0 + 0.05 * i for i in range(24)],
                                                                  "long_factor": [1.0 + 0.6 * i for i in range(24)]},
                                                 tie_word_embeddings=True),
           "LongRoPE long regime, partial rotary 0.75, tied", "microsoft/Phi-4-mini-instruct"),
    Family("gemma", "GemmaForCausalLM", dict(SHAPE, num_key_value_heads=1, head_dim=32),
           "one KV head, head_dim 32 != hidden/heads", "google/gemma-2b (1 KV head, head_dim 256)"),
    Family("gemma-2", "Gemma2ForCausalLM", dict(SHAPE, head_dim=16, hidden_size=96, query_pre_attn_scalar=24,
                                                attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                                                sliding_window=4),
           "attention and final-logit soft-capping, query_pre_attn_scalar = hidden/heads != head_dim, alternating "
           "sliding (window shrunk to 4) / global layers", "google/gemma-2-27b-it"),
    Family("gemma-3", "Gemma3ForCausalLM", dict(SHAPE, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32,
                                                sliding_window=4, layer_types=["sliding_attention", "full_attention"],
                                                rope_parameters={
                                                    "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                                                    "sliding_attention": {"rope_type": "default",
                                                                          "rope_theta": 10000.0}}),
           "qk-norm, one KV head, local/global layers with their own rope bases (window shrunk to 4)",
           "google/gemma-3-1b-it",
           backends=("torch-dynamo",), refused=("genai-builder",)),
    Family("granite-3", "GraniteForCausalLM", dict(SHAPE, embedding_multiplier=12.0, residual_multiplier=0.22,
                                                   attention_multiplier=0.015625, logits_scaling=8.0,
                                                   tie_word_embeddings=True),
           "embedding, residual and attention multipliers, logits scaling", "ibm-granite/granite-3.1-2b-instruct"),
    Family("olmo", "OlmoForCausalLM", dict(SHAPE, clip_qkv=None, tie_word_embeddings=False),
           "non-parametric layer norm", "allenai/OLMo-1B-hf",
           backends=("torch-dynamo",), refused=("genai-builder",)),
    Family("olmo-2", "Olmo2ForCausalLM", dict(SHAPE, tie_word_embeddings=False),
           "qk-norm over all heads, post-norm blocks", "allenai/OLMo-2-0425-1B-Instruct",
           backends=("torch-dynamo",)),
    # head_dim 80 as phi-2 has: ONNX Runtime's GroupQueryAttention takes head sizes that are multiples of 16, and
    # rotary halves that are multiples of 8 (80 x 0.4 = 32)
    Family("phi-2", "PhiForCausalLM", dict(hidden_size=320, intermediate_size=256, num_hidden_layers=2,
                                           num_attention_heads=4, max_position_embeddings=256,
                                           partial_rotary_factor=0.4, tie_word_embeddings=False),
           "partial rotary 0.4, parallel attention/MLP block, biases everywhere", "microsoft/phi-2",
           backends=("torch-dynamo",), refused=("genai-builder",)),
    Family("gpt-neox", "GPTNeoXForCausalLM", dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                                  num_attention_heads=4, max_position_embeddings=256, rotary_pct=0.25,
                                                  use_parallel_residual=True, tie_word_embeddings=False),
           "partial rotary 0.25, parallel residual", "EleutherAI/pythia-410m",
           backends=("torch-dynamo",)),
    Family("smollm3", "SmolLM3ForCausalLM", dict(SHAPE, num_hidden_layers=4, no_rope_layers=[1, 1, 1, 0],
                                                 tie_word_embeddings=True),
           "NoPE every 4th layer, tied", "HuggingFaceTB/SmolLM3-3B",
           backends=("torch-dynamo",), refused=("genai-builder",)),
]
BY_NAME = {f.name: f for f in FAMILIES}


def make_family(family: Family, path: Path, seed: int = 0) -> Path:
    """The family's tiny checkpoint (random weights, seeded, scale 0.08 so that logits are not all ~0)."""
    import torch
    import transformers as tf
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(EMBEDDED / "base"))
    model_cls = getattr(tf, family.arch)
    config = model_cls.config_class(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                    pad_token_id=tok.pad_token_id, **family.config)
    config.architectures = [family.arch]
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            elif "norm" in name or "ln" in name:
                p.normal_(1.0 if "weight" in name and "gemma" not in family.arch.lower() else 0.0, 0.1)
            else:
                p.normal_(0, 0.05)
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    if family.transformers4_json:
        _as_transformers4(path / "config.json")
    return path


def _as_transformers4(config_json: Path) -> None:
    cfg = json.loads(config_json.read_text())
    rope = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = rope.pop("rope_theta")
    rope["type"] = rope["rope_type"]
    cfg["rope_scaling"] = rope
    cfg["transformers_version"] = "4.46.0"
    config_json.write_text(json.dumps(cfg, indent=2))


def make_adapter(base: Path, path: Path, seed: int = 1) -> Path:
    """A PEFT adapter on every linear layer (``all-linear``), B drawn at random so that it changes the model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    torch.manual_seed(seed)
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.05)
    peft.save_pretrained(str(path))
    return path


def peft_model(base: Path, adapter: Path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32, attn_implementation="eager")
    return PeftModel.from_pretrained(model, str(adapter)).eval()


# --- the independent check ----------------------------------------------------------------------------------------

def _masks(lengths, width, side):
    cols = np.arange(width)[None]
    keep = cols < np.array(lengths)[:, None] if side == "right" else cols >= (width - np.array(lengths))[:, None]
    return keep.astype(np.int64)


class BareOrt:
    """model.onnx in a plain InferenceSession: the inputs io_spec names, padding on the side the graph takes
    (right for GroupQueryAttention, which reads each row's length from the mask; left otherwise)."""

    def __init__(self, export_dir: Path, head_dim: int):
        import onnx
        import onnxruntime as ort

        graph = onnx.load(str(export_dir / "model.onnx"), load_external_data=False).graph
        self.side = "right" if any(n.op_type == "GroupQueryAttention" for n in graph.node) else "left"
        self.session = ort.InferenceSession(str(export_dir / "model.onnx"), providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.kv = [n for n in self.inputs if n.startswith("past_key_values.")]
        key0 = self.inputs["past_key_values.0.key"]
        self.kv_heads = key0.shape[1]
        self.head_dim = key0.shape[3] if isinstance(key0.shape[3], int) else head_dim
        self.dtype = np.float16 if "float16" in key0.type else np.float32
        self.outputs = [o.name for o in self.session.get_outputs()]

    def run(self, ids, mask, past):
        feed = {"input_ids": ids, "attention_mask": mask}
        if "position_ids" in self.inputs:
            feed["position_ids"] = np.maximum(np.cumsum(mask, 1) - 1, 0)[:, -ids.shape[1]:]
        if past is None:
            past = {n: np.zeros((ids.shape[0], self.kv_heads, 0, self.head_dim), self.dtype) for n in self.kv}
        feed.update(past)
        out = dict(zip(self.outputs, self.session.run(None, feed)))
        present = {n: out[n.replace("past_key_values", "present")] for n in self.kv}
        return out["logits"].astype(np.float32), present


class BareTorch:
    side = "left"

    def __init__(self, model):
        self.model = model

    def run(self, ids, mask, past):
        import torch

        m = torch.from_numpy(mask)
        pos = (m.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
        with torch.no_grad():
            out = self.model(input_ids=torch.from_numpy(ids), attention_mask=m, position_ids=pos,
                             past_key_values=past, use_cache=True)
        return out.logits.float().numpy(), out.past_key_values


def decode(model, prompts, steps: int, forced=None):
    """Prompt pass on the padded batch, then ``steps - 1`` cached decode steps; each row's logits at its real
    positions, and its tokens (greedy, or ``forced``)."""
    lengths = [len(p) for p in prompts]
    mask = _masks(lengths, max(lengths), model.side)
    ids = np.zeros(mask.shape, np.int64)
    ids[mask.astype(bool)] = np.concatenate(prompts)
    logits, past = model.run(ids, mask, None)
    rows = [[logits[b][mask[b].astype(bool)]] for b in range(len(prompts))]
    tokens = [[] for _ in prompts]
    for i in range(steps):
        nxt = [int(np.argmax(r[-1][-1])) if forced is None else forced[b][i] for b, r in enumerate(rows)]
        for b, t in enumerate(nxt):
            tokens[b].append(t)
        if i == steps - 1:
            break
        lengths = [n + 1 for n in lengths]
        mask = _masks(lengths, mask.shape[1] + 1, model.side)
        logits, past = model.run(np.array(nxt, np.int64)[:, None], mask, past)
        for b, r in enumerate(rows):
            r.append(logits[b])
    return tokens, [np.concatenate(r) for r in rows]


def independent_check(export_dir: Path, base: Path, adapter: Path, prompts, steps: int = 16) -> dict:
    """The exported graph against PEFT's forward: the largest logit difference relative to the logits' largest
    magnitude over the prompt pass and ``steps - 1`` cached decode steps of the padded batch (teacher-forced on
    PEFT's tokens), and whether a 32-token greedy continuation of each prompt is identical."""
    reference = BareTorch(peft_model(base, adapter))
    cfg = json.loads((base / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    graph = BareOrt(export_dir, head_dim)
    ref_tokens, ref_logits = decode(reference, prompts, steps)
    _, our_logits = decode(graph, prompts, steps, forced=ref_tokens)
    scale = max(float(np.abs(r).max()) for r in ref_logits)
    rel = max(float(np.abs(r - o).max()) for r, o in zip(ref_logits, our_logits)) / scale
    greedy_same = all(decode(reference, [p], 32)[0] == decode(graph, [p], 32)[0] for p in prompts)
    return {"max_rel_diff": rel, "greedy_identical": greedy_same, "padding": graph.side}
