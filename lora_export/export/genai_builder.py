"""Fused fast-path backend: onnxruntime-genai's model builder run on the merged checkpoint.

The builder emits the graph ONNX Runtime runs fastest (GroupQueryAttention, SkipSimplifiedLayerNorm,
MatMulNBits for int4) plus ``genai_config.json``, so the export loads both in a plain InferenceSession
and in onnxruntime-genai. We run it as a subprocess: its import path hack and its console output stay
out of our process, and its log is kept beside the export. It runs through ``builder_stream``, which hands it
the model one layer at a time and quantizes as it goes (the builder alone holds the whole model, and for int4
the whole graph in fp32 too); the graph is the builder's, byte for byte.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from ..errors import BadInput, ToolchainFailed
from ..families import TESTED, check_family
from ..isolate import die_with_parent, lean_env, run_in_child
from ..quantize import SCHEMES
from .backend import Backend
from .builder_fixes import builder_input, fix_embedding_scale, needs_rope_caches, recompute_rope_caches
from .lora_inputs import builder_lora_nodes, quantized_lora_nodes

PROVIDERS = {"CPUExecutionProvider": "cpu", "CUDAExecutionProvider": "cuda"}
# windowed_kv_cache=false: sliding-window layers keep a cache of the whole past like every other layer (the I/O
# contract of io_spec; the ring cache it replaces needs a preallocated past that no plain runner passes)
BUILDER_OPTIONS = {"hf_remote": "false", "windowed_kv_cache": "false"}
# the builder's own command line, run by builder_stream: the same graph, the model read one layer at a time
BUILDER_MODULE = "lora_export.export.builder_stream"


class BuildFailed(ToolchainFailed):
    pass


def builder_args(source: Path, out_dir: Path, target, adapter: Path | None = None, layers: int = 0) -> list[str]:
    """The builder's command line for ``target`` (after ``python -m <the builder or BUILDER_MODULE>``): precision,
    execution provider, cache folder beside ``out_dir``, extra options. ``layers``: the model's decoder layers (the
    names of the LoRA nodes kept float, with ``adapter``)."""
    quant = target.quantization.for_graph(side_paths=adapter is not None)
    scheme = SCHEMES[quant.scheme]
    options = {**BUILDER_OPTIONS, **scheme.builder_options(quant)}
    if adapter is not None:  # the builder's own LoRA path: MatMul A, MatMul B (scaling folded in), Add
        options["adapter_path"] = str(adapter)
    if adapter is not None and quant.scheme != "none":
        keep_float = builder_lora_nodes(layers)
        options["nodes_to_exclude"] = ",".join(filter(None, (options.get("nodes_to_exclude"), *keep_float)))
    return ["-i", str(source), "-o", str(out_dir), "-p", scheme.builder_precision(quant, target.precision),
            "-e", builder_ep(target), "-c", str(out_dir.parent / (out_dir.name + ".cache")),
            "--extra_options", *[f"{k}={v}" for k, v in options.items()]]


def build(checkpoint: Path, out_dir: Path, target, log_path: Path, adapter: Path | None = None) -> None:
    """With an adapter, its side paths stay float whatever the base weights are quantized to: the builder's LoRA
    MatMuls are excluded from its quantizer (and from the post-process's), and checked after."""
    config = json.loads((checkpoint / "config.json").read_text())
    check_family(config, "genai-builder", str(checkpoint / "config.json"), known_wrong=False)
    if not any(p in PROVIDERS for p in target.execution_providers):
        raise BadInput.one(target.source, f"execution providers {', '.join(target.execution_providers)} are not "
                           "supported by the genai-builder backend", f"include one of {', '.join(PROVIDERS)}")
    if importlib.util.find_spec("onnxruntime_genai") is None:
        raise ToolchainFailed('onnxruntime-genai (the graph builder) is not installed. Fix: pip install '
                              '"lora-export[cpu]" (or "lora-export[gpu]" for CUDA)')
    quant = target.quantization.for_graph(side_paths=adapter is not None)
    scheme = SCHEMES[quant.scheme]
    view = out_dir.parent / (out_dir.name + ".input")
    try:
        source = builder_input(checkpoint, config, view)  # the checkpoint, or a view with builder_fixes' fixes
        cmd = [sys.executable, "-m", BUILDER_MODULE,
               *builder_args(source, out_dir, target, adapter, config["num_hidden_layers"])]
        with open(log_path, "w") as log:
            log.write(" ".join(cmd) + "\n")
            log.flush()
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
                                  env=lean_env())
    finally:
        _rmtree(out_dir.parent / (out_dir.name + ".cache"))
        _rmtree(view)
    if proc.returncode != 0 or not (out_dir / "model.onnx").is_file():
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-5:])
        raise BuildFailed(f"the onnxruntime-genai builder failed (exit {proc.returncode}); last lines of "
                          f"{log_path}:\n{tail}")
    written = _opset(out_dir / "model.onnx")
    if written != target.opset:  # another onnxruntime-genai version: say so instead of shipping another opset
        raise BuildFailed(f"the onnxruntime-genai builder wrote opset {written}, the target asks for {target.opset} "
                          f"(BUILDER_OPSET in {__name__} says what this version writes)")
    if needs_rope_caches(config):
        caches = run_in_child(recompute_rope_caches, checkpoint, out_dir / "model.onnx")
        if caches != 2:  # another builder's cache names: the scaling would be silently missing
            raise BuildFailed(f"the builder's graph has {caches} of the 2 rotary caches (cos_cache, sin_cache) "
                              "that lora-export recomputes for linear/YaRN rope scaling (builder_fixes.py)")
    fix_embedding_scale(config, out_dir / "model.onnx")
    scheme.post_process(out_dir, quant)
    quantized = quantized_lora_nodes(out_dir / "model.onnx") if adapter is not None else []
    if quantized:
        raise BuildFailed(f"the {quant.scheme} quantization took {len(quantized)} LoRA side-path nodes "
                          f"({', '.join(quantized[:2])} ...) although they were excluded by name, so the adapter "
                          "would not stay float (the names it was given are BUILDER_LORA_NODES in "
                          "lora_export/export/lora_inputs.py)")


def _opset(model_path: Path) -> int:
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def builder_ep(target) -> str:
    """The builder's -e: TensorRT runs the CUDA graph (nodes it cannot take fall back to CUDA)."""
    for provider in target.execution_providers:
        if provider in PROVIDERS:
            return PROVIDERS[provider]
    raise AssertionError("checked in build()")


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


# The builder writes its graphs in one opset (22 with onnxruntime-genai 0.18) and has no option to change it.
BUILDER_OPSET = 22
GENAI_BUILDER = Backend(name="genai-builder", tested=TESTED["genai-builder"], build=build, own_process=True,
                        opsets=(BUILDER_OPSET, BUILDER_OPSET), default_opset=BUILDER_OPSET)
