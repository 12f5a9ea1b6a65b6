"""Generic backend: ``torch.onnx.export(..., dynamo=True)`` for any causal LM that torch.export can trace.

Slower than the fused graph (plain MatMul/Softmax attention, no GroupQueryAttention), but it covers
architectures the onnxruntime-genai builder does not (GPT-2, GPT-NeoX, OPT, OLMo-2, ...) and is a second path
for those it does: any causal LM transformers knows, where torch.export can trace it. The traced module is
the transformers model behind a thin wrapper whose inputs and outputs are flat tensors named as in
io_spec: ``input_ids``, ``attention_mask``, ``position_ids``, ``past_key_values.N.key/value`` in;
``logits``, ``present.N.key/value`` out. Batch, sequence and past lengths are dynamic.

torch.export specialises dimensions of size 0 and 1, so the trace uses a past of 3 tokens; at run time a
past of length 0 (the prompt pass) goes through the same graph.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from ..errors import BadInput, ToolchainFailed
from ..families import TESTED, check_family
from .backend import Backend
from .io_spec import kv_input_names, kv_output_names

SCHEMES = ("none", "nf4")  # nf4 is a post-process on any graph; int4/int8 come from the genai-builder backend
PRECISIONS = ("fp32", "fp16")


class ExportFailed(ToolchainFailed):
    pass


def _wrapper(model):
    import torch
    from transformers import DynamicCache

    class Decoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model
            self.layers = model.config.get_text_config().num_hidden_layers

        def forward(self, input_ids, attention_mask, position_ids, *past):
            # full layers, not the config's: transformers' sliding-window layers keep only the last window of keys,
            # and the graph's present must be the whole past (io_spec); the attention mask applies the window
            cache = DynamicCache([(past[2 * i], past[2 * i + 1]) for i in range(self.layers)])
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=cache, use_cache=True, return_dict=True)
            cache = getattr(out, "past_key_values", None) or out.cache
            present = []
            for layer in cache.layers:
                present += [layer.keys, layer.values]
            return (out.logits, *present)

    return Decoder().eval()


def _kv_shape(config) -> tuple[int, int]:
    text = config.get_text_config()
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return kv_heads, head_dim


def build(checkpoint: Path, out_dir: Path, target, log_path: Path, adapter: Path | None = None) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(checkpoint), trust_remote_code=False)
    arch = (config.architectures or ["?"])[0]
    check_family(config.to_dict(), "torch-dynamo", str(checkpoint / "config.json"), known_wrong=False)
    if adapter is not None:
        raise BadInput.one(target.source, "the torch-dynamo backend exports merged graphs only",
                           'use backend = "genai-builder" for --keep-adapter')
    if target.precision not in PRECISIONS or target.quantization.scheme not in SCHEMES:
        raise BadInput.one(target.source, f"the torch-dynamo backend exports {'/'.join(PRECISIONS)} weights "
                           f"(quantization {', '.join(SCHEMES)}); this target asks for {target.precision} "
                           f"with {target.quantization.scheme}", 'use backend = "genai-builder" for int4/int8')
    dtype = torch.float16 if target.precision == "fp16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=dtype, trust_remote_code=False,
                                                 attn_implementation="eager").eval()
    layers = config.get_text_config().num_hidden_layers
    kv_heads, head_dim = _kv_shape(config)
    batch, seq, past_len = 2, 5, 3
    ids = torch.randint(0, config.get_text_config().vocab_size, (batch, seq))
    mask = torch.ones(batch, past_len + seq, dtype=torch.int64)
    pos = torch.arange(past_len, past_len + seq).expand(batch, seq).contiguous()
    past = [torch.randn(batch, kv_heads, past_len, head_dim, dtype=dtype) for _ in range(2 * layers)]
    kv_in, kv_out = kv_input_names(layers), kv_output_names(layers)
    b, s, p, t = (torch.export.Dim(n) for n in ("batch", "sequence", "past_sequence", "total_sequence"))
    dynamic = {"input_ids": {0: b, 1: s}, "attention_mask": {0: b, 1: t}, "position_ids": {0: b, 1: s},
               "past": tuple({0: b, 2: p} for _ in kv_in)}
    with open(log_path, "w") as log, tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        log.write(f"torch.onnx.export(dynamo=True) of {arch} from {checkpoint}, {target.precision}\n")
        try:
            with torch.no_grad():
                program = torch.onnx.export(
                    _wrapper(model), (ids, mask, pos, *past), dynamo=True, dynamic_shapes=dynamic,
                    input_names=["input_ids", "attention_mask", "position_ids", *kv_in],
                    output_names=["logits", *kv_out], opset_version=target.opset, optimize=True,
                    verbose=False)
            program.save(str(Path(tmp) / "model.onnx"), external_data=True)
        except Exception as e:  # torch.export raises many types; the log keeps the detail
            log.write(f"{type(e).__name__}: {e}\n")
            raise ExportFailed(f"torch.onnx.export(dynamo=True) failed for {arch}: {type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''} (details in {log_path})") from e
        _single_data_file(Path(tmp) / "model.onnx", out_dir)
    (out_dir / "genai_config.json").write_text(json.dumps(_genai_config(config, layers, kv_heads, head_dim), indent=2))
    _copy_tokenizer(checkpoint, out_dir)
    from ..quantize import SCHEMES as QUANT

    QUANT[target.quantization.scheme].post_process(out_dir, target.quantization)


def _single_data_file(src: Path, out_dir: Path) -> None:
    """Re-save with every initializer in one ``model.onnx.data`` beside the graph (a bare file name)."""
    import onnx

    model = onnx.load(str(src), load_external_data=True)
    onnx.save_model(model, str(out_dir / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=1024)


def _genai_config(config, layers: int, kv_heads: int, head_dim: int) -> dict:
    """The decoder section onnxruntime-genai reads (and our runner's head size, when the graph leaves it open)."""
    text = config.get_text_config()
    return {"model": {
        "type": text.model_type, "vocab_size": text.vocab_size, "context_length": getattr(text, "max_position_embeddings",
                                                                                           getattr(text, "n_positions", 2048)),
        "bos_token_id": text.bos_token_id, "eos_token_id": text.eos_token_id, "pad_token_id": text.pad_token_id,
        "decoder": {"filename": "model.onnx", "head_size": head_dim, "hidden_size": text.hidden_size,
                    "num_attention_heads": text.num_attention_heads, "num_key_value_heads": kv_heads,
                    "num_hidden_layers": layers,
                    "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                               "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                               "past_value_names": "past_key_values.%d.value"},
                    "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                                "present_value_names": "present.%d.value"}}},
        "search": {"max_length": getattr(text, "max_position_embeddings", 2048), "do_sample": False}}


def _copy_tokenizer(checkpoint: Path, out_dir: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (checkpoint / name).is_file():
            shutil.copy2(checkpoint / name, out_dir / name)


# torch.onnx's dynamo exporter writes opset 18 and later; 21 is the one tested here for every architecture.
# int4/int8 are the builder's own MatMulNBits pass; this backend quantizes only by nf4's post-process.
TORCH_DYNAMO = Backend(name="torch-dynamo", tested=TESTED["torch-dynamo"], build=build, opsets=(18, 21),
                       default_opset=21,
                       schemes=("none", "nf4"), side_paths=False)
