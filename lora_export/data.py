"""Training and evaluation data: JSONL with ``{"text"}`` or ``{"prompt", "completion"}`` records.

Every bad line is reported with its file and line number, all at once, before any training starts.
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


@dataclass(frozen=True)
class Dataset:
    path: Path
    sha256: str
    examples: tuple[Example, ...]


def load_jsonl(path: str | Path) -> Dataset:
    path = Path(path)
    if not path.is_file():
        raise BadInput.one(str(path), "dataset file not found", "pass an existing .jsonl file with --data")
    raw = path.read_bytes()
    problems: list[Problem] = []
    examples: list[Example] = []
    for lineno, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(Problem(where, f"not valid JSON ({e.msg})", "write one JSON object per line"))
            continue
        if isinstance(rec, dict) and isinstance(rec.get("text"), str) and rec["text"]:
            examples.append(Example("", rec["text"]))
        elif isinstance(rec, dict) and isinstance(rec.get("prompt"), str) and isinstance(rec.get("completion"), str) \
                and rec["completion"]:
            examples.append(Example(rec["prompt"], rec["completion"]))
        else:
            problems.append(Problem(where, "record has neither a non-empty 'text' nor 'prompt' + 'completion'",
                                    'use {"text": "..."} or {"prompt": "...", "completion": "..."}'))
        if len(problems) >= 20:
            problems.append(Problem(str(path), "stopped after 20 bad lines", "fix these and run again"))
            break
    if not problems and not examples:
        problems.append(Problem(str(path), "the dataset is empty", "add at least one record"))
    raise_if(problems)
    return Dataset(path=path, sha256=hashlib.sha256(raw).hexdigest(), examples=tuple(examples))
