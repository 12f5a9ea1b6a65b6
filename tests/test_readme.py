"""README stays true: every file it names exists, every `pytest` command it cites selects tests, every
`python benchmarks/...` script exists, and every `lora-export` option it shows is one the CLI has."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from lora_export.cli import build_parser

from .conftest import tiered

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
CODE = re.findall(r"`([^`\n]+)`", README) + [line for block in re.findall(r"```[a-z]*\n(.*?)```", README, re.S)
                                             for line in block.splitlines()]


def _paths() -> list[str]:
    return sorted({m for m in re.findall(r"\b((?:tests|benchmarks|lora_export|targets|examples)/[\w./-]*\w)", README)})


def _pytest_commands() -> list[str]:
    return sorted({c.strip() for c in CODE if re.match(r"\s*(python -m )?pytest\b", c)})


def _benchmark_commands() -> list[str]:
    return sorted({c.strip() for c in CODE if c.strip().startswith("python benchmarks/")})


def test_readme_names_files():  # the extraction itself finds what it should
    assert "tests/test_tolerances.py" in _paths() and len(_pytest_commands()) >= 5 and len(_benchmark_commands()) >= 5


@pytest.mark.parametrize("path", _paths())
def test_every_path_in_readme_exists(path):
    assert (ROOT / path).exists(), f"README names {path}, which does not exist"


@pytest.mark.parametrize("command", _benchmark_commands())
def test_every_benchmark_command_names_a_script(command):
    script = shlex.split(command)[1]
    assert (ROOT / script).is_file(), f"README runs `{command}`; {script} does not exist"


_CITED = [c for c in _pytest_commands() if c != "python -m pytest"]


@pytest.mark.parametrize("command", tiered(_CITED, _CITED, slow=set(_CITED[1:])))  # each starts a pytest: seconds
def test_every_pytest_command_selects_tests(command):
    words = shlex.split(command)
    words = words[3:] if words[:3] == ["python", "-m", "pytest"] else words[1:]  # keep a `-m MARKER` of its own
    args = [a for a in words if a != "-s"]
    p = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, f"README cites `{command}`, which selects nothing or fails:\n{p.stdout[-1500:]}"
    assert re.search(r"^\d+(/\d+)? tests? collected", p.stdout, re.M), p.stdout[-1500:]


def _subcommands():
    parser = build_parser()
    action = next(a for a in parser._actions if hasattr(a, "choices") and isinstance(a.choices, dict))
    return action.choices


def test_every_lora_export_option_in_readme_exists():
    subs = _subcommands()
    usage = README[README.index("## Command line"):]
    usage = usage[usage.index("```") + 3:]
    usage = usage[:usage.index("```")]  # the usage block
    assert re.search(r"^lora-export \[--version\] \[-v\] \[--debug\]", usage, re.M)
    shown = re.findall(r"^lora-export (\w+)(.*?)(?=^lora-export |\Z)", usage, re.M | re.S)
    assert {name for name, _ in shown} == set(subs), "README's command list differs from the CLI's commands"
    for name, text in shown:
        known = {s for a in subs[name]._actions for s in a.option_strings}
        for option in re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", text):
            assert option in known, f"README shows `lora-export {name} {option}`, which the CLI does not have"
