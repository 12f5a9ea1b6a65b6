"""Read and check a PEFT LoRA adapter against its base, before any heavy work.

Reads only JSON and safetensors headers (plus a finiteness pass over the adapter's own small tensors),
builds the base's module tree on the meta device (no weights loaded), and reports every problem at once:
unknown module names, shape mismatches, pickle-only files, NaN/Inf, a base other than the one trained on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import BadInput, Problem, raise_if
from .fingerprint import fingerprint
from .train import MANIFEST

SUPPORTED_PEFT_TYPES = ("LORA",)


@dataclass(frozen=True)
class Adapter:
    path: Path
    config: dict  # adapter_config.json
    manifest: dict | None  # training_manifest.json, when the adapter was made by lora-export
    targeted: tuple[str, ...]  # base module names the adapter changes

    @property
    def trained_on_4bit(self) -> bool:
        return bool(self.manifest and self.manifest.get("kind") == "qlora")


def _module_of(key: str) -> tuple[str, str] | None:
    """'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' -> ('model.layers.0.self_attn.q_proj', 'A')."""
    for part in ("lora_A", "lora_B"):
        marker = f".{part}."
        if marker in key:
            name = key.split(marker)[0]
            if name.startswith("base_model.model."):
                name = name[len("base_model.model."):]
            return name, part[-1]
    return None


def load_adapter(adapter_dir: str | Path, base_dir: Path, check_fingerprint: bool = True) -> Adapter:
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(adapter_dir)
    if not path.is_dir():
        raise BadInput.one(str(path), "adapter directory not found", "pass a PEFT adapter directory with --adapter")
    cfg_path = path / "adapter_config.json"
    weights = path / "adapter_model.safetensors"
    problems: list[Problem] = []
    config: dict = {}
    if not cfg_path.is_file():
        problems.append(Problem(str(path), "no adapter_config.json", "save the adapter with PEFT's save_pretrained()"))
    else:
        try:
            config = json.loads(cfg_path.read_text())
            if not isinstance(config, dict):
                raise ValueError("top level is not an object")
        except (ValueError, UnicodeDecodeError) as e:
            problems.append(Problem(str(cfg_path), f"not valid JSON ({e})", "restore the file PEFT wrote"))
            config = {}
    if config and config.get("peft_type") not in SUPPORTED_PEFT_TYPES:
        problems.append(Problem(str(cfg_path), f"peft_type {config.get('peft_type')!r} is not supported",
                                f"export an adapter of type {', '.join(SUPPORTED_PEFT_TYPES)}"))
    if not weights.is_file():
        hint = ("only a pickle adapter_model.bin, which can run code when loaded"
                if (path / "adapter_model.bin").is_file() else "no adapter_model.safetensors")
        problems.append(Problem(str(path), hint, "save the adapter with save_pretrained(safe_serialization=True)"))
    raise_if(problems)

    base_cfg = AutoConfig.from_pretrained(str(base_dir), trust_remote_code=False)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(base_cfg)
    modules = dict(skeleton.named_modules())

    found: dict[str, dict[str, tuple[int, ...]]] = {}
    try:
        with safe_open(str(weights), framework="pt") as f:
            for key in f.keys():
                where = _module_of(key)
                tensor = f.get_tensor(key)
                if not torch.isfinite(tensor).all():
                    problems.append(Problem(str(weights), f"tensor {key} holds NaN or Inf",
                                            "retrain the adapter; a diverged run cannot be exported"))
                if where:
                    found.setdefault(where[0], {})[where[1]] = tuple(tensor.shape)
    except Exception as e:  # safetensors raises several types for a corrupt file
        raise BadInput.one(str(weights), f"cannot be read as safetensors ({e})",
                           "the file is truncated or corrupt: save the adapter again") from None
    if not found:
        problems.append(Problem(str(weights), "holds no LoRA A/B tensors", "save a trained LoRA adapter here"))
    for name, parts in sorted(found.items()):
        module = modules.get(name)
        if module is None or not hasattr(module, "in_features"):
            problems.append(Problem(str(weights), f"target module {name} does not exist in the base "
                                    f"({base_cfg.architectures[0] if base_cfg.architectures else '?'})",
                                    "export with the base model the adapter was trained on"))
            continue
        a, b = parts.get("A"), parts.get("B")
        if a is None or b is None:
            problems.append(Problem(str(weights), f"{name} has only one of lora_A / lora_B", "save the adapter again"))
        elif a[1] != module.in_features or b[0] != module.out_features or a[0] != b[1]:
            problems.append(Problem(str(weights), f"{name}: A {a} and B {b} do not fit a "
                                    f"{module.in_features}->{module.out_features} layer",
                                    "the adapter was trained for a different base; pass that base with --base"))

    manifest = None
    if (path / MANIFEST).is_file():
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (ValueError, UnicodeDecodeError) as e:
            problems.append(Problem(str(path / MANIFEST), f"not valid JSON ({e})", "restore the file the trainer wrote"))
    if manifest and check_fingerprint:
        want = manifest.get("base", {}).get("weights_sha256", {})
        if want and fingerprint(base_dir) != want:
            problems.append(Problem(str(base_dir), "weights differ from the base this adapter was trained on "
                                    f"({manifest.get('base', {}).get('path')})",
                                    "pass the base the adapter was trained on with --base"))
    raise_if(problems)
    return Adapter(path=path, config=config, manifest=manifest, targeted=tuple(sorted(found)))
