"""onnxruntime-genai's builder, fed one layer at a time: the same graph, without the whole model in memory.

The builder (0.18) loads the transformers model whole (``from_pretrained``), makes every node with its weight as a
lazy cast of that model's tensor, and for int4/int8 then turns the *whole* graph into one ModelProto, fp32 weights
and all, and quantizes it (``Model.to_nbits``). Measured on Llama-3.1-8B widths cut to 2 layers: the builder alone
peaked at 2.5-3.7x the fp32 weight bytes; at 8B that is 80+ GB. It has no option to stream.

Run as ``python -m lora_export.export.builder_stream <the builder's own arguments>``, this module runs the builder's
own ``__main__`` with three changes, and nothing else of it:

1. ``from_pretrained`` (inside the builder's ``make_model``) returns the model on the meta device, built from its
   config, in the dtype ``from_pretrained`` would use; no weight is read.
2. The builder walks that model (``make_model``: ``for module in model.modules()``). Just before it reaches a unit
   (the embedding, each decoder layer, the final norm, lm_head: every module holding weights outside a decoder
   layer), that unit's tensors are read from the checkpoint's safetensors; when the builder has made the unit's
   nodes, each new MatMul the target quantizes is quantized at once by the builder's own ``to_nbits`` on a graph of
   that one node (same quantizer, options, per-node bits and exclusions), the unit's other weights are cast as the
   builder casts them, and the unit's tensors are dropped.
3. ``to_nbits`` at save time quantizes only what is left (nothing, for the families tested here) and returns the
   graph.

So the process holds the finished graph plus one unit (at Llama-3.1-8B's widths a layer adds 146 MB to the peak, the
int4 bytes it keeps; the embedding kept in fp32 and lm_head's quantization take the rest). The
graph is the builder's, node for node and byte for byte (tests/test_builder_stream.py builds both on the same
checkpoints and compares them). Where the model is not one this can stream (a checkpoint key the model does not
name, a parameter the checkpoint lacks, a family whose builder class walks the model its own way), the builder
runs as it is and says so in its log.

Written by hand because neither the builder nor accelerate does this: the builder reads ``torch.nn.Module``s, and
accelerate's offloading hooks only act when a module's forward runs, which the builder never calls.
"""

from __future__ import annotations

import gc
import runpy
import sys
from pathlib import Path

STREAMED = "lora-export: streaming the builder's input one layer at a time"
NOT_STREAMED = "lora-export: the builder loads the whole model"

_state: dict = {"builder": None}
# from_pretrained's arguments the builder passes (and the auto class adds) that change nothing here
ACCEPTED = {"cache_dir", "token", "trust_remote_code", "config", "_from_auto", "_commit_hash", "adapter_kwargs",
            "force_download", "local_files_only", "proxies"}


def main(argv: list[str]) -> None:
    import onnxruntime_genai.models  # noqa: F401  (puts the builder's folder on sys.path, as it imports itself)
    from builders import base as builder_base  # the module object the builder's __main__ uses
    from transformers import PreTrainedModel

    original_from_pretrained = PreTrainedModel.from_pretrained.__func__
    original_make_model = builder_base.Model.make_model
    original_to_nbits = builder_base.Model.to_nbits

    def make_model(self, input_path, *args, **kwargs):
        _state["builder"] = self
        try:
            return original_make_model(self, input_path, *args, **kwargs)
        finally:
            _state["builder"] = None

    def from_pretrained(cls, path, *args, **kwargs):
        builder = _state["builder"]
        why = _why_not(builder, path, args, kwargs)
        model = None if why else _meta_model(cls, Path(path), kwargs)
        if isinstance(model, str):
            why, model = model, None
        if model is None:
            print(f"{NOT_STREAMED}: {why}", flush=True)
            return original_from_pretrained(cls, path, *args, **kwargs)
        print(f"{STREAMED} ({model.checkpoint_files} safetensors files)", flush=True)
        _stream_units(builder, model, original_to_nbits)
        return model

    def to_nbits(self):
        if not getattr(self, "_lora_export_streamed", False):
            return original_to_nbits(self)
        _quantize_nodes(self, [n for n in self.model.graph if _quantizable(self, n)], original_to_nbits)
        return self.model

    builder_base.Model.make_model = make_model
    builder_base.Model.to_nbits = to_nbits
    PreTrainedModel.from_pretrained = classmethod(from_pretrained)
    sys.argv = ["onnxruntime_genai.models.builder", *argv]
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=True)


def _why_not(builder, path, args, kwargs) -> str | None:
    """Why this load is not streamed (None: it is)."""
    if builder is None:
        return "the builder's class reads its model outside Model.make_model"
    if "adapter_path" in builder.extra_options:
        return "a LoRA adapter is attached through PEFT"
    if getattr(builder, "quant_type", None) is not None:
        return "a pre-quantized checkpoint"
    if getattr(builder, "exact_quant_override_names", None):
        return "exact quantization overrides name nodes across the whole graph"
    odd = {k for k in set(kwargs) - ACCEPTED
           if not (k == "subfolder" and not kwargs[k]) and not (k == "revision" and kwargs[k] in (None, "main"))}
    if args or odd:
        return f"from_pretrained was asked for {sorted(odd) or 'positional arguments'}"
    if not Path(path).is_dir():
        return f"{path} is not a local folder"
    return None


def _meta_model(cls, path: Path, kwargs: dict):
    """The model ``from_pretrained`` would return, on the meta device (buffers real), in from_pretrained's own dtype,
    with ``.checkpoint_keys`` (``layerwise.meta_model``). A string says why not."""
    from transformers import AutoConfig

    from ..layerwise import auto_dtype, checkpoint_index, meta_model

    files = checkpoint_index(path)
    if not files:
        return "no safetensors checkpoint"
    config = kwargs.get("config") or AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    return meta_model(cls, path, config, auto_dtype(config, files))


def _stream_units(builder, model, original_to_nbits) -> None:
    """Replace ``model.modules`` by a walk that loads each unit before the builder reaches it, and after the builder
    has made its nodes quantizes them, settles its lazy casts and drops its tensors."""
    import torch

    from ..layerwise import drop, read_into

    walk = torch.nn.Module.modules
    builder._lora_export_streamed = True
    names = {m: n for n, m in model.named_modules(remove_duplicate=False)}

    def units_of(module) -> bool:
        if module not in names:  # made by the builder inside the unit it is making (Phi-3's q/k/v split of qkv_proj)
            return False
        return builder.is_layer(module) or (any(True for _ in module.parameters(recurse=False)) and
                                            not any(builder.is_layer(m) for m in _ancestors(model, names, module)))

    sources = {(sub, pname): model.checkpoint_keys[f"{name}.{pname}" if name else pname]
               for name, sub in model.named_modules(remove_duplicate=False) for pname in sub._parameters
               if sub._parameters[pname] is not None}

    def load(module) -> None:
        read_into(module, sources)

    def unload(module) -> None:  # every weight in the unit, also those of modules the builder made in it (Phi-3's q/k/v)
        drop(module, {(sub, pname): None for sub in module.modules() for pname in sub._parameters})

    def streaming_modules(self=None):
        pending = None  # (unit, the graph's nodes before the builder made the unit's)
        for module in walk(model):
            if units_of(module):
                if pending is not None:
                    _settle(builder, pending, original_to_nbits, unload)
                load(module)
                pending = (module, set(builder.model.graph))
            yield module
        if pending is not None:
            _settle(builder, pending, original_to_nbits, unload)

    object.__setattr__(model, "modules", streaming_modules)


def _ancestors(model, names: dict, module) -> list:
    name = names[module]
    parts = name.split(".") if name else []
    found, current = [], model
    for part in parts[:-1]:
        current = getattr(current, part)
        found.append(current)
    return found


def _settle(builder, pending, original_to_nbits, unload) -> None:
    """After the builder made a unit's nodes: quantize its MatMuls now, evaluate every lazy cast still holding one
    of the unit's tensors, then drop them."""
    import onnx_ir as ir

    unit, before = pending
    new = [n for n in builder.model.graph if n not in before]
    _quantize_nodes(builder, [n for n in new if _quantizable(builder, n)], original_to_nbits)
    for value in builder.model.graph.initializers.values():
        if isinstance(value.const_value, ir.LazyTensor):
            value.const_value = value.const_value._evaluate()
    unload(unit)
    gc.collect()  # the replaced nodes and values refer to each other: only the cycle collector frees their weights


def _quantizes(builder) -> bool:
    import onnx_ir as ir

    return (builder.onnx_dtype in {ir.DataType.INT4, ir.DataType.UINT4, ir.DataType.INT8, ir.DataType.UINT8}
            and not (builder.quant_type is not None and builder.quant_attrs["use_qdq"]))


def _quantizable(builder, node) -> bool:
    """A node the builder's ``to_nbits`` would quantize: a quantized target, an op type it quantizes, a constant
    weight (MatMul: input 1; Gather: input 0)."""
    if not _quantizes(builder) or node.op_type not in builder.quant_attrs["op_types_to_quantize"] or node.domain:
        return False
    index = 0 if node.op_type == "Gather" else 1
    return len(node.inputs) > index and node.inputs[index] is not None and node.inputs[index].const_value is not None


def _quantize_nodes(builder, nodes, original_to_nbits) -> None:
    """Each node through the builder's own ``to_nbits`` on a model holding that node alone, spliced back in place."""
    for node in nodes:
        sub = _one_node_model(builder, node)
        whole = builder.model
        builder.model = sub
        try:
            quantized = original_to_nbits(builder)
        finally:
            builder.model = whole
        if [q.op_type for q in quantized.graph] == [node.op_type]:
            continue  # the quantizer left it as it was (a node the options exclude, such as an unquantized lm_head)
        _splice(whole, node, quantized)


def _one_node_model(builder, node):
    """An ir.Model with ``node``'s copy, its constant inputs as initializers, the rest as graph inputs."""
    import onnx_ir as ir

    inputs, initializers, values = [], [], []
    for v in node.inputs:
        if v is None:
            values.append(None)
            continue
        copy = ir.Value(name=v.name, type=v.type, shape=v.shape)
        if v.const_value is not None:
            tensor = v.const_value
            if isinstance(tensor, ir.LazyTensor):
                tensor = tensor._evaluate()
            copy.const_value = tensor
            initializers.append(copy)
        else:
            inputs.append(copy)
        values.append(copy)
    copy = ir.Node(node.domain, node.op_type, values, attributes=list(node.attributes.values()),
                   num_outputs=len(node.outputs), name=node.name)
    for old, new in zip(node.outputs, copy.outputs):
        new.name, new.type, new.shape = old.name, old.type, old.shape
    graph = ir.Graph(inputs, list(copy.outputs), nodes=[copy], initializers=initializers,
                     opset_imports=dict(builder.model.opset_imports))
    return ir.Model(graph, ir_version=builder.model.ir_version)


def _splice(whole, node, quantized) -> None:
    """Put ``quantized``'s nodes (the one-node model after quantization) in ``node``'s place in ``whole``."""
    import numpy as np
    import onnx_ir as ir

    graph = whole.graph
    by_name = {v.name: v for v in node.inputs if v is not None}
    mapping = {}
    for v in quantized.graph.inputs:
        mapping[v.name] = by_name[v.name]
    for name, v in quantized.graph.initializers.items():
        if name in by_name and by_name[name].const_value is not None and by_name[name].const_value is v.const_value:
            mapping[name] = by_name[name]  # an input left as it was (a bias)
            continue
        # a copy of the bytes, so that nothing in the graph refers into the quantizer's ModelProto (which also holds
        # the float weight it quantized)
        data = ir.Tensor(np.array(v.const_value.numpy(), copy=True), dtype=v.const_value.dtype, name=name)
        new = ir.Value(name=name, type=v.type, shape=v.shape, const_value=data)
        mapping[name] = new
    new_nodes = []
    outputs = {v.name for v in quantized.graph.outputs}
    for q in quantized.graph:
        ins = [None if v is None else mapping[v.name] for v in q.inputs]
        made = ir.Node(q.domain, q.op_type, ins, attributes=[ir.Attr(a.name, a.type, a.value)
                                                               for a in q.attributes.values()],
                       num_outputs=len(q.outputs), name=q.name, version=q.version)
        for old, new in zip(q.outputs, made.outputs):
            new.name, new.type, new.shape = old.name, old.type, old.shape
            mapping[old.name] = new
        new_nodes.append(made)
    for v in node.inputs:  # the float weight the quantized node replaces leaves the graph
        if v is not None and v.const_value is not None and v.name not in mapping and v.name in graph.initializers:
            if len(v.uses()) == 1:
                graph.initializers.pop(v.name)
                # and its tensor with it: the builder keeps every Value by name (Model.values), and this one's lazy
                # cast holds the layer's weight (measured: 0.44 GB a layer kept at 8B widths)
                v.const_value = None
    for name, v in mapping.items():
        if v.const_value is not None and v.name not in graph.initializers and name not in by_name:
            graph.register_initializer(v)
    old_outputs = list(node.outputs)
    new_outputs = [mapping[v.name] for v in old_outputs if v.name in outputs]
    ir.convenience.replace_nodes_and_values(graph, node, [node], new_nodes, old_outputs, new_outputs)
    for domain, version in quantized.opset_imports.items():
        whole.opset_imports.setdefault(domain, version)


if __name__ == "__main__":
    main(sys.argv[1:])
