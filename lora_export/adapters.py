"""Read and check a PEFT LoRA adapter against its base, before any heavy work.

Reads only JSON and safetensors headers (plus a finiteness pass over the adapter's own small tensors),
builds the base's module tree on the meta device (no weights loaded), and reports every problem at once:
unknown module names, shape mismatches, pickle-only files, NaN/Inf, a base other than the one trained on.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import BadInput, Problem, raise_if
from .fingerprint import fingerprint
from .jsonfile import read_object
from .manifests import TrainingManifest, read_training_manifest
from .quantized_base import Quantization

SUPPORTED_PEFT_TYPES = ("LORA",)


@dataclass(frozen=True)
class Adapter:
    path: Path
    config: dict  # adapter_config.json
    manifest: TrainingManifest | None  # training_manifest.json, when the adapter was made by lora-export
    targeted: tuple[str, ...]  # base module names the adapter changes
    weights_file: Path  # adapter_model.safetensors (or the pickle file, when explicitly allowed)
    saved: tuple[str, ...] = ()  # modules_to_save: base modules the adapter replaces with trained copies
    quantization: Quantization | None = None  # the 4-bit base it was trained against (quantized_base.resolve)
    layer_weights: tuple[str, ...] = ()  # base parameters saved whole (save_embedding_layers): key in the file

    @property
    def trained_on_4bit(self) -> bool:
        return self.quantization is not None

    @property
    def plain_lora(self) -> bool:
        """Neither DoRA nor modules_to_save: its merge is a sum of deltas, and it can be a side path."""
        return not (self.config.get("use_dora") or self.config.get("modules_to_save"))


_PARTS = {"lora_A": "A", "lora_B": "B", "lora_embedding_A": "A", "lora_embedding_B": "B",
          "lora_magnitude_vector": "magnitude"}


def _module_of(key: str) -> tuple[str, str] | None:
    """'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' -> ('model.layers.0.self_attn.q_proj', 'A').

    Also lora_embedding_A/B (embedding layers) and lora_magnitude_vector (DoRA)."""
    for part, kind in _PARTS.items():
        for marker in (f".{part}.", f".{part}"):
            if marker in key and (marker.endswith(".") or key.endswith(marker)):
                return _strip(key.split(marker)[0]), kind
    return None


def _strip(name: str) -> str:
    return name[len("base_model.model."):] if name.startswith("base_model.model.") else name


def _io_features(module) -> tuple[int, int] | None:
    """(in, out) of a layer LoRA can adapt: Linear, GPT-2's Conv1D (weight stored in x out), Embedding."""
    if hasattr(module, "in_features"):
        return module.in_features, module.out_features
    if hasattr(module, "num_embeddings"):
        return module.num_embeddings, module.embedding_dim
    if type(module).__name__ == "Conv1D":
        return tuple(module.weight.shape)
    return None


def _number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _read_config(path: Path, problems: list[Problem]) -> dict:
    cfg_path = path / "adapter_config.json"
    if not cfg_path.is_file():
        problems.append(Problem(str(path), "no adapter_config.json", "save the adapter with PEFT's save_pretrained()"))
        return {}
    restore = "restore the adapter_config.json PEFT wrote with the adapter"
    config = read_object(cfg_path, restore, problems)
    if config is None:
        return {}
    if config.get("peft_type") not in SUPPORTED_PEFT_TYPES:
        problems.append(Problem(str(cfg_path), f"peft_type {config.get('peft_type')!r} is not supported",
                                f"export an adapter of type {', '.join(SUPPORTED_PEFT_TYPES)}"))
        return config
    r = config.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        problems.append(Problem(str(cfg_path), f"rank r = {r!r}: a LoRA rank must be a positive integer", restore))
    alpha = config.get("lora_alpha", 8)
    if not _number(alpha) or alpha < 0:
        problems.append(Problem(str(cfg_path), f"lora_alpha = {alpha!r}: it must be a finite number >= 0 "
                                "(the update is scaled by lora_alpha / r)", restore))
    dropout = config.get("lora_dropout", 0.0)
    if not _number(dropout) or not 0 <= dropout < 1:
        problems.append(Problem(str(cfg_path), f"lora_dropout = {dropout!r}: it must be a number in [0, 1)", restore))
    for key in ("use_rslora", "use_dora", "fan_in_fan_out"):
        if key in config and not isinstance(config[key], bool):
            problems.append(Problem(str(cfg_path), f"{key} = {config[key]!r}: it must be true or false", restore))
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict) or any(not _number(v) or v <= 0 for v in pattern.values()):
            problems.append(Problem(str(cfg_path), f"{key} must map module names to positive numbers", restore))
    if config.get("lora_bias"):
        problems.append(Problem(str(cfg_path), "lora_bias = true (a trained bias on lora_B) is not supported",
                                "train the adapter without lora_bias"))
    if config.get("trainable_token_indices"):
        problems.append(Problem(str(cfg_path), "trainable_token_indices (embedding rows trained beside the LoRA) is "
                                "not supported", "merge it with PEFT's merge_and_unload() and export that model, or "
                                "train the adapter without trainable_token_indices"))
    targets = config.get("target_modules")
    if not (isinstance(targets, str) or (isinstance(targets, list) and targets and
                                         all(isinstance(t, str) and t for t in targets))):
        problems.append(Problem(str(cfg_path), f"target_modules = {str(targets)[:80]!r} names no module", restore))
    return config


def _configured_rank(config: dict, name: str) -> int | None:
    """The rank PEFT gives module ``name``: the first rank_pattern key that matches it (PEFT's rule: the
    whole name, or its end after a dot), else ``r``."""
    for key, rank in (config.get("rank_pattern") or {}).items():
        try:
            hit = re.match(rf"(.*\.)?({key})$", name) is not None
        except re.error:
            hit = name == key or name.endswith("." + key)
        if hit:
            return rank
    r = config.get("r")
    return r if isinstance(r, int) and not isinstance(r, bool) else None


def _config_problems(config: dict, cfg_path: Path, modules: dict, found: dict, arch: str) -> list[Problem]:
    """What adapter_config.json says against what the tensors hold and what the base has."""
    problems = []
    restore = "restore the adapter_config.json PEFT wrote with the adapter"
    for name, parts in sorted(found.items()):
        want, have = _configured_rank(config, name), parts.get("A", (None,))[0]
        if want is not None and have is not None and want != have:
            problems.append(Problem(str(cfg_path), f"rank {want} for {name}, but its saved lora_A has rank {have}",
                                    restore))
            break  # one is enough to say the config and the tensors disagree
    if config.get("use_dora") is True:
        missing = [n for n, parts in found.items() if "magnitude" not in parts]
        if missing:
            problems.append(Problem(str(cfg_path), f"use_dora = true, but {len(missing)} adapted module(s) have no "
                                    f"DoRA magnitude vector (e.g. {sorted(missing)[0]})",
                                    "save the DoRA adapter again with PEFT, or set use_dora = false if it is plain LoRA"))
    targets = config.get("target_modules")
    if isinstance(targets, list):
        # PEFT needs only some names to match (a list reused across architectures is common): refuse a list that
        # matches nothing, or names that match only layers LoRA cannot adapt
        keys = [k for k in targets if isinstance(k, str) and k]
        hits = {k: [n for n in modules if n == k or n.endswith("." + k)] for k in keys}
        if keys and not any(hits.values()):
            problems.append(Problem(str(cfg_path), f"target_modules {keys[:4]} match no module of the base ({arch})",
                                    "export with the base the adapter was trained on"))
        for key, names in hits.items():
            if names and not any(_io_features(modules[n]) for n in names):
                kind = type(modules[names[0]]).__name__
                problems.append(Problem(str(cfg_path), f"target_modules names {key!r}, a {kind}: LoRA adapts linear, "
                                        "Conv1D and embedding layers only", restore))
    elif isinstance(targets, str) and targets != "all-linear":
        try:
            re.compile(targets)
        except re.error as e:
            problems.append(Problem(str(cfg_path), f"target_modules {targets[:80]!r} is not a valid regular "
                                    f"expression ({e})", restore))
    return problems


def _weights_file(path: Path, allow_pickle: bool, problems: list[Problem]) -> Path | None:
    if (path / "adapter_model.safetensors").is_file():
        return path / "adapter_model.safetensors"
    if (path / "adapter_model.bin").is_file():
        if allow_pickle:
            return path / "adapter_model.bin"
        problems.append(Problem(str(path / "adapter_model.bin"), "a pickle file, which can run code when loaded, "
                                "and there is no adapter_model.safetensors",
                                "convert the adapter to safetensors, or pass --allow-pickle if you trust its source "
                                "(it is then read with torch.load(weights_only=True))"))
        return None
    problems.append(Problem(str(path), "no adapter_model.safetensors",
                            "save the adapter with save_pretrained(safe_serialization=True)"))
    return None


def _tensors(weights: Path):
    """(name, tensor) pairs of the adapter's weights; pickle only when allowed, and then weights only."""
    import torch
    from safetensors import safe_open

    try:
        if weights.suffix == ".bin":
            yield from torch.load(str(weights), map_location="cpu", weights_only=True).items()
            return
        with safe_open(str(weights), framework="pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)
    except Exception as e:  # safetensors and torch raise several types for a corrupt file
        raise BadInput.one(str(weights), f"cannot be read ({type(e).__name__}: {e})",
                           "the file is truncated or corrupt: save the adapter again") from e


def load_adapter(adapter_dir: str | Path, base_dir: Path, check_fingerprint: bool = True,
                 allow_pickle: bool = False, base_fingerprint: dict | None = None) -> Adapter:
    """``base_fingerprint``: hashes of base weight files the caller has just taken (not taken again)."""
    import torch

    path = Path(adapter_dir)
    if not path.is_dir():
        raise BadInput.one(str(path), "adapter directory not found", "pass a PEFT adapter directory with --adapter")
    problems: list[Problem] = []
    config = _read_config(path, problems)
    weights = _weights_file(path, allow_pickle, problems)
    raise_if(problems)

    from .base import config_of, skeleton as meta_skeleton

    base_cfg = config_of(base_dir)
    skeleton = meta_skeleton(base_dir, base_cfg)
    modules = dict(skeleton.named_modules())

    found: dict[str, dict[str, tuple[int, ...]]] = {}
    saved: set[str] = set()
    params = {n: tuple(p.shape) for n, p in skeleton.named_parameters()}
    layer_weights: list[str] = []
    for key, tensor in _tensors(weights):
        if not isinstance(tensor, torch.Tensor):
            problems.append(Problem(str(weights), f"entry {key} is not a tensor", "save the adapter again"))
            continue
        if not tensor.is_floating_point():
            problems.append(Problem(str(weights), f"tensor {key} has dtype {str(tensor.dtype).replace('torch.', '')}: "
                                    "LoRA weights are floating point", "save the adapter again from its trained model"))
            continue
        if not torch.isfinite(tensor).all():
            problems.append(Problem(str(weights), f"tensor {key} holds NaN or Inf",
                                    "retrain the adapter; a diverged run cannot be exported"))
        where = _module_of(key)
        if where and tensor.dim() in (1, 2):
            found.setdefault(where[0], {})[where[1]] = tuple(tensor.shape)
        elif where is None and _strip(key) in params:
            # save_pretrained(save_embedding_layers=...): a base layer's whole weight, which replaces the base's
            layer_weights.append(key)
            if tuple(tensor.shape) != params[_strip(key)]:
                problems.append(Problem(str(weights), f"saved layer {_strip(key)} has shape {tuple(tensor.shape)}, the "
                                        f"base's has {params[_strip(key)]} (the vocabulary was resized in training)",
                                        "pass the base with the resized vocabulary (resize_token_embeddings, then "
                                        "save_pretrained) with --base"))
        elif where is None and ".base_layer." not in key:
            saved.add(_strip(key).rpartition(".")[0])  # modules_to_save: a full copy of the module
    if not found and not saved:
        problems.append(Problem(str(weights), "holds no LoRA A/B tensors", "save a trained LoRA adapter here"))
    arch = base_cfg.architectures[0] if base_cfg.architectures else type(skeleton).__name__
    for name in sorted(saved):
        if name not in modules:
            problems.append(Problem(str(weights), f"modules_to_save entry {name} does not exist in the base ({arch})",
                                    "export with the base model the adapter was trained on"))
    for name, parts in sorted(found.items()):
        module = modules.get(name)
        io = _io_features(module) if module is not None else None
        if io is None:
            problems.append(Problem(str(weights), f"target module {name} does not exist in the base ({arch})"
                                    if module is None else f"target module {name} is a {type(module).__name__}, "
                                    "which this exporter cannot merge (Linear, Conv1D and Embedding only)",
                                    "export with the base model the adapter was trained on"))
            continue
        a, b = parts.get("A"), parts.get("B")
        embedding = hasattr(module, "num_embeddings")
        if a is None or b is None:
            problems.append(Problem(str(weights), f"{name} has only one of lora_A / lora_B", "save the adapter again"))
        elif len(a) != 2 or len(b) != 2 or a[1] != io[0] or b[0] != io[1] or a[0] != b[1]:
            kind = "embedding" if embedding else "layer"
            problems.append(Problem(str(weights), f"{name}: A {a} and B {b} do not fit a {io[0]}->{io[1]} {kind}",
                                    "the adapter was trained for a different base; pass that base with --base"))
        m = parts.get("magnitude")
        if m is not None and m != (io[1],):
            problems.append(Problem(str(weights), f"{name}: DoRA magnitude {m} does not fit {io[1]} outputs",
                                    "the adapter was trained for a different base; pass that base with --base"))

    problems += _config_problems(config, path / "adapter_config.json", modules, found, arch)
    manifest = read_training_manifest(path, problems)
    if manifest and check_fingerprint:
        want = manifest.base_weights_sha256
        if want and fingerprint(base_dir, known=base_fingerprint) != want:
            problems.append(Problem(str(base_dir), "weights differ from the base this adapter was trained on "
                                    f"({manifest.base_path})", "pass the base the adapter was trained on with --base"))
    raise_if(problems)
    quantization = manifest.quantization if manifest else None
    return Adapter(path=path, config=config, manifest=manifest, targeted=tuple(sorted(found)),
                   weights_file=weights, saved=tuple(sorted(saved)), quantization=quantization,
                   layer_weights=tuple(layer_weights))


def saved_layer_weights(adapter: Adapter) -> dict:
    """Base parameter name -> the adapter's saved copy (``save_embedding_layers``)."""
    wanted = set(adapter.layer_weights)
    return {_strip(k): t for k, t in _tensors(adapter.weights_file) if k in wanted} if wanted else {}


def base_name_note(adapter: Adapter, base_dir: Path) -> str | None:
    """A note when adapter_config.json names its base by a hub id (Unsloth, TRL and axolotl write the repository
    name): nothing is downloaded; the shapes were checked against ``base_dir`` instead."""
    name = adapter.config.get("base_model_name_or_path")
    if not isinstance(name, str) or not name or Path(name).exists():
        return None
    return (f"  {adapter.path.name}/adapter_config.json names its base {name!r}, which is not a path here: every "
            f"adapted layer's shape was checked against --base {base_dir} instead")


def attach(model, adapters, weights=None, low_cpu_mem_usage: bool = False):
    """``model`` with every adapter loaded through PEFT (named a0, a1, ...), all active, each scaled by its
    weight: PEFT's unmerged linear combination, and the layers whose ``merge()`` gives the merged one."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    weights = list(weights or [1.0] * len(adapters))
    names = [f"a{i}" for i in range(len(adapters))]
    peft_model = PeftModel.from_pretrained(model, str(adapters[0].path), adapter_name=names[0], is_trainable=False,
                                           low_cpu_mem_usage=low_cpu_mem_usage)
    for name, adapter in zip(names[1:], adapters[1:]):
        peft_model.load_adapter(str(adapter.path), adapter_name=name, is_trainable=False,
                                low_cpu_mem_usage=low_cpu_mem_usage)
    if len(names) > 1:
        peft_model.base_model.set_adapter(names)  # all active: their outputs add up
    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            for name, w in zip(names, weights):
                if name in module.scaling and w != 1.0:
                    # W + sum_i w_i dW_i: the multiplication PEFT's own scale_layer() applies to active adapters
                    module.scaling[name] *= w
    return peft_model, names
