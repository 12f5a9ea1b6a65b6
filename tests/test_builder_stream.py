"""builder_stream: onnxruntime-genai's builder fed one layer at a time writes the builder's own graph, byte for byte,
and holds a fraction of the memory.

Each case builds one checkpoint twice with the options lora-export passes for the target: with the builder as it is
(``python -m onnxruntime_genai.models.builder``) and through ``lora_export.export.builder_stream``. Compared: every
node (op type, domain, inputs, outputs, attributes, in order), every initializer's name, shape, dtype and bytes,
graph inputs, outputs and opsets. Tolerance: none. (The order in which initializers are stored in model.onnx.data
may differ: the streamed build quantizes layer by layer, the builder at the end.)
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from lora_export.checkpoint import parameter_count
from lora_export.export.builder_stream import NOT_STREAMED, STREAMED
from lora_export.export.genai_builder import builder_args
from lora_export.isolate import lean_env
from lora_export.latency import graph_structure
from lora_export.targets import load_target

from .conftest import make_base
from .test_backends import tiny_model

STOCK = "onnxruntime_genai.models.builder"
STREAM = "lora_export.export.builder_stream"
# runs a builder module and prints its process's own peak RSS (VmHWM) last
PEAK = ("import runpy, sys; sys.argv = [sys.argv[1], *sys.argv[2:]]; m = sys.argv[0]; "
        "(runpy.run_module(m, run_name='__main__', alter_sys=True) if m.startswith('onnxruntime') else "
        "__import__(m, fromlist=['main']).main(sys.argv[1:])); "
        "print('VmHWM_kB', next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))")


def build(module: str, checkpoint: Path, target_name: str, out: Path) -> tuple[str, int]:
    """(the build's output, its peak RSS in bytes)."""
    out.mkdir(parents=True)
    r = subprocess.run([sys.executable, "-c", PEAK, module, *builder_args(checkpoint, out, load_target(target_name))],
                       capture_output=True, text=True,
                       env=lean_env())  # as genai_builder runs it
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    peak = int(r.stdout.strip().splitlines()[-1].split()[1]) * 1024
    return r.stdout, peak


def initializers(out: Path) -> dict:
    return {i.name: onnx.numpy_helper.to_array(i).tobytes() for i in onnx.load(str(out / "model.onnx")).graph.initializer}


def assert_same_graph(stock: Path, streamed: Path) -> None:
    a, b = graph_structure(stock), graph_structure(streamed)
    for key in a:
        assert a[key] == b[key], key
    x, y = initializers(stock), initializers(streamed)
    assert x.keys() == y.keys()
    differ = [k for k in x if x[k] != y[k]]
    assert not differ, f"{len(differ)} initializers differ, e.g. {differ[0]}"


def both(checkpoint: Path, target_name: str, tmp: Path, streamed: bool = True) -> tuple[int, int]:
    _, stock_peak = build(STOCK, checkpoint, target_name, tmp / "stock")
    log, stream_peak = build(STREAM, checkpoint, target_name, tmp / "streamed")
    assert (STREAMED if streamed else NOT_STREAMED) in log
    assert_same_graph(tmp / "stock", tmp / "streamed")
    return stock_peak, stream_peak


def test_int4_graph_is_the_builders_byte_for_byte(tiny_base, tmp_path):
    """Int4 body, int8 lm_head and sensitive layers (ort-cpu-int4's recipe), tied embeddings stored apart."""
    both(tiny_base, "ort-cpu-int4", tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["ort-cpu-fp32", "ort-cuda-fp16", "ort-cuda-int4", "ort-cpu-int8"])
def test_every_builder_target_is_the_builders_graph(target, tmp_path):
    base = make_base(tmp_path / "base", tie_word_embeddings=False)
    both(base, target, tmp_path)


@pytest.mark.slow
def test_a_node_the_options_exclude_stays_float_as_in_the_builder(tmp_path):
    """lm_head = "unquantized" (nodes_to_exclude=/lm_head/MatMul): the streamed build leaves it a float MatMul, as the
    builder does."""
    text = (Path(load_target("ort-cpu-int4").source).read_text()
            .replace('lm_head = "int8"', 'lm_head = "unquantized"').replace('name = "ort-cpu-int4"', 'name = "x"'))
    assert 'lm_head = "unquantized"' in text
    (tmp_path / "x.toml").write_text(text)
    base = make_base(tmp_path / "base", tie_word_embeddings=False)
    both(base, str(tmp_path / "x.toml"), tmp_path)
    head = [n for n in onnx.load(str(tmp_path / "streamed" / "model.onnx"), load_external_data=False).graph.node
            if n.name.startswith("/lm_head/")]
    assert [n.op_type for n in head] == ["MatMul"]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["Qwen2ForCausalLM", "Phi3ForCausalLM", "GemmaForCausalLM", "MistralForCausalLM"])
def test_families_are_the_builders_graph(arch, tmp_path):
    """Biases (Qwen2), a fused qkv_proj in the checkpoint (Phi-3), Gemma's norm offset and embedding scale."""
    both(tiny_model(arch, tmp_path / "base"), "ort-cpu-int4", tmp_path)


@pytest.mark.slow
def test_a_bf16_checkpoint_is_read_in_its_own_dtype(tmp_path):
    """from_pretrained's dtype "auto": a bf16 checkpoint is read as bf16, then cast by the builder as before."""
    import torch
    from transformers import AutoModelForCausalLM

    base = make_base(tmp_path / "fp32")
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.bfloat16)
    model.save_pretrained(str(tmp_path / "bf16"))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "bf16" / f).write_bytes((base / f).read_bytes())
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    both(tmp_path / "bf16", "ort-cpu-int4", tmp_path)


def test_a_checkpoint_it_cannot_map_is_built_whole_and_says_so(tmp_path):
    """A tensor the model does not name (here a stray one) means the mapping is not the model's: the builder then
    loads the model as it always does (the log says so), and the graph is still its own."""
    from safetensors.torch import load_file, save_file

    base = make_base(tmp_path / "base")
    tensors = load_file(str(base / "model.safetensors"))
    tensors["model.unexpected.weight"] = tensors["model.norm.weight"].clone()
    save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
    both(base, "ort-cpu-int4", tmp_path, streamed=False)


@pytest.mark.slow
def test_the_streamed_build_holds_a_fraction_of_the_builders_memory(tmp_path):
    """Int4 of a 0.2B model of wide layers (hidden 1024, intermediate 4096, 12 layers, 0.81 GB of fp32 weights).
    The builder holds the model and then the whole graph in fp32 while it quantizes; the streamed build the int4
    graph and one layer. Peaks measured as each process's own VmHWM; the streamed build must stay under 0.5x the
    builder's and under the fp32 weight bytes plus 0.7 GB (Python, torch and ONNX Runtime themselves)."""
    base = make_base(tmp_path / "base", hidden_size=1024, intermediate_size=4096, num_hidden_layers=12,
                     num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=False)
    fp32 = 4 * parameter_count(base)
    stock, streamed = both(base, "ort-cpu-int4", tmp_path)
    print(f"int4 build of {fp32 / 1e9:.2f} GB of fp32 weights (12 layers): builder alone "
          f"{stock / 1e9:.2f} GB, streamed {streamed / 1e9:.2f} GB")
    assert streamed <= 0.5 * stock
    assert streamed <= fp32 + 0.7e9


def layer_bytes(out: Path, layer: int) -> int:
    """Bytes of the graph's initializers that belong to one decoder layer (from the external-data records)."""
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    total = 0
    for t in model.graph.initializer:
        if f"layers.{layer}." in t.name or f"layers.{layer}/" in t.name:
            fields = {e.key: e.value for e in t.external_data}
            total += int(fields.get("length", 0)) or len(t.raw_data)
    return total


@pytest.mark.slow
def test_at_8b_widths_the_streamed_build_fits_the_8b_memory_goal(tmp_path):
    """Llama-3.1-8B's widths (hidden 4096, intermediate 14336, 32/8 heads, vocab 128256, llama3 rope), cut to 2 and
    to 4 layers: bf16 checkpoints written tensor by tensor (benchmarks/export_scale.py's bases), built for ort-cpu-int4
    through builder_stream. P(L) is the build's peak (its VmHWM). What a layer adds, (P(4) - P(2)) / 2, must be at
    most the int4 bytes its graph keeps plus 64 MB (holding its fp32 weights would add 0.87 GB), and P(2) + 30 such
    layers must stay within issue 27's goal for the whole 8B export: 0.6 x its fp32 weight bytes (19.3 GB)."""
    from benchmarks.export_scale import LLAMA31_8B, build_base

    from .test_memory import LLAMA_31_8B

    peaks, per_layer = {}, {}
    for layers in (2, 4):
        base = tmp_path / f"base-{layers}"
        shape = f"8b-{layers}l"
        build_base_with_layers(build_base, base, LLAMA31_8B, layers, shape)
        _, peaks[layers] = build(STREAM, base, "ort-cpu-int4", tmp_path / f"out-{layers}")
        per_layer[layers] = layer_bytes(tmp_path / f"out-{layers}", 1)
        shutil.rmtree(base)
    added = (peaks[4] - peaks[2]) / 2
    projected = peaks[2] + 30 * added
    goal = 0.6 * 4 * LLAMA_31_8B
    print(f"streamed int4 build at 8B widths: peak {peaks[2] / 1e9:.2f} GB at 2 layers, {peaks[4] / 1e9:.2f} GB at 4; "
          f"{added / 1e6:.0f} MB a layer (its int4 graph: {per_layer[4] / 1e6:.0f} MB); 32 layers projected "
          f"{projected / 1e9:.1f} GB against the goal {goal / 1e9:.1f} GB")
    assert per_layer[2] == per_layer[4] > 0
    assert added <= per_layer[4] + 64e6
    assert projected <= goal


def build_base_with_layers(build_base, out: Path, shape: dict, layers: int, name: str) -> None:
    """export_scale's base writer (bf16, tensor by tensor) for Llama-3.1-8B's shape with ``layers`` layers."""
    from benchmarks import export_scale

    export_scale.SHAPES[name] = dict(shape, num_hidden_layers=layers)
    export_scale.BF16_SHARDED.add(name)
    try:
        build_base(out, name)
    finally:
        export_scale.SHAPES.pop(name)
        export_scale.BF16_SHARDED.discard(name)
