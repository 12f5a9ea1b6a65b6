"""LoRA weights as graph inputs, and the ``.onnx_adapter`` files that fill them.

The genai builder's side-path graph (``adapter_path``) has, for each adapted linear layer,
MatMul(x, lora_A) -> MatMul(., lora_B * scaling) -> Add, with the LoRA weights as initializers named
``model.layers.N.<block>.<module>.lora_A.MatMul.weight``. ``make_switchable`` turns each of them into a graph
input whose rank dimension is dynamic (Olive's ExtractAdapters does the same), and keeps an initializer of the
same name holding a rank-0 tensor as its overridable default: with no adapter active the side path adds nothing,
so the graph is the base. ``adapter_arrays`` computes one adapter's values for those inputs through PEFT (the
oracle for scaling: alpha/r, rsLoRA, rank_pattern/alpha_pattern); ``write_adapter`` stores them with ONNX
Runtime's own ``AdapterFormat``, which ``onnxruntime.LoraAdapter`` and onnxruntime-genai's ``Adapters`` load.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadInput

GRAPH_NAME = re.compile(r"^model\.layers\.(\d+)\.(?:\w+\.)*?(\w+)\.lora_([AB])\.MatMul\.weight$")
PEFT_MODULE = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:\w+\.)*?(\w+)$")
SUFFIX = ".onnx_adapter"
ADAPTER_VERSION = 1


@dataclass(frozen=True)
class LoraInput:
    """One LoRA weight input of the graph: lora_A is (in, rank), lora_B is (rank, out)."""

    name: str
    layer: int
    module: str  # the linear layer's own name: q_proj, down_proj, ...
    kind: str  # "A" or "B"
    fixed: int  # the dimension that is not the rank: in for A, out for B
    dtype: str  # numpy dtype name

    @property
    def key(self) -> tuple[int, str, str]:
        return self.layer, self.module, self.kind


def _parse(name: str):
    m = GRAPH_NAME.match(name)
    return (int(m.group(1)), m.group(2), m.group(3)) if m else None


def make_switchable(model_path: Path) -> tuple[LoraInput, ...]:
    """Rewrite ``model_path`` (and its external data) in place: every LoRA initializer becomes an input with a
    dynamic rank, defaulting to a rank-0 (no-op) initializer. Returns the inputs made."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model_path = Path(model_path)
    model = onnx.load(str(model_path), load_external_data=True)
    graph, made = model.graph, []
    for init in graph.initializer:
        parsed = _parse(init.name)
        if parsed is None:
            continue
        layer, module, kind = parsed
        rows, cols = init.dims
        fixed = rows if kind == "A" else cols
        np_dtype = helper.tensor_dtype_to_np_dtype(init.data_type)
        made.append(LoraInput(init.name, layer, module, kind, int(fixed), np.dtype(np_dtype).name))
        rank_dim = f"lora_rank_{layer}_{module}"
        shape = [fixed, rank_dim] if kind == "A" else [rank_dim, fixed]
        graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, shape))
        empty = np.zeros((fixed, 0) if kind == "A" else (0, fixed), np_dtype)
        init.CopyFrom(numpy_helper.from_array(empty, init.name))
    if not made:
        raise BadInput.one(str(model_path), "the graph has no LoRA side paths to turn into inputs",
                           "build it with the genai-builder backend and an adapter (adapter_path)")
    _rank_in_value_info(graph, {i.name: f"lora_rank_{i.layer}_{i.module}" for i in made if i.kind == "A"})
    if model.ir_version < 4:  # initializers are overridable defaults from IR 4 on
        model.ir_version = 4
    data = model_path.parent / (model_path.name + ".data")
    data.unlink(missing_ok=True)  # everything is in memory; onnx appends to an existing data file
    tmp = model_path.parent / (model_path.name + ".tmp")
    onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    os.replace(tmp, model_path)
    return tuple(made)


def _rank_in_value_info(graph, rank_of: dict[str, str]) -> None:
    """The builder records each x @ lora_A's shape with the build's rank as a fixed last dimension; ONNX Runtime
    trusts recorded shapes when it plans buffer reuse, so an adapter of another rank (or rank 0 beside a
    non-empty module) would fail to run. Make that dimension the input's symbolic rank."""
    rank_dim = {out: rank_of[name] for node in graph.node for name in node.input if name in rank_of
                for out in node.output}
    for info in graph.value_info:
        if info.name in rank_dim:
            last = info.type.tensor_type.shape.dim[-1]
            last.Clear()
            last.dim_param = rank_dim[info.name]


# The builder's names for the side-path MatMuls it can emit (Phi-3's packed qkv_proj/gate_up_proj are unpacked
# into these): /model/layers.N/BLOCK/MODULE/lora_A|B/MatMul
BUILDER_LORA_NODES = {"attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}


def builder_lora_nodes(num_layers: int) -> tuple[str, ...]:
    """Every LoRA MatMul node name the builder can emit for a model of ``num_layers`` layers: with int4 weights
    they are excluded from quantization, so the LoRA weights stay float and can become inputs."""
    return tuple(f"/model/layers.{n}/{block}/{module}/lora_{kind}/MatMul" for n in range(num_layers)
                 for block, modules in BUILDER_LORA_NODES.items() for module in modules for kind in "AB")


def quantized_lora_nodes(model_path: Path) -> list[str]:
    """Side-path nodes the builder quantized after all (their weights cannot be adapter inputs)."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    return [n.name for n in model.graph.node if "/lora_" in n.name and n.op_type != "MatMul"]


def lora_inputs(model_path: Path) -> tuple[LoraInput, ...]:
    """The LoRA inputs of a switchable graph, read from its inputs (the weights are not loaded)."""
    import numpy as np
    import onnx
    from onnx import helper

    model = onnx.load(str(model_path), load_external_data=False)
    found = []
    for inp in model.graph.input:
        parsed = _parse(inp.name)
        if parsed is None:
            continue
        layer, module, kind = parsed
        dims = inp.type.tensor_type.shape.dim
        fixed = dims[0].dim_value if kind == "A" else dims[1].dim_value
        dtype = helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)
        found.append(LoraInput(inp.name, layer, module, kind, int(fixed), np.dtype(dtype).name))
    return tuple(found)


def union_adapter(base: Path, adapters, out: Path) -> Path:
    """A PEFT adapter (rank 1, zero update) on the union of the adapters' target modules, for the builder's
    ``adapter_path``: the graph then has a LoRA side path (made an input by ``make_switchable``) for every module
    any of the adapters adapts. Written with PEFT's own ``save_pretrained``."""
    import torch
    from peft import LoraConfig, get_peft_model

    from ..base import load_fp32

    modules = sorted({m for a in adapters for m in a.targeted})
    model = get_peft_model(load_fp32(base), LoraConfig(r=1, lora_alpha=1, target_modules=modules))
    with torch.no_grad():  # the builder folds the weights in; make_switchable then replaces them with inputs
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.zero_()
    model.save_pretrained(str(out))
    return out


def adapter_arrays(base: Path, adapter, inputs: tuple[LoraInput, ...]) -> dict:
    """{input name: array} for one plain LoRA/rsLoRA adapter: A transposed, B times PEFT's scaling transposed.
    Inputs the adapter does not target get an empty (rank-0) tensor: that side path adds nothing, the graph
    computes W x there. Loads the base and adapter with PEFT (torch)."""
    import numpy as np
    import torch
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    from ..base import load_fp32

    model = PeftModel.from_pretrained(load_fp32(base), str(adapter.path), is_trainable=False).eval()
    wanted = {i.key: i for i in inputs}
    arrays, outside = {}, []
    with torch.no_grad():
        for name, module in model.named_modules():
            if not isinstance(module, LoraLayer) or "default" not in getattr(module, "lora_A", {}):
                continue
            m = PEFT_MODULE.search(name)
            key = (int(m.group(1)), m.group(2)) if m else None
            if key is None or (*key, "A") not in wanted:
                outside.append(name.removeprefix("base_model.model."))
                continue
            a = module.lora_A["default"].weight.float().T  # (in, r)
            b = (module.lora_B["default"].weight.float() * module.scaling["default"]).T  # (r, out)
            for kind, value in (("A", a), ("B", b)):
                target = wanted[(*key, kind)]
                arrays[target.name] = np.ascontiguousarray(value.numpy().astype(target.dtype))
    if outside:
        raise BadInput.one(str(adapter.path / "adapter_config.json"),
                           f"adapts {len(outside)} module(s) the switchable graph has no LoRA input for "
                           f"({', '.join(outside[:3])}{' ...' if len(outside) > 3 else ''}): the graph was built "
                           "on the union of its first adapters' target modules, which does not include these",
                           "make a new export with --switchable that passes this adapter together with the others "
                           "(the graph then covers every adapter's modules), or export it merged on its own")
    for i in inputs:
        if i.name not in arrays:  # a module this adapter leaves alone: rank 0, the side path adds nothing
            arrays[i.name] = np.zeros((i.fixed, 0) if i.kind == "A" else (0, i.fixed), i.dtype)
    return arrays


def write_adapter(path: Path, arrays: dict, model_version: int = 1) -> None:
    """Write the arrays with ONNX Runtime's AdapterFormat (a temporary sibling renamed into place)."""
    import onnxruntime as ort

    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(ADAPTER_VERSION)
    fmt.set_model_version(model_version)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in arrays.items()})
    tmp = path.parent / (path.name + ".tmp")
    fmt.export_adapter(str(tmp))
    os.replace(tmp, path)


def adapter_ranks(path: Path) -> dict[str, tuple[int, ...]]:
    """{input name: shape} of an adapter file, read back with ONNX Runtime."""
    import onnxruntime as ort

    fmt = ort.AdapterFormat.read_adapter(str(path))
    return {k: tuple(v.shape()) for k, v in fmt.get_parameters().items()}
