"""The base model: checks on its directory, and loading it as fp32 or as the 4-bit NF4 model QLoRA trains on."""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import BadInput, Problem, ToolchainFailed, raise_if
from .jsonfile import read_object


@dataclass(frozen=True)
class Nf4Settings:
    """How the base was quantized for QLoRA; the exporter reproduces exactly this to merge faithfully."""

    quant_type: str = "nf4"
    double_quant: bool = True
    blocksize: int = 64
    compute_dtype: str = "float32"  # bfloat16 on a GPU
    quant_storage: str = "uint8"  # bfloat16 for FSDP-QLoRA, so that sharded params share one dtype
    load_dtype: str = "float32"  # the dtype the weights had when they were quantized

    def to_dict(self) -> dict:
        return asdict(self)


BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)


def device_map():
    """Each process's own GPU under accelerate/torchrun (LOCAL_RANK), else the CPU."""
    import os

    import torch

    return {"": int(os.environ.get("LOCAL_RANK", 0))} if torch.cuda.is_available() else "cpu"


def check_base(base_dir: str | Path) -> Path:
    """Return the base directory after checking it holds a config, safetensors weights and a tokenizer."""
    base = Path(base_dir)
    if not base.is_dir():
        raise BadInput.one(str(base), "base model directory not found", "pass a Hugging Face model directory with --base")
    problems: list[Problem] = []
    cfg = base / "config.json"
    if not cfg.is_file():
        problems.append(Problem(str(base), "no config.json", "save the model with save_pretrained() into this directory"))
    else:
        config = read_object(cfg, "restore the model's config.json", problems)
        if config is not None:
            problems += _config_field_problems(config, cfg) + base_quantization_problems(base)
    if not list(base.glob("*.safetensors")):
        hint = " (only pickle .bin files: convert them to safetensors)" if list(base.glob("*.bin")) else ""
        problems.append(Problem(str(base), f"no .safetensors weight files{hint}",
                                "save the model with save_pretrained(safe_serialization=True)"))
    if not (base / "tokenizer.json").is_file() and not (base / "tokenizer_config.json").is_file():
        problems.append(Problem(str(base), "no tokenizer files", "save the tokenizer with tokenizer.save_pretrained() here"))
    raise_if(problems)
    return base


# Sizes every causal LM config has under these names (when it has them): positive whole numbers.
SIZE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "vocab_size", "max_position_embeddings", "head_dim", "n_embd", "n_layer", "n_head", "n_positions")


def _config_field_problems(config: dict, where: Path) -> list[Problem]:
    """What can be checked without transformers (this runs in the light parent process)."""
    fix = "restore the model's config.json"
    problems = []
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        problems.append(Problem(str(where), f"model_type = {model_type!r}: it must name the architecture", fix))
    for key in SIZE_FIELDS:
        value = config.get(key)
        if key in config and value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            problems.append(Problem(str(where), f"{key} = {str(value)[:40]!r}: it must be a positive whole number", fix))
    archs = config.get("architectures")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        problems.append(Problem(str(where), f"architectures = {str(archs)[:60]!r}: it must be a list of class names", fix))
    return problems


# --- pre-quantized bases: what config.json says (no torch needed) ------------------------------------------


def quantization_config(base_dir: Path) -> dict | None:
    """The base's config.json quantization_config, if any."""
    try:
        cfg = json.loads((Path(base_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    qc = cfg.get("quantization_config") if isinstance(cfg, dict) else None
    return qc if isinstance(qc, dict) else None


def _is_4bit_bnb(qc: dict) -> bool:
    return qc.get("quant_method", "bitsandbytes") == "bitsandbytes" and bool(qc.get("load_in_4bit") or
                                                                               qc.get("_load_in_4bit"))


def base_quantization_problems(base_dir: Path) -> list[Problem]:
    """A quantized base this tool cannot merge into: 8-bit bitsandbytes, GPTQ, AWQ, FP8 and the others."""
    qc = quantization_config(base_dir)
    if qc is None or _is_4bit_bnb(qc):
        return []
    method = qc.get("quant_method", "bitsandbytes")
    kind = "8-bit bitsandbytes" if method == "bitsandbytes" and (qc.get("load_in_8bit") or qc.get("_load_in_8bit")) \
        else f"{method}-quantized"
    article = "an" if kind[0] in "8aeiou" else "a"
    return [Problem(str(Path(base_dir) / "config.json"), f"{article} {kind} checkpoint: lora-export merges into full-precision "
                    "weights or into bitsandbytes 4-bit (NF4/FP4) codes, not into this format",
                    "pass the full-precision (bf16/fp16/fp32) model the quantized one was made from with --base")]


def is_prequantized(base_dir: Path) -> bool:
    qc = quantization_config(base_dir)
    return qc is not None and _is_4bit_bnb(qc)


def config_of(base_dir: Path):
    """transformers' config of the base, or BadInput: an unknown model_type (remote code is never run), or
    fields transformers refuses."""
    from transformers import AutoConfig

    where = Path(base_dir) / "config.json"
    try:
        return AutoConfig.from_pretrained(str(base_dir), trust_remote_code=False)
    except Exception as e:  # transformers raises ValueError, KeyError, TypeError... for a config it cannot use
        raw = json.loads(where.read_text()) if where.is_file() else {}
        remote = " and points to remote code (auto_map), which lora-export never runs" if raw.get("auto_map") else ""
        raise BadInput.one(str(where), f"transformers cannot load this config{remote} ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:200] if str(e) else ''})",
                           "use a model whose model_type this transformers knows, saved with save_pretrained()") from e


def skeleton(base_dir: Path, config=None, dtype=None):
    """The base's module tree on the meta device (no weights): names, types and shapes, or BadInput."""
    import torch
    from transformers import AutoModelForCausalLM

    config = config if config is not None else config_of(base_dir)
    if getattr(config, "quantization_config", None) is not None:  # a pre-quantized base: its float module tree
        config = copy.copy(config)
        del config.quantization_config
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, **({"dtype": dtype} if dtype is not None else {}))
    except Exception as e:  # a config transformers read but cannot build a causal LM from
        raise BadInput.one(str(Path(base_dir) / "config.json"), f"no causal language model can be built from this "
                           f"config ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})",
                           "pass a causal LM's directory (a *ForCausalLM architecture) with --base") from e


def load_tokenizer(base_dir: Path):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(base_dir), trust_remote_code=False)
    except ImportError as e:  # a tokenizer library this tokenizer needs is missing: not the user's files
        raise ToolchainFailed(f"loading the tokenizer of {base_dir} needs a package that is not installed ({e})") from e
    except Exception as e:  # tokenizers and transformers raise many types for unreadable files
        raise BadInput.one(str(base_dir), f"the tokenizer files cannot be read ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:200] if str(e) else ''})",
                           "save the tokenizer again with tokenizer.save_pretrained() here") from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_fp32(base_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32, trust_remote_code=False,
                                                use_safetensors=True).eval()


def bnb_config(nf4: Nf4Settings):
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=nf4.quant_type,
        bnb_4bit_use_double_quant=nf4.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, nf4.compute_dtype),
        bnb_4bit_quant_storage=getattr(torch, nf4.quant_storage),
    )


def load_nf4(base_dir: Path, nf4: Nf4Settings):
    """The base as QLoRA sees it: every linear layer but the output head in 4-bit NF4 via bitsandbytes (a base
    saved in bitsandbytes 4-bit is loaded as it is: ``nf4`` does not apply to it).

    transformers quantizes with bitsandbytes' default block size (64) and has no option for another; for
    another block size each 4-bit layer is quantized again by bitsandbytes from the checkpoint's weights.
    """
    import torch
    from transformers import AutoModelForCausalLM

    if is_prequantized(base_dir):  # already 4-bit (a "-bnb-4bit" checkpoint): its own codes, nothing to quantize
        model = AutoModelForCausalLM.from_pretrained(str(base_dir), device_map=device_map(), trust_remote_code=False,
                                                     use_safetensors=True).eval()
        pin_fp32_path(model)
        return model
    if nf4.blocksize not in BLOCKSIZES:
        raise BadInput.one("--blocksize", f"block size {nf4.blocksize} is not supported by bitsandbytes",
                           f"use one of {', '.join(map(str, BLOCKSIZES))}")
    model = AutoModelForCausalLM.from_pretrained(
        str(base_dir), quantization_config=bnb_config(nf4), dtype=getattr(torch, nf4.load_dtype),
        device_map=device_map(), trust_remote_code=False, use_safetensors=True,
    ).eval()
    if nf4.blocksize != 64:
        _requantize(model, base_dir, nf4)
    pin_fp32_path(model)
    return model


def pin_fp32_path(model) -> None:
    """Keep every 4-bit layer on bitsandbytes' dequantize-then-matmul path, on every CPU.

    On CPUs with AVX512-BF16, ``Linear4bit.forward`` in eval mode without grad repacks its weight and
    computes in bf16 through ``gemv_4bit``, whatever the compute dtype says; training mode never does. The
    trainer's eval loss, and anything else run on this model, must see the model the trainer trained.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def _requantize(model, base_dir: Path, nf4: Nf4Settings) -> None:
    import bitsandbytes as bnb
    import torch
    from safetensors import safe_open

    layers = {f"{name}.weight": mod for name, mod in model.named_modules() if isinstance(mod, bnb.nn.Linear4bit)}
    for path in sorted(Path(base_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in set(f.keys()) & set(layers):
                mod = layers[key]
                device = mod.weight.device
                w = f.get_tensor(key).to(getattr(torch, nf4.load_dtype))
                param = bnb.nn.Params4bit(w, requires_grad=False, blocksize=nf4.blocksize,
                                          compress_statistics=nf4.double_quant, quant_type=nf4.quant_type,
                                          quant_storage=getattr(torch, nf4.quant_storage))
                mod.weight = param._quantize(device)


def quantized_module_names(model) -> list[str]:
    import bitsandbytes as bnb

    return [name for name, mod in model.named_modules() if isinstance(mod, bnb.nn.Linear4bit)]
