"""QLoRA training: a 4-bit NF4 base (bitsandbytes), LoRA through PEFT, the transformers Trainer.

Because the loop is the transformers Trainer, ``accelerate launch`` or ``torchrun`` scale the same call to
many GPUs. The output is a plain PEFT adapter directory plus ``training_manifest.json``, which records
how the base was quantized so that the exporter can merge into exactly the weights the adapter saw.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from . import base as base_model
from .base import Nf4Settings
from .data import load_jsonl
from .errors import BadInput, Problem, raise_if
from .fingerprint import fingerprint
from .outputs import output_problem, staged
from .versions import package_versions

MANIFEST = "training_manifest.json"


@dataclass(frozen=True)
class TrainConfig:
    base: Path
    data: Path
    out: Path
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str = "all-linear"
    use_rslora: bool = False
    steps: int = 100
    lr: float = 2e-3
    batch_size: int = 8
    max_length: int = 256
    seed: int = 0
    nf4: Nf4Settings = field(default_factory=Nf4Settings)


@dataclass(frozen=True)
class TrainResult:
    adapter_dir: Path
    final_loss: float
    first_loss: float
    steps: int


def _check(cfg: TrainConfig) -> None:
    problems: list[Problem] = []
    if cfg.rank <= 0:
        problems.append(Problem("--rank", f"rank must be positive, got {cfg.rank}", "use a rank such as 8 or 16"))
    if cfg.steps <= 0:
        problems.append(Problem("--steps", f"steps must be positive, got {cfg.steps}", "use --steps 100 or more"))
    if cfg.lr <= 0:
        problems.append(Problem("--lr", f"learning rate must be positive, got {cfg.lr}", "use --lr 2e-4 to 2e-3"))
    if problem := output_problem(cfg.out):
        problems.append(problem)
    raise_if(problems)


def _tokenize(examples, tok, max_length: int) -> list[dict]:
    rows = []
    for ex in examples:
        prompt = tok(ex.prompt, add_special_tokens=False)["input_ids"] if ex.prompt else []
        completion = tok(ex.completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = ([tok.bos_token_id] if tok.bos_token_id is not None else []) + prompt + completion
        labels = [-100] * (len(ids) - len(completion)) + completion  # loss on the completion only
        rows.append({"input_ids": ids[:max_length], "labels": labels[:max_length]})
    return rows


def _collate(pad_id: int):
    import torch

    def collate(batch):
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[i, :n] = torch.tensor(b["input_ids"])
            labels[i, :n] = torch.tensor(b["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    return collate


def _lora_targets(model, spec: str):
    """Resolve the target module spec, and check that names match linear layers of the model."""
    import torch

    if spec == "all-linear":
        return "all-linear"
    names = [n.strip() for n in spec.split(",") if n.strip()]
    import bitsandbytes as bnb

    linear = {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
              if isinstance(m, (torch.nn.Linear, bnb.nn.Linear4bit)) and not n.endswith("lm_head")}
    unknown = [n for n in names if n not in linear]
    if unknown:
        raise BadInput.one("--target-modules", f"{', '.join(unknown)} match no linear layer of the base",
                           f"use 'all-linear' or names among: {', '.join(sorted(linear))}")
    return names


def train(cfg: TrainConfig, log=print) -> TrainResult:
    """Train a QLoRA adapter and write it, complete, to ``cfg.out`` (written in a temporary sibling first).

    ``log`` receives one line per stage; the Trainer shows its own progress bar with the loss.
    """
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import Trainer, TrainingArguments, set_seed

    _check(cfg)
    base_dir = base_model.check_base(cfg.base)
    data = load_jsonl(cfg.data)
    set_seed(cfg.seed)
    log(f"loading {base_dir} in 4-bit {cfg.nf4.quant_type} (double quant: {cfg.nf4.double_quant})")
    tok = base_model.load_tokenizer(base_dir)
    model = base_model.load_nf4(base_dir, cfg.nf4)
    quantized = base_model.quantized_module_names(model)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lora = LoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, use_rslora=cfg.use_rslora,
        target_modules=_lora_targets(model, cfg.target_modules), task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    rows = _tokenize(data.examples, tok, cfg.max_length)

    log(f"training {cfg.steps} steps on {len(rows)} examples from {data.path}")
    with staged(Path(cfg.out)) as staging:
        args = TrainingArguments(
            output_dir=str(staging / ".trainer"), max_steps=cfg.steps, per_device_train_batch_size=cfg.batch_size,
            learning_rate=cfg.lr, lr_scheduler_type="linear", warmup_steps=min(10, cfg.steps // 10),
            logging_steps=max(1, cfg.steps // 10), save_strategy="no", report_to=[], seed=cfg.seed,
            data_seed=cfg.seed, use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
            remove_unused_columns=False, disable_tqdm=False,
        )
        trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=_collate(tok.pad_token_id))
        trainer.train()
        shutil.rmtree(staging / ".trainer", ignore_errors=True)
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        model.save_pretrained(str(staging), safe_serialization=True)
        manifest = {
            "schema": 1,
            "kind": "qlora",
            "base": {"path": str(base_dir.resolve()), "weights_sha256": fingerprint(base_dir)},
            "quantization": {**cfg.nf4.to_dict(), "quantized_modules": quantized},
            "lora": {"rank": cfg.rank, "alpha": cfg.alpha, "dropout": cfg.dropout, "use_rslora": cfg.use_rslora,
                     "target_modules": cfg.target_modules},
            "data": {"path": str(data.path.resolve()), "sha256": data.sha256, "examples": len(data.examples)},
            "training": {"steps": cfg.steps, "lr": cfg.lr, "batch_size": cfg.batch_size, "seed": cfg.seed,
                         "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None},
            "versions": package_versions(),
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        tok.save_pretrained(str(staging))
    return TrainResult(adapter_dir=Path(cfg.out), final_loss=losses[-1], first_loss=losses[0], steps=cfg.steps)

