"""A checkpoint directory on disk: its weight shards, its fp32 config, its tensors by name.

Shared by every stage that reads or writes one (the merge, the dequantized pre-quantized base, the
survival measurement, NF4 with the training's scales), so each rule is written once.
"""

from __future__ import annotations

import json
from pathlib import Path

INDEX = "model.safetensors.index.json"


def shard_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint: in the order its index names them, else sorted by name."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX
    if index.is_file():
        return [model_dir / f for f in dict.fromkeys(json.loads(index.read_text())["weight_map"].values())]
    return sorted(model_dir.glob("*.safetensors"))


def tensor_index(model_dir: Path, shards: list[Path] | None = None) -> dict:
    """Tensor name -> (safetensors file, its header entry) over every shard of a checkpoint (headers only)."""
    from .tensorfile import read_header

    return {e.name: (shard, e) for shard in (shard_files(model_dir) if shards is None else shards)
            for e in read_header(shard)[0]}


def parameter_count(model_dir: Path, unpack_4bit: bool = False) -> int:
    """Elements of every tensor in the checkpoint's shards, read from their headers (no weights loaded).
    ``unpack_4bit``: a pre-quantized base's packed uint8 tensors count two weights a byte (the weights it holds)."""
    import math

    from .tensorfile import read_header

    return sum(math.prod(e.shape) * (2 if unpack_4bit and e.dtype == "U8" else 1)
               for shard in shard_files(model_dir) for e in read_header(shard)[0])


def shard_names(count: int) -> list[str]:
    """transformers' names for a checkpoint written as ``count`` shards."""
    return ["model.safetensors"] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors"
                                                     for i in range(count)]


def write_fp32_config(base_dir: Path, out_dir: Path, untie: bool = False) -> None:
    """``base_dir``'s config.json as the config of an fp32 checkpoint in ``out_dir``: without its
    quantization_config, dtype float32; ``untie``: input and output embeddings stored apart."""
    cfg = json.loads((Path(base_dir) / "config.json").read_text())
    cfg.pop("quantization_config", None)
    if untie:
        cfg["tie_word_embeddings"] = False
        if isinstance(cfg.get("text_config"), dict):
            cfg["text_config"]["tie_word_embeddings"] = False
    cfg["dtype"] = "float32"
    cfg.pop("torch_dtype", None)
    (Path(out_dir) / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def write_index(out_dir: Path, weight_map: dict, metadata: dict | None = None) -> None:
    """The index of a checkpoint written as several shards: which file holds each tensor."""
    (Path(out_dir) / INDEX).write_text(json.dumps({"metadata": metadata or {}, "weight_map": weight_map}, indent=2)
                                       + "\n")


class CheckpointTensors:
    """Tensors of a safetensors checkpoint by name, read one at a time, as fp32."""

    def __init__(self, directory: Path):
        from safetensors import safe_open

        self.files = {}
        for p in sorted(Path(directory).glob("*.safetensors")):
            with safe_open(str(p), framework="pt") as f:
                self.files.update({k: p for k in f.keys()})
        self.keys = set(self.files)

    def get(self, key: str):
        import torch
        from safetensors import safe_open

        with safe_open(str(self.files[key]), framework="pt") as f:
            return f.get_tensor(key).to(torch.float32)
