"""Task accuracy on prompt/completion examples: greedy generation, exact match of the completion's words.

This is how the demo shows that the adapter learned something, and that each export kept it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .data import with_bos


@dataclass(frozen=True)
class Accuracy:
    correct: int
    total: int

    @property
    def value(self) -> float:
        return self.correct / self.total if self.total else 0.0


def encode_prompt(tok, prompt: str) -> list[int]:
    return with_bos(tok, tok(prompt, add_special_tokens=False)["input_ids"])


def task_accuracy(model, tok, examples, max_new_tokens: int | None = None) -> Accuracy:
    """Share of examples whose greedy continuation starts with the expected completion (whitespace-normalised)."""
    from .runtime import greedy

    correct = 0
    for ex in examples:
        want = ex.completion.split()
        steps = max_new_tokens or len(tok(ex.completion, add_special_tokens=False)["input_ids"]) + 1
        got = tok.decode(greedy(model, encode_prompt(tok, ex.prompt), steps).tokens, skip_special_tokens=True).split()
        correct += got[: len(want)] == want
    return Accuracy(correct=correct, total=len(examples))
