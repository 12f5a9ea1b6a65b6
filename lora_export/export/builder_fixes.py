"""Where onnxruntime-genai's builder (0.18) reads a config differently from transformers, and how we make its graph
the model transformers runs (the reference). Each fix has a test in tests/test_families.py that builds the family
without it and shows the graph wrong, so a builder upgrade that mends (or breaks) one shows there.

1. Sliding windows without ``layer_types`` (Mistral, Phi-3): transformers applies ``sliding_window`` to every
   layer; the builder windows only layers that ``layer_types`` marks "sliding_attention" and leaves the rest full,
   so a prompt longer than the window gets another attention. Fix: the builder reads a config that says so.
2. Linear and YaRN rope scaling: the builder's Llama class drops linear scaling; its YaRN divides by zero without
   ``beta_fast``/``beta_slow`` (Qwen2.5's long-context setting names neither; transformers defaults them to 32
   and 1), asserts on small head sizes, and does not round its ramp's ends (``truncate``) as transformers does.
   Fix: the builder
   reads plain rope (same theta) and builds its graph; then its two rotary caches (``cos_cache``/``sin_cache``)
   are recomputed from transformers' own ``ROPE_INIT_FUNCTIONS``, in float32 as transformers does.
3. LongRoPE written as transformers 5 writes it (``rope_parameters`` without ``type``): the builder's Phi-3
   classes read only ``type`` and stop with a KeyError. Fix: the builder reads ``type`` too.

4. Gemma's embedding scale: the builder multiplies the embeddings by sqrt(hidden_size) rounded to 2 decimals
   (9.8 for 9.798 at hidden 96; 59.87 for Gemma-2 9B's 59.866), transformers by sqrt(hidden_size) itself, a
   2e-4 relative difference at hidden 96 that the fp32 gate FAILs. Fix: the constant is set to transformers'
   value after the build.
5. (In genai_builder.BUILDER_OPTIONS) ``windowed_kv_cache=false``: sliding layers keep the whole past in their
   cache, as io_spec's contract says, instead of a ring that needs a preallocated past.

This is written here because no library does it: the builder has no option for any of 1-4, and optimum's
exporters do not build the fused graph.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..families import rope_settings

#: model types whose transformers attention slides over every layer when ``sliding_window`` is set
SLIDE_EVERY_LAYER = ("mistral", "phi3")
#: rope types whose caches the builder computes differently from transformers (single-cache models only)
RECOMPUTED_ROPE = ("linear", "yarn")
#: the keys of linear and YaRN scaling (transformers' names), dropped when the builder is given plain rope
SCALING_KEYS = ("type", "rope_type", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
                "attention_factor", "mscale", "mscale_all_dim", "truncate")


def config_fixes(config: dict) -> dict:
    """The config.json entries the builder must read to build transformers' model ({} when none)."""
    fixes = {}
    layers = config.get("num_hidden_layers")
    if config.get("model_type") in SLIDE_EVERY_LAYER and config.get("sliding_window") and isinstance(layers, int):
        # whatever layer_types says: transformers' Mistral and Phi-3 attention slide every layer by sliding_window
        fixes["layer_types"] = ["sliding_attention"] * layers
    rope, kind = rope_settings(config)
    if kind == "longrope" and "type" not in rope:  # the builder's Phi-3 classes read transformers 4's key only
        fixes["rope_parameters" if "rope_parameters" in config else "rope_scaling"] = {**rope, "type": "longrope"}
    if kind in RECOMPUTED_ROPE:  # plain rope for the builder, the same base; the caches are recomputed after
        theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
        # what is not the scaling stays (partial_rotary_factor, mrope_section, ...)
        kept = {k: v for k, v in rope.items() if k not in SCALING_KEYS}
        fixes["rope_parameters"] = {**kept, "rope_type": "default", "rope_theta": theta}
        fixes["rope_scaling"] = None  # None: the entry is removed (transformers 4's name for the same settings)
        fixes["rope_theta"] = theta
    return fixes


def builder_input(checkpoint: Path, config: dict, scratch: Path) -> Path:
    """``checkpoint`` (whose config.json is ``config``) itself, or a view of it under ``scratch`` (links to its
    files, a fixed config.json): the user's checkpoint is never written to."""
    fixes = config_fixes(config)
    if not fixes:
        return checkpoint
    scratch.mkdir(parents=True, exist_ok=True)
    for entry in checkpoint.iterdir():
        if entry.name != "config.json":
            os.symlink(entry.resolve(), scratch / entry.name)
    fixed = {k: v for k, v in {**config, **fixes}.items() if not (k in fixes and fixes[k] is None)}
    (scratch / "config.json").write_text(json.dumps(fixed, indent=2))
    return scratch


def needs_rope_caches(config: dict) -> bool:
    return rope_settings(config)[1] in RECOMPUTED_ROPE


def recompute_rope_caches(checkpoint: Path, model_path: Path, progress=None) -> int:
    """Overwrite ``cos_cache``/``sin_cache`` in the builder's graph with transformers' values; the number of
    caches written (0 when the graph has no such initializers). The new values are stored in model.onnx itself,
    so the (possibly large) external data file is not rewritten. Runs in a child process (it imports torch)."""
    import onnx
    import torch
    from onnx import numpy_helper
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = AutoConfig.from_pretrained(str(checkpoint), trust_remote_code=False).get_text_config()
    kind = rope_settings(config.to_dict())[1]
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[kind](config, torch.device("cpu"))
    model = onnx.load(str(model_path), load_external_data=False)
    written = 0
    for i, tensor in enumerate(model.graph.initializer):
        if tensor.name not in ("cos_cache", "sin_cache"):
            continue
        length, half = tensor.dims
        if half != inv_freq.shape[0]:
            raise ValueError(f"{tensor.name} in {model_path} has {half} frequencies, transformers' {kind} rope "
                             f"{inv_freq.shape[0]}")
        # as transformers' rotary embedding: float32 positions times float32 frequencies, then cos/sin, then scaled
        freqs = torch.arange(length, dtype=torch.float32)[:, None] * inv_freq.float()[None, :]
        values = (freqs.cos() if tensor.name == "cos_cache" else freqs.sin()) * scaling
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        model.graph.initializer[i].CopyFrom(numpy_helper.from_array(values.numpy().astype(dtype), tensor.name))
        written += 1
    if written:
        _save_graph(model, model_path)
    return written


#: model types whose builder class scales the embeddings by a rounded sqrt(hidden_size) (GemmaModel and subclasses)
ROUNDED_EMBED_SCALE = ("gemma", "gemma2", "gemma3_text")


def fix_embedding_scale(config: dict, model_path: Path) -> bool:
    """Set the embedding Mul's constant to sqrt(hidden_size) in float32, as transformers' Gemma computes it; True
    when a constant was changed. Only the graph file is rewritten."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    if config.get("model_type") not in ROUNDED_EMBED_SCALE:
        return False
    model = onnx.load(str(model_path), load_external_data=False)
    mul = next((n for n in model.graph.node if n.op_type == "Mul" and n.name == "/model/embed_tokens/Mul"), None)
    const = next((n for n in model.graph.node if mul is not None and n.op_type == "Constant"
                  and n.output[0] in mul.input), None)
    if const is None:
        return False
    value = const.attribute[0].t
    exact = np.asarray(np.float32(config["hidden_size"] ** 0.5)).astype(onnx.helper.tensor_dtype_to_np_dtype(
        value.data_type))
    const.attribute[0].t.CopyFrom(numpy_helper.from_array(exact, value.name))
    _save_graph(model, model_path)
    return True


def _save_graph(model, model_path: Path) -> None:
    """The graph alone (read without its data: external references stay as they are), renamed into place."""
    import onnx

    tmp = model_path.with_name(model_path.name + ".tmp")
    onnx.save_model(model, str(tmp))
    os.replace(tmp, model_path)
