"""JSONL data: both record shapes load; bad lines are reported with file and line number, all at once."""

import pytest

from lora_export.data import load_jsonl
from lora_export.errors import BadInput


def test_text_and_prompt_completion(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "hello"}\n\n{"prompt": "Q:", "completion": " A"}\n')
    ds = load_jsonl(f)
    assert [(e.prompt, e.completion) for e in ds.examples] == [("", "hello"), ("Q:", " A")]
    assert len(ds.sha256) == 64


def test_bad_lines_all_reported_with_line_numbers(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "ok"}\n{not json\n{"question": "?"}\n')
    with pytest.raises(BadInput) as e:
        load_jsonl(f)
    wheres = [p.where for p in e.value.problems]
    assert wheres == [f"{f}:2", f"{f}:3"]


@pytest.mark.parametrize("content", ["", "\n\n"])
def test_empty_dataset(tmp_path, content):
    f = tmp_path / "d.jsonl"
    f.write_text(content)
    with pytest.raises(BadInput, match="empty"):
        load_jsonl(f)


def test_missing_dataset(tmp_path):
    with pytest.raises(BadInput, match="not found"):
        load_jsonl(tmp_path / "nope.jsonl")
