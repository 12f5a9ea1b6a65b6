"""The CLI contract: 0 success, 1 verdict failed, 2 bad input with a clear message and no traceback."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lora_export.cli import main

from .conftest import EMBEDDED


def run(argv, capsys):
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_targets_list_and_show(capsys):
    rc, out, _ = run(["targets", "list"], capsys)
    assert rc == 0 and "ort-cpu-fp32" in out and "ort-cpu-int4" in out
    rc, out, _ = run(["targets", "show", "ort-cpu-int4"], capsys)
    assert rc == 0 and 'scheme = "int4"' in out


@pytest.mark.parametrize("argv, fragment", [
    (["export", "--base", "/no/such/base", "--adapter", "/no/such/adapter", "--target", "ort-cpu-fp32",
      "--out", "OUT"], "/no/such/base: base model directory not found. Fix:"),
    (["export", "--base", "BASE", "--adapter", "/no/such/adapter", "--target", "ort-cpu-fp32", "--out", "OUT"],
     "/no/such/adapter: adapter directory not found"),
    (["export", "--base", "BASE", "--adapter", "ADAPTER", "--target", "no-such-target", "--out", "OUT"],
     "no-such-target: no such target. Fix: use one of"),
    (["train", "--base", "BASE", "--data", "/no/data.jsonl", "--out", "OUT"], "/no/data.jsonl: dataset file not found"),
    (["validate", "BASE"], "not an export directory"),
    (["bench", "/no/such/export"], "not an export directory"),
    (["targets", "show"], "no target named"),
    (["export", "--base", "BASE"], "the following arguments are required"),
    (["train", "--base", "EMPTY", "--data", "DATA", "--out", "OUT"], "no .safetensors weight files"),
    (["train", "--base", "BASE", "--data", "DATA", "--out", "OUT", "--rank", "0"], "rank must be positive"),
    (["train", "--base", "BASE", "--data", "DATA", "--out", "OUT", "--target-modules", "qkv"],
     "use 'all-linear' or names among: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"),
])
def test_bad_input_exits_2_with_a_message_and_no_traceback(argv, fragment, tiny_base, tiny_adapter, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    subs = {"BASE": str(tiny_base), "ADAPTER": str(tiny_adapter), "OUT": str(tmp_path / "o"),
            "EMPTY": str(tmp_path / "empty"), "DATA": str(EMBEDDED / "demo" / "train.jsonl")}
    argv = [subs.get(a, a) for a in argv]
    try:
        rc, _, err = run(argv, capsys)
    except SystemExit as e:  # argparse usage errors
        rc, err = e.code, capsys.readouterr().err
    assert rc == 2
    assert fragment in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_debug_shows_the_traceback(capsys):
    rc, _, err = run(["--debug", "validate", "/no/such/export"], capsys)
    assert rc == 2 and "Traceback" in err and "BadInput" in err and "not an export directory" in err
    rc, _, err = run(["validate", "/no/such/export", "--debug"], capsys)  # after the command as well
    assert rc == 2 and "Traceback" in err


def test_console_script_exit_code_and_stderr(tmp_path):
    exe = [sys.executable, "-m", "lora_export.cli"]
    p = subprocess.run([*exe, "validate", str(tmp_path)], capture_output=True, text=True)
    assert p.returncode == 2 and "Traceback" not in p.stderr and "Fix:" in p.stderr


def test_train_through_the_cli_writes_a_peft_adapter(tiny_base, tmp_path, capsys):
    """`lora-export train` as typed (4 steps on the tiny base): exit 0, a PEFT adapter and its training manifest."""
    out = tmp_path / "adapter"
    rc, _, err = run(["train", "--base", str(tiny_base), "--data", str(EMBEDDED / "demo" / "train.jsonl"), "--out",
                      str(out), "--steps", "4", "--batch-size", "4"], capsys)
    assert rc == 0, err
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert (out / "adapter_model.safetensors").is_file()
    manifest = json.loads((out / "training_manifest.json").read_text())
    assert manifest["training"]["steps"] == 4 and manifest["kind"] == "qlora" and manifest["quantization"]["quant_type"] == "nf4"


def test_validate_and_bench_on_an_export(fp32_export, tmp_path, capsys):
    rc, out, _ = run(["validate", str(fp32_export.out)], capsys)
    assert rc == 0 and "PASS" in out
    rc, out, _ = run(["bench", str(fp32_export.out), "--json", str(tmp_path / "b.json"), "--rounds", "6",
                      "--plot", str(tmp_path / "b.png"), "--eager"], capsys)
    result = json.loads((tmp_path / "b.json").read_text())
    assert rc == (0 if result["within_budget"] else 1)
    assert result["graphs_identical"] is True  # zero overhead by construction: same graph as the base export
    assert set(result["variants"]) == {"merged", "base", "unmerged", "peft-unmerged"}
    assert result["variants"]["merged"]["decode_ms_median"] > 0
    by_length = result["prompt_ms_by_length"]  # fixed lengths 16, 64, 256, within the tiny base's 128 positions
    assert set(by_length) == {"merged", "base", "unmerged", "peft-unmerged"} and set(by_length["merged"]) == {"16", "64"}
    assert all(ms > 0 for per in by_length.values() for ms in per.values())
    assert "prompt pass ms at length" in out
    assert result["verdict"] in ("zero overhead", "overhead", "inconclusive")
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (fp32_export.out / "bench.md").is_file() and "merged/base" in out and "| unmerged |" in out


def test_example_ci_workflow_uses_real_commands():
    """Every lora-export command in the example CI workflow parses with the real CLI."""
    import shlex
    from pathlib import Path

    import yaml

    from lora_export.cli import build_parser

    workflow = Path(__file__).resolve().parents[1] / "examples" / "ci" / "parity-gate.yml"
    steps = yaml.safe_load(workflow.read_text())["jobs"]["parity"]["steps"]
    commands = [s["run"] for s in steps if "lora-export " in s.get("run", "") and "pip install" not in s["run"]]
    assert len(commands) == 2
    for command in commands:
        argv = shlex.split(command.replace("${{ matrix.target }}", "ort-cpu-int4"))
        assert argv[0] == "lora-export"
        build_parser().parse_args(argv[1:])  # exits 2 on an unknown flag


def _commands():
    import argparse

    from lora_export.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, sub.choices


def test_every_option_has_help_and_shows_its_default(capsys):
    import argparse

    parser, commands = _commands()
    for name, command in [("lora-export", parser), *commands.items()]:
        for action in command._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert action.help, f"{name} {action.option_strings or action.dest} has no help text"
        text = command.format_help()
        for action in command._actions:
            if (action.option_strings and action.default not in (None, argparse.SUPPRESS)
                    and not isinstance(action.default, bool)):
                assert f"(default: {action.default})" in " ".join(text.split()), (name, action.option_strings)


def test_version_names_the_packages(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith("lora-export 0.") and "torch " in out and "onnxruntime" in out


def test_usage_error_names_the_program_once(capsys):
    for argv, prog in ((["--no-such-flag"], "lora-export"), (["export", "--base"], "lora-export export")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"see `{prog} --help`" in err and "lora-export lora-export" not in err


def test_an_internal_error_exits_3_with_the_log_path(tiny_base, tiny_adapter, tmp_path, capsys, monkeypatch):
    """A bug (an exception that is not ours) never reads as a verdict (1) nor as the user's fault (2)."""
    import lora_export.pipeline as pipeline

    def broken(*a, **k):
        raise ZeroDivisionError("injected")

    monkeypatch.setattr(pipeline, "check_free_disk", broken)
    argv = ["export", "--base", str(tiny_base), "--adapter", str(tiny_adapter), "--target", "ort-cpu-fp32",
            "--out", str(tmp_path / "o")]
    rc, _, err = run(argv, capsys)
    assert rc == 3 and "internal error: ZeroDivisionError: injected" in err and "Traceback" not in err
    log = Path(re.search(r"The full log is (\S+);", err).group(1))
    assert "ZeroDivisionError" in log.read_text() and "--debug" in err  # the traceback is kept in the log
    log.unlink()
    rc, _, err = run(["--debug", *argv], capsys)
    assert rc == 3 and "Traceback" in err and "ZeroDivisionError" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_a_toolchain_failure_exits_3(tiny_base, tiny_adapter, tmp_path, capsys, monkeypatch):
    """The graph builder failing is the toolchain's failure, not bad input: exit 3, naming the builder's log."""
    import lora_export.export.genai_builder as builder

    # the real builder, fed a broken option
    monkeypatch.setattr(builder, "builder_ep", lambda target: "no-such-provider")
    rc, _, err = run(["export", "--base", str(tiny_base), "--adapter", str(tiny_adapter), "--target", "ort-cpu-fp32",
                      "--out", str(tmp_path / "o")], capsys)
    assert rc == 3 and "the toolchain failed: the onnxruntime-genai builder failed" in err, err
    assert "The full log is" in err and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_quiet_by_default_and_the_log_keeps_the_rest(fp32_export, capsys):
    """validate prints stage lines and the report; library output goes to validate.log in the export."""
    rc, out, err = run(["validate", str(fp32_export.out)], capsys)
    assert rc == 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert all(line.startswith("[") or line.startswith("log: ") for line in lines), lines
    log = fp32_export.out / "validate.log"
    assert f"log: {log}" in err and "parity: the reference generates" in log.read_text()
