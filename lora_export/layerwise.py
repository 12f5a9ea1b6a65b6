"""A transformers model whose weights stay on disk until its forward reaches them: one decoder layer in memory.

Parity's PyTorch models (the adapted model as trained, the merged model, the unadapted base) are fp32: at 8B each is
32 GB, more than many machines that export have. Here the model is built on the meta device from its config, with
its buffers real (those the checkpoint holds, such as Gemma 4's trained per-layer scalars, loaded from it); PEFT's
adapters, small, are attached and loaded for real; and each *unit* (a decoder layer, and every module holding weights
outside one, or the outermost PEFT wrapper around it: the embedding, the final norm, lm_head) reads its tensors from the
checkpoint's safetensors when its forward starts and drops them when it ends. The forward itself is transformers'
own, so every family's quirks (scaled embeddings, soft-capping, sliding windows, multipliers) are what they are in
the whole model, and the logits are the whole model's bit for bit (tests/test_layerwise.py).

A forward reads the whole checkpoint once, whatever its batch: callers give it every sequence in one batch
(``TorchCausalLM.rows_per_pass``) rather than one sequence at a time.

Written by hand because accelerate's disk offload (``device_map`` with an offload folder) first writes every weight
again as fp32 numpy files (32 GB more disk at 8B) and keeps its hooks' copies of weights it has moved, and
``from_pretrained`` has no mode that reads a layer at its forward and forgets it after.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .errors import BadInput

FIX = "save the model again with save_pretrained (safetensors), every weight its config names in it"


def checkpoint_index(path: Path) -> dict:
    """``checkpoint.tensor_index``, or empty when the folder has no readable safetensors (the builder then reads it
    its own way)."""
    from .checkpoint import shard_files, tensor_index

    try:
        shards = shard_files(path)
    except Exception:  # no safetensors here
        return {}
    return tensor_index(path, shards)


def auto_dtype(config, files: dict):
    """``from_pretrained``'s default dtype ("auto"): the config's, else the checkpoint's first floating tensor's."""
    import torch

    from .tensorfile import DTYPES

    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        return getattr(torch, dtype)
    floats = (getattr(torch, DTYPES[e.dtype]) for _, e in files.values() if e.dtype in ("F32", "F16", "BF16", "F64"))
    return next(floats, torch.float32)


def meta_model(cls, path: Path, config, dtype, strict: bool = True):
    """``cls`` built from ``config`` on the meta device (buffers real) in ``dtype``, with ``.checkpoint_keys``:
    parameter name -> (file, header entry) of ``path``'s checkpoint. A string says why it cannot be. ``strict``:
    also refuse checkpoint tensors the model does not name (``from_pretrained`` skips them: an old checkpoint's rotary
    ``inv_freq``, a tied model's saved lm_head)."""
    from accelerate import init_empty_weights

    files = checkpoint_index(path)
    if not files:
        return "no safetensors checkpoint"
    with init_empty_weights(include_buffers=False):
        model = cls._from_config(config, dtype=dtype)
    model.tie_weights()
    model.eval()
    by_param: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_param.setdefault(id(p), []).append(name)
    keys = {}
    for names in by_param.values():
        found = next((n for n in names if n in files), None)
        if found is None:
            return f"the checkpoint has no tensor for {names[0]}"
        keys.update({n: files[found] for n in names})
    buffers = _load_buffers(model, files)  # persistent buffers the checkpoint holds, as from_pretrained loads them
    unused = sorted(set(files) - {e.name for _, e in keys.values()} - buffers)
    if unused and strict:
        return f"the checkpoint holds {len(unused)} tensors the model does not name as parameters ({unused[0]})"
    if any(b.device.type == "meta" for b in model.buffers()):
        return "a buffer was left on the meta device"
    model.checkpoint_keys = keys
    model.checkpoint_files = len({f for f, _ in files.values()})
    return model


def _load_buffers(model, files: dict) -> set[str]:
    """Copy each buffer the checkpoint holds into the model (a trained per-layer scalar, say); return their names."""
    from .tensorfile import read_tensor

    loaded = set()
    for name, buf in model.named_buffers():
        if name in files and buf is not None:
            file, entry = files[name]
            with open(file, "rb") as f:
                t = read_tensor(f, entry)
            owner, _, bname = name.rpartition(".")
            model.get_submodule(owner)._buffers[bname] = t.to(buf.dtype) if t.is_floating_point() else t
            loaded.add(name)
    return loaded


def read_into(module, sources: dict, rounding: tuple[frozenset, object] | None = None) -> None:
    """Give each of ``module``'s meta parameters named in ``sources`` ((submodule, parameter name) -> (file, entry))
    its tensor, read with a plain read (a memory map would keep every page read in RSS), in the parameter's dtype.
    ``rounding``: (checkpoint tensor names, Nf4Settings): those tensors go through ``nf4math.round_trip`` as read, the
    base as a QLoRA adapter was trained against (what ``merge`` writes as the base as trained, bit for bit)."""
    import torch

    from .tensorfile import read_tensor

    for sub in module.modules():
        for pname, p in list(sub._parameters.items()):
            where = sources.get((sub, pname))
            if where is None or p is None or p.device.type != "meta":
                continue
            with open(where[0], "rb") as f:
                t = read_tensor(f, where[1]).to(p.dtype)
            if rounding is not None and where[1].name in rounding[0]:
                from .nf4math import round_trip

                t = round_trip(t, rounding[1])
            sub._parameters[pname] = torch.nn.Parameter(t, requires_grad=False)


def drop(module, sources: dict) -> None:
    """Put each of ``module``'s parameters named in ``sources`` back on the meta device."""
    import torch

    for sub in module.modules():
        for pname, p in list(sub._parameters.items()):
            if (sub, pname) in sources and p is not None and p.device.type != "meta":
                sub._parameters[pname] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                                            requires_grad=False)


def _layers(model, count: int):
    """The decoder layers: the ModuleList of ``num_hidden_layers`` modules."""
    import torch

    return next((m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == count), None)


def load(checkpoint: Path, adapters: Sequence = (), weights: Sequence[float] | None = None, rounding=None):
    """The fp32 model of ``checkpoint`` (with ``adapters`` attached through PEFT, unmerged, as
    ``adapters.attach`` does), reading each unit's weights at its forward. Raises BadInput where it cannot.
    ``rounding``: (module names, Nf4Settings), ``quantized_base.quantization_of``: each of those modules' weight is
    dequant(NF4(W)) as read, the base as trained computed from the base itself (no fp32 copy of it on disk)."""
    import torch
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig

    config = AutoConfig.from_pretrained(str(checkpoint), trust_remote_code=False)
    model = meta_model(MODEL_FOR_CAUSAL_LM_MAPPING[type(config)], Path(checkpoint), config, torch.float32, strict=False)
    if isinstance(model, str):
        raise BadInput.one(str(checkpoint), f"parity cannot read this checkpoint a layer at a time: {model}", FIX)
    keys = model.checkpoint_keys
    rounded = None
    if rounding is not None:
        missing = [m for m in rounding[0] if f"{m}.weight" not in keys]
        if missing:
            raise BadInput.one(str(checkpoint), f"has no weight for the 4-bit module {missing[0]} the adapter was "
                               "trained against", "export with the base the adapter was trained on")
        rounded = (frozenset(keys[f"{m}.weight"][1].name for m in rounding[0]), rounding[1])
    named = dict(model.named_parameters(remove_duplicate=False))
    by_id = {id(named[n]): where for n, where in keys.items()}  # PEFT keeps the base's parameter objects
    if adapters:
        from .adapters import attach

        model = _attach_on_meta(model, list(adapters), weights, attach)
    sources = {(sub, pname): by_id[id(p)] for sub in model.modules() for pname, p in sub._parameters.items()
               if p is not None and id(p) in by_id}
    left = [n for n, p in model.named_parameters() if p.device.type == "meta" and id(p) not in by_id]
    if left:
        raise BadInput.one(str(checkpoint), f"{len(left)} parameters have no tensor to read ({left[0]})", FIX)
    layers = _layers(model, config.get_text_config().num_hidden_layers)
    inside = set() if layers is None else {m for layer in layers for m in layer.modules()}
    outside = [m for m in model.modules() if m not in inside and any((m, n) in sources for n in m._parameters)]
    units = list(layers or []) + list(dict.fromkeys(_outermost_wrapper(model, m) for m in outside))
    for unit in units:
        unit.register_forward_pre_hook(lambda m, _args: read_into(m, sources, rounded))
        unit.register_forward_hook(lambda m, _args, _out: drop(m, sources))
    model.layerwise_units = len(units)
    return model.eval()


def _outermost_wrapper(model, module):
    """``module``, or the outermost PEFT layer wrapping it (lora.Linear, ModulesToSaveWrapper...): a wrapper's forward
    may read its base layer's weight outside the base layer's own forward (DoRA's weight norm on lm_head)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    parents = {child: parent for parent in model.modules() for child in parent.children()}
    unit = module
    while unit in parents and isinstance(parents[unit], (BaseTunerLayer, AuxiliaryTrainingWrapper)):
        unit = parents[unit]
    return unit


def _attach_on_meta(model, adapters: list, weights, attach):
    """PEFT's adapters on a meta base: PEFT puts each adapter's new modules on its base layer's device, where loading
    them is a no-op, so they are made real (zeros) and the adapters' saved weights loaded again into them. An adapter
    that also saved base weights (``save_embedding_layers``) overwrites them: those are made real too, from the
    adapter, and not read from the checkpoint. PEFT's report of keys it did not load is checked."""
    import re
    import warnings

    import torch
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    base_ids = {id(p) for p in model.parameters()}
    with warnings.catch_warnings():  # "copying ... to a meta parameter ... is a no-op": the loading below does it
        warnings.filterwarnings("ignore", message=".*meta parameter.*")
        peft_model, names = attach(model, adapters, weights)

    def make_real(sub, pname, p):
        sub._parameters[pname] = torch.nn.Parameter(torch.zeros(p.shape, dtype=p.dtype), requires_grad=False)

    for sub in peft_model.modules():
        for pname, p in list(sub._parameters.items()):
            if p is not None and p.device.type == "meta" and id(p) not in base_ids:
                make_real(sub, pname, p)
    modules = dict(peft_model.named_modules())
    for name, adapter in zip(names, adapters):
        saved = load_peft_weights(str(adapter.path), device="cpu")
        for _ in range(2):  # the second time with the base weights the adapter overwrites made real
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                result = set_peft_model_state_dict(peft_model, saved, adapter_name=name)
            skipped = [m.group(1) for w in caught
                       if (m := re.search(r"for (\S+): copying from a non-meta parameter", str(w.message)))]
            if not skipped:
                break
            for full in skipped:
                owner, _, pname = full.rpartition(".")
                shared = modules[owner]._parameters[pname]
                make_real(modules[owner], pname, shared)
                for sub in peft_model.modules():  # a tied twin (lm_head of a tied embedding) takes the same tensor
                    for other, p in list(sub._parameters.items()):
                        if p is shared:
                            sub._parameters[other] = modules[owner]._parameters[pname]
        else:
            raise BadInput.one(str(adapter.path), f"PEFT did not load {len(skipped)} saved tensors ({skipped[0]})",
                               "save the adapter again with PEFT's save_pretrained")
        unexpected = [k for k in getattr(result, "unexpected_keys", []) or [] if "lora" in k or "modules_to_save" in k]
        if unexpected:
            raise BadInput.one(str(adapter.path), f"PEFT did not load {len(unexpected)} saved tensors "
                               f"({unexpected[0]})", "save the adapter again with PEFT's save_pretrained")
    return peft_model
