"""QLoRA training: a 4-bit NF4 base (bitsandbytes), LoRA through PEFT, the transformers Trainer.

Because the loop is the transformers Trainer, ``accelerate launch`` or ``torchrun`` scale the same call to
many GPUs (DDP; FSDP with ``quant_storage = bfloat16``), or to several CPU processes (DDP over gloo); every
process trains, only the first (rank 0) writes the adapter. QLoRA's memory recipe is complete: NF4 with double
quantization, activation (gradient) checkpointing on by default, and bitsandbytes' paged optimizers on request
(they page optimizer state only on a CUDA GPU; on the CPU they run unpaged). The output is a plain PEFT adapter
directory plus ``training_manifest.json``, which records how the base was quantized so that the exporter can
merge into exactly the weights the adapter saw. Checkpoints go to a hidden sibling of the output
(``.NAME.checkpoints``), so an interrupted run resumes with ``resume=True`` and a finished one leaves only
the adapter.
"""

from __future__ import annotations

import math
import random
import shutil
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

from . import base as base_model
from .base import Nf4Settings, is_prequantized
from .data import load_jsonl, to_prompt_completion, with_bos
from .errors import BadInput, Problem, raise_if
from .fingerprint import fingerprint
from .manifests import TrainingManifest
from .outputs import output_problem, staged
from .progress import Progress, quiet
from .quantized_base import Quantization, prequantized_quantization, trained_here
from .versions import package_versions

# The transformers Trainer's ``optim`` names offered: PyTorch's AdamW, and bitsandbytes' paged AdamW with 8-bit
# or 32-bit state (QLoRA's paged optimizers: on a CUDA GPU their state is paged to CPU memory under pressure).
OPTIMIZERS = ("adamw_torch", "paged_adamw_8bit", "paged_adamw_32bit")
# Non-reentrant checkpointing: needs no inputs that require grad, works under DDP, keeps dropout's RNG state.
CHECKPOINTING_KWARGS = {"use_reentrant": False}


@dataclass(frozen=True)
class TrainConfig:
    base: Path
    data: Path
    out: Path
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str = "all-linear"  # or comma-separated module names
    use_rslora: bool = False  # scale by alpha/sqrt(r)
    use_dora: bool = False
    modules_to_save: tuple[str, ...] = ()  # trained in full and saved with the adapter (e.g. lm_head)
    quantize: bool = True  # False: plain LoRA on the full-precision base
    steps: int = 100
    lr: float = 2e-3
    batch_size: int = 8
    max_length: int = 256
    packing: bool = False  # concatenate examples into max_length blocks
    eval_split: float = 0.0  # share of the examples held out for the eval loss
    eval_data: Path | None = None  # or a separate JSONL file for it
    save_steps: int = 0  # checkpoint every N steps (0: only at the end)
    resume: bool = False  # continue from the last checkpoint of an interrupted run into the same --out
    seed: int = 0
    gradient_checkpointing: bool = True  # recompute each layer's activations in the backward pass: less memory
    optim: str = "adamw_torch"  # one of OPTIMIZERS
    nf4: Nf4Settings = field(default_factory=lambda: Nf4Settings(compute_dtype="auto"))


@dataclass(frozen=True)
class TrainResult:
    adapter_dir: Path
    first_loss: float
    final_loss: float
    eval_loss: float | None
    steps: int
    model: object = field(default=None, repr=False, compare=False)  # the trained PEFT model, in memory


def checkpoint_dir(out: Path) -> Path:
    out = Path(out)
    return out.parent / f".{out.name}.checkpoints"


def _check(cfg: TrainConfig) -> None:
    problems: list[Problem] = []
    if cfg.rank <= 0:
        problems.append(Problem("--rank", f"rank must be positive, got {cfg.rank}", "use a rank such as 8 or 16"))
    if cfg.steps <= 0:
        problems.append(Problem("--steps", f"steps must be positive, got {cfg.steps}", "use --steps 100 or more"))
    if cfg.lr <= 0:
        problems.append(Problem("--lr", f"learning rate must be positive, got {cfg.lr}", "use --lr 2e-4 to 2e-3"))
    if not (math.isfinite(cfg.alpha) and cfg.alpha > 0):
        problems.append(Problem("--alpha", f"lora alpha must be a positive number, got {cfg.alpha}",
                                "use e.g. --alpha 16 (twice the rank is common)"))
    if not (math.isfinite(cfg.dropout) and 0 <= cfg.dropout < 1):
        problems.append(Problem("--dropout", f"dropout must lie in [0, 1), got {cfg.dropout}", "use e.g. --dropout 0.05"))
    if cfg.quantize and cfg.nf4.blocksize not in base_model.BLOCKSIZES:
        problems.append(Problem("--blocksize", f"block size {cfg.nf4.blocksize} is not supported by bitsandbytes",
                                f"use one of {', '.join(map(str, base_model.BLOCKSIZES))}"))
    if not math.isfinite(cfg.lr):
        problems.append(Problem("--lr", f"learning rate must be a finite number, got {cfg.lr}", "use --lr 2e-4 to 2e-3"))
    if cfg.batch_size <= 0 or cfg.max_length < 8:
        problems.append(Problem("--batch-size/--max-length", "batch size must be positive and max length >= 8",
                                "use e.g. --batch-size 8 --max-length 512"))
    if not (math.isfinite(cfg.eval_split) and 0 <= cfg.eval_split < 1):
        problems.append(Problem("--eval-split", f"eval split must lie in [0, 1), got {cfg.eval_split}",
                                "use a share such as 0.1"))
    if cfg.save_steps < 0:
        problems.append(Problem("--save-steps", "must be >= 0", "use e.g. --save-steps 50, or 0"))
    if cfg.optim not in OPTIMIZERS:
        problems.append(Problem("--optim", f"optimizer {cfg.optim!r} is not offered", f"use one of {', '.join(OPTIMIZERS)}"))
    if problem := output_problem(cfg.out):
        problems.append(problem)
    if cfg.resume and not _last_checkpoint(cfg.out):
        problems.append(Problem(str(checkpoint_dir(cfg.out)), "no checkpoint to resume from",
                                "run without --resume, or with the --out of the interrupted run"))
    raise_if(problems)


def _last_checkpoint(out: Path) -> str | None:
    """The newest *complete* checkpoint: the Trainer writes trainer_state.json last, so a folder without it is one
    a kill interrupted while it was being saved (transformers' get_last_checkpoint would pick it and fail)."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    d = checkpoint_dir(out)
    if not d.is_dir():
        return None
    steps = [int(p.name.rsplit("-", 1)[1]) for p in d.glob(f"{PREFIX_CHECKPOINT_DIR}-*")
             if p.name.rsplit("-", 1)[1].isdigit() and (p / "trainer_state.json").is_file()]
    return str(d / f"{PREFIX_CHECKPOINT_DIR}-{max(steps)}") if steps else None


def _tokenize(examples, tok, max_length: int) -> list[dict]:
    rows = []
    for ex in examples:
        prompt_text, completion_text = to_prompt_completion(ex, tok)
        prompt = tok(prompt_text, add_special_tokens=False)["input_ids"] if prompt_text else []
        completion = tok(completion_text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = with_bos(tok, prompt + completion)
        labels = [-100] * (len(ids) - len(completion)) + completion  # loss on the completion only
        rows.append({"input_ids": ids[:max_length], "labels": labels[:max_length]})
    return rows


def _pack(rows: list[dict], max_length: int) -> list[dict]:
    """Concatenate examples into blocks of max_length tokens (labels kept, so prompts stay masked)."""
    ids = [t for r in rows for t in r["input_ids"]]
    labels = [t for r in rows for t in r["labels"]]
    return [{"input_ids": ids[i:i + max_length], "labels": labels[i:i + max_length]}
            for i in range(0, len(ids) - max_length + 1, max_length)] or rows


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
    """Resolve the target module spec; names must match linear layers of the model (listed if not)."""
    import bitsandbytes as bnb
    import torch

    if spec == "all-linear":
        return "all-linear"
    names = [n.strip() for n in spec.split(",") if n.strip()]
    linear = {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
              if isinstance(m, (torch.nn.Linear, bnb.nn.Linear4bit)) and not n.endswith("lm_head")}
    unknown = [n for n in names if n not in linear]
    if unknown or not names:
        raise BadInput.one("--target-modules", f"{', '.join(unknown) or 'nothing'} match no linear layer of the base",
                           f"use 'all-linear' or names among: {', '.join(sorted(linear))}")
    return names


def _split(examples, cfg: TrainConfig):
    if cfg.eval_data:
        return list(examples), list(load_jsonl(cfg.eval_data).examples)
    if cfg.eval_split <= 0:
        return list(examples), []
    shuffled = list(examples)
    random.Random(cfg.seed).shuffle(shuffled)
    n_eval = max(1, int(round(len(shuffled) * cfg.eval_split)))
    if n_eval >= len(shuffled):
        raise BadInput.one(str(cfg.data), f"{len(shuffled)} examples leave nothing to train on after the eval split",
                           "add examples or lower --eval-split")
    return shuffled[n_eval:], shuffled[:n_eval]


def _resolved_nf4(cfg: TrainConfig) -> Nf4Settings:
    """bf16 compute on a GPU, fp32 on the CPU (bitsandbytes' CPU kernels compute in fp32)."""
    import torch

    if cfg.nf4.compute_dtype != "auto":
        return cfg.nf4
    return replace(cfg.nf4, compute_dtype="bfloat16" if torch.cuda.is_available() else "float32")


def _loss_lines(log):
    """A TrainerCallback: one detail line per logging step with the loss (and the eval loss when there is one).
    Made here, not at import: this module's readers (the adapter checks) must not import transformers."""
    from transformers import TrainerCallback

    class LossLines(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            shown = {k: v for k, v in (logs or {}).items() if k in ("loss", "eval_loss")}
            if shown:
                log(f"  step {state.global_step}/{state.max_steps}: "
                    + ", ".join(f"{k.replace('_', ' ')} {v:.4g}" for k, v in shown.items()))

    return LossLines()


def _step_of(checkpoint: str) -> int:
    return int(Path(checkpoint).name.rsplit("-", 1)[1])


def _processes(args) -> str:
    """What the log says about distribution: ', in 2 processes (DDP over gloo)', or nothing for one process."""
    import torch.distributed as dist

    if args.world_size <= 1:
        return ""
    backend = dist.get_backend() if dist.is_available() and dist.is_initialized() else "?"
    return f", in {args.world_size} processes (DDP over {backend})"


def step_bar(stream):
    """A TrainerCallback drawing a progress bar over training steps on ``stream`` (a terminal): tqdm, shown
    only once training has run for 3 s."""
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class StepBar(TrainerCallback):
        bar = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="training", unit="step",
                            file=stream, delay=3, leave=False, disable=False, dynamic_ncols=True)

        def on_step_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return StepBar()


def train(cfg: TrainConfig, log: Progress = quiet, callbacks=()) -> TrainResult:
    """Train a (Q)LoRA adapter and write it, complete, to ``cfg.out`` (written in a temporary sibling first).

    ``log`` receives one line per stage, and an indented line (a detail) with the loss at each logging step;
    ``callbacks`` are extra transformers TrainerCallbacks (the CLI adds ``step_bar`` on a terminal).
    """
    from transformers import Trainer, set_seed

    _check(cfg)
    base_dir = _checked_base(cfg)
    data = load_jsonl(cfg.data)
    train_examples, eval_examples = _split(data.examples, cfg)
    set_seed(cfg.seed)
    tok = base_model.load_tokenizer(base_dir)
    nf4, prequantized = _quantization(cfg, base_dir)
    model, quantized = _load_base(cfg, base_dir, nf4, prequantized, log)
    model = _with_lora(model, cfg)
    rows, eval_rows = _sequences(train_examples, tok, cfg), _tokenize(eval_examples, tok, cfg.max_length)
    resume_from = _last_checkpoint(cfg.out) if cfg.resume else None
    args = _training_arguments(cfg, nf4, bool(eval_rows))
    _log_plan(cfg, args, data, rows, eval_rows, resume_from, log)
    # Under accelerate/torchrun every process runs this (the Trainer wraps the model in DDP: the gradients are
    # averaged, each process reads its own share of every batch); only the first one writes the adapter.
    main_process = args.process_index == 0
    with (staged(Path(cfg.out)) if main_process else nullcontext()) as staging:
        trainer = Trainer(model=model, args=args, train_dataset=rows, eval_dataset=eval_rows or None,
                          data_collator=_collate(tok.pad_token_id), callbacks=[_loss_lines(log), *callbacks])
        losses, eval_loss = _run(trainer, resume_from, bool(eval_rows))
        if main_process:
            manifest = _training_manifest(cfg, base_dir, nf4, quantized, prequantized, data, tok,
                                          (train_examples, eval_examples, rows), args, resume_from, losses, eval_loss)
            _write_adapter(staging, model, tok, manifest)
    if main_process:
        shutil.rmtree(checkpoint_dir(cfg.out), ignore_errors=True)  # the adapter is complete: checkpoints go
    return TrainResult(adapter_dir=Path(cfg.out), first_loss=losses[0] if losses else float("nan"),
                       final_loss=losses[-1] if losses else float("nan"), eval_loss=eval_loss, steps=cfg.steps,
                       model=model)


def _checked_base(cfg: TrainConfig) -> Path:
    """The base, checked, and refused for --no-quant when it is already 4-bit; its config must build a model."""
    base_dir = base_model.check_base(cfg.base)
    if not cfg.quantize and is_prequantized(base_dir):
        raise BadInput.one(str(base_dir / "config.json"), "--no-quant: this base is already 4-bit (a bitsandbytes "
                           "4-bit checkpoint), and plain LoRA trains on full-precision weights",
                           "drop --no-quant to train QLoRA on its codes, or pass the full-precision original")
    base_model.skeleton(base_dir)  # a config transformers cannot build is bad input, before the model loads
    return base_dir


def _quantization(cfg: TrainConfig, base_dir: Path) -> tuple[Nf4Settings, bool]:
    """(the 4-bit settings to train with, whether the base is pre-quantized). A "-bnb-4bit" base is trained on
    its own codes, which the manifest records."""
    nf4 = _resolved_nf4(cfg)
    prequantized = is_prequantized(base_dir)
    if prequantized:
        nf4 = replace(prequantized_quantization(base_dir).settings, compute_dtype=nf4.compute_dtype)
    return nf4, prequantized


def _load_base(cfg: TrainConfig, base_dir: Path, nf4: Nf4Settings, prequantized: bool, log):
    """(the base model ready for LoRA, the names of its 4-bit modules)."""
    import torch
    from peft import prepare_model_for_kbit_training

    if not cfg.quantize:
        log(f"loading {base_dir} in full precision (plain LoRA)")
        model = base_model.load_fp32(base_dir)
        model.to("cuda" if torch.cuda.is_available() else "cpu")
        return model, []
    stored = " as stored (a pre-quantized base)" if prequantized else ""
    log(f"loading {base_dir} in 4-bit {nf4.quant_type}{stored} (double quant {nf4.double_quant}, "
        f"block {nf4.blocksize})")
    model = base_model.load_nf4(base_dir, nf4)
    quantized = base_model.quantized_module_names(model)
    # freezes and casts only: checkpointing is switched on by the Trainer (activation_checkpointing below)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False), quantized


def _with_lora(model, cfg: TrainConfig):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, use_rslora=cfg.use_rslora, use_dora=cfg.use_dora,
        target_modules=_lora_targets(model, cfg.target_modules), modules_to_save=list(cfg.modules_to_save) or None,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def _sequences(examples, tok, cfg: TrainConfig) -> list[dict]:
    rows = _tokenize(examples, tok, cfg.max_length)
    return _pack(rows, cfg.max_length) if cfg.packing else rows


def _training_arguments(cfg: TrainConfig, nf4: Nf4Settings, evaluate: bool):
    import torch
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(checkpoint_dir(cfg.out)), max_steps=cfg.steps, per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size, learning_rate=cfg.lr, lr_scheduler_type="linear",
        warmup_steps=min(10, cfg.steps // 10), logging_steps=max(1, cfg.steps // 10),
        save_strategy="steps" if cfg.save_steps else "no", save_steps=cfg.save_steps or 500,
        eval_strategy="steps" if evaluate else "no", eval_steps=max(1, cfg.steps // 5),
        report_to=[], seed=cfg.seed, data_seed=cfg.seed, use_cpu=not torch.cuda.is_available(),
        bf16=nf4.compute_dtype == "bfloat16", dataloader_num_workers=0, remove_unused_columns=False,
        optim=cfg.optim, activation_checkpointing=cfg.gradient_checkpointing,
        activation_checkpointing_kwargs=dict(CHECKPOINTING_KWARGS),
        disable_tqdm=True,  # progress is ours: loss lines through ``log``, a bar from the caller on a terminal
    )


def _log_plan(cfg: TrainConfig, args, data, rows, eval_rows, resume_from: str | None, log) -> None:
    log(f"training {cfg.steps} steps on {len(rows)} sequences from {data.path}"
        + (f", eval loss on {len(eval_rows)}" if eval_rows else "") + _processes(args)
        + (", gradient checkpointing" if cfg.gradient_checkpointing else "") + f", {cfg.optim}")
    if "paged" in cfg.optim and args.device.type != "cuda":
        log(f"note: bitsandbytes pages optimizer state only on a CUDA GPU; on the {args.device.type} {cfg.optim} "
            "runs unpaged")
    if resume_from:
        log(f"resuming from {Path(resume_from).name} (step {_step_of(resume_from)} of {cfg.steps})")


def _run(trainer, resume_from: str | None, evaluate: bool) -> tuple[list[float], float | None]:
    """Train (resuming if asked), then the eval loss; returns (the logged losses, the eval loss)."""
    trainer.train(resume_from_checkpoint=resume_from)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    eval_loss = trainer.evaluate()["eval_loss"] if evaluate else None
    # every process is done with the checkpoints before the first one writes the adapter and removes them
    trainer.accelerator.wait_for_everyone()
    return losses, eval_loss


def _training_manifest(cfg: TrainConfig, base_dir: Path, nf4: Nf4Settings, quantized: list, prequantized: bool,
                       data, tok, split: tuple, args, resume_from: str | None, losses: list[float],
                       eval_loss: float | None) -> TrainingManifest:
    train_examples, eval_examples, rows = split
    return TrainingManifest(
        kind="qlora" if cfg.quantize else "lora",
        base_path=str(base_dir.resolve()), base_weights_sha256=fingerprint(base_dir),
        quantization=Quantization(settings=nf4, modules=tuple(quantized), sources=trained_here(),
                                  prequantized=prequantized) if cfg.quantize else None,
        lora={"rank": cfg.rank, "alpha": cfg.alpha, "dropout": cfg.dropout, "use_rslora": cfg.use_rslora,
              "use_dora": cfg.use_dora, "target_modules": cfg.target_modules,
              "modules_to_save": list(cfg.modules_to_save)},
        data={"path": str(data.path.resolve()), "sha256": data.sha256, "examples": len(data.examples),
              "train_examples": len(train_examples), "eval_examples": len(eval_examples),
              "sequences": len(rows), "packing": cfg.packing, "max_length": cfg.max_length,
              "chat_template": bool(getattr(tok, "chat_template", None))},
        training={"steps": cfg.steps, "lr": cfg.lr, "batch_size": cfg.batch_size, "seed": cfg.seed,
                  "resumed": cfg.resume, "resumed_from_step": _step_of(resume_from) if resume_from else None,
                  "first_loss": losses[0] if losses else None,
                  "final_loss": losses[-1] if losses else None, "eval_loss": eval_loss,
                  "world_size": args.world_size, "device": args.device.type,
                  "gradient_checkpointing": cfg.gradient_checkpointing, "optimizer": cfg.optim},
        versions=package_versions(),
    )


def _write_adapter(staging: Path, model, tok, manifest: TrainingManifest) -> None:
    """The PEFT adapter, its training manifest and the tokenizer, into the staged output."""
    model.save_pretrained(str(staging), safe_serialization=True)
    manifest.write(staging)
    tok.save_pretrained(str(staging))
