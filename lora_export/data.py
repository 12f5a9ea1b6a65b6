"""Training and evaluation data: JSONL with ``{"text"}``, ``{"prompt", "completion"}`` or ``{"messages"}`` records.

Every bad line is reported with its file and line number, all at once, before any training starts.
Chat records are turned into prompt + completion by the tokenizer's chat template (``to_prompt_completion``):
the completion is the final assistant message, the prompt everything before it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import BadInput, Problem, raise_if


@dataclass(frozen=True)
class Example:
    prompt: str  # text the loss ignores ("" for plain text records)
    completion: str  # text the loss is computed on
    messages: tuple = ()  # ((role, content), ...) for chat records; prompt/completion come from the template


def with_bos(tok, ids: list[int]) -> list[int]:
    """``ids`` after the tokenizer's BOS token, when it has one: how training and every evaluation start a text."""
    return ([tok.bos_token_id] if tok.bos_token_id is not None else []) + ids


def _messages(rec) -> tuple | None:
    msgs = rec.get("messages") if isinstance(rec, dict) else None
    if not isinstance(msgs, list) or not msgs:
        return None
    if not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
               for m in msgs):
        return None
    if msgs[-1]["role"] != "assistant":
        return None
    return tuple((m["role"], m["content"]) for m in msgs)


@dataclass(frozen=True)
class Dataset:
    path: Path
    sha256: str
    examples: tuple[Example, ...]


MAX_PROBLEMS = 20  # bad lines reported before stopping: a binary file must not print hundreds


def load_jsonl(path: str | Path) -> Dataset:
    path = Path(path)
    if not path.is_file():
        raise BadInput.one(str(path), "dataset file not found", "pass an existing .jsonl file with --data")
    raw = path.read_bytes()
    problems: list[Problem] = []
    examples: list[Example] = []
    for lineno, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), start=1):
        if len(problems) >= MAX_PROBLEMS:  # checked first: a line that is not JSON counts as much as any other
            problems.append(Problem(str(path), f"stopped after {MAX_PROBLEMS} bad lines", "fix these and run again"))
            break
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(Problem(where, f"not valid JSON ({e.msg})", "write one JSON object per line"))
            continue
        except RecursionError:
            problems.append(Problem(where, "nested too deeply to read", "write one flat JSON object per line"))
            continue
        if isinstance(rec, dict) and isinstance(rec.get("text"), str) and rec["text"]:
            examples.append(Example("", rec["text"]))
        elif isinstance(rec, dict) and isinstance(rec.get("prompt"), str) and isinstance(rec.get("completion"), str) \
                and rec["completion"]:
            examples.append(Example(rec["prompt"], rec["completion"]))
        elif (msgs := _messages(rec)) is not None:
            examples.append(Example("", "", msgs))
        else:
            problems.append(Problem(where, "record is none of {text}, {prompt, completion}, {messages ending with an "
                                    "assistant turn}", 'use {"text": "..."}, {"prompt": "...", "completion": "..."} or '
                                    '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}]}'))
    if not problems and not examples:
        problems.append(Problem(str(path), "the dataset is empty", "add at least one record"))
    raise_if(problems)
    return Dataset(path=path, sha256=hashlib.sha256(raw).hexdigest(), examples=tuple(examples))


def to_prompt_completion(example: Example, tok) -> tuple[str, str]:
    """(prompt, completion) of an example; chat records go through the tokenizer's chat template.

    A tokenizer without a chat template gets a plain one ("role: content" lines), said in the manifest.
    """
    if not example.messages:
        return example.prompt, example.completion
    msgs = [{"role": r, "content": c} for r, c in example.messages]
    if getattr(tok, "chat_template", None):
        prompt = tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(msgs, tokenize=False)
        if full.startswith(prompt):
            return prompt, full[len(prompt):]
        return prompt, msgs[-1]["content"]
    prompt = "".join(f"{m['role']}: {m['content']}\n" for m in msgs[:-1]) + "assistant:"
    return prompt, " " + msgs[-1]["content"]
