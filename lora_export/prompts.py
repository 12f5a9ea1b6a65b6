"""The parity prompts: a user's JSONL or the embedded eval set, tokenized, checked against the model's positions.

Shared by every recipe that measures parity (``pipeline``, ``switchable*``) and by the benchmarks' prompt.
"""

from __future__ import annotations

from pathlib import Path

from .data import load_jsonl
from .errors import BadInput
from .tasks import encode_prompt

EMBEDDED = Path(__file__).resolve().parent / "embedded"  # the default: base/ (a tiny pretrained model), demo/ (data)
PARITY_PROMPTS = 8


def load_prompts(tok, path: Path | None = None) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of the parity prompts, and of whole records (prompt + completion) for long contexts.

    From a user's JSONL (prompt/completion or text records) or the embedded eval set.
    """
    examples = load_jsonl(path or EMBEDDED / "demo" / "eval.jsonl").examples
    if len(examples) < 4:
        raise BadInput.one(str(path), f"only {len(examples)} prompts; parity needs at least 4",
                           "add prompts to the file (8 are used)")
    prompts = [encode_prompt(tok, ex.prompt or ex.completion) for ex in examples[:PARITY_PROMPTS]]
    documents = [encode_prompt(tok, ex.prompt + ex.completion) for ex in examples[: 4 * PARITY_PROMPTS]]
    return prompts, documents


def check_prompt_lengths(prompt_ids: list[list[int]], max_positions: int, steps: int, source: Path | None) -> None:
    """Each parity prompt plus its continuation must fit the model's positions (else ONNX Runtime fails deep
    inside attention, after the reference has run)."""
    longest = max((len(p) for p in prompt_ids[:PARITY_PROMPTS]), default=0)
    if longest + steps > max_positions:
        raise BadInput.one(str(source or "the parity prompts"), f"a prompt of {longest} tokens plus the {steps}-token "
                           f"continuation exceeds the model's {max_positions} positions",
                           f"use prompts of at most {max(max_positions - steps, 1)} tokens")


def bench_prompt(tok, length: int = 32) -> list[int]:
    """The latency benchmarks' prompt: the embedded eval records' tokens, concatenated, cut to ``length``."""
    return [t for p in load_prompts(tok)[1] for t in p][:length]
