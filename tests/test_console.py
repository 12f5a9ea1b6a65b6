"""The terminal shows stage lines and results; everything else (Python prints, warnings, native writes,
child processes) goes to the log file, and with verbose also to the terminal."""

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import os, subprocess, sys, warnings
    from pathlib import Path
    from lora_export.console import captured

    with captured(Path(sys.argv[1]), verbose=sys.argv[2] == "1") as console:
        console.progress("stage one")
        console.progress("  a detail")
        print("library print")
        warnings.warn("library warning")
        os.write(2, b"native write\\n")
        subprocess.run([sys.executable, "-c", "print('child output')"])
        console.result("THE RESULT")
    print("after the capture")
""")


@pytest.mark.parametrize("verbose", [False, True])
def test_the_terminal_gets_stages_and_results_and_the_log_gets_everything(tmp_path, verbose):
    log = tmp_path / "cmd.log"
    p = subprocess.run([sys.executable, "-c", SCRIPT, str(log), "1" if verbose else "0"], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    terminal = p.stdout + p.stderr
    logged = log.read_text()
    noise = ("library print", "library warning", "native write", "child output")
    for text in ("stage one", "a detail", *noise, "THE RESULT"):
        assert text in logged, text
    assert "stage one" in p.stderr and "] stage one" in p.stderr  # with the elapsed time
    assert "THE RESULT" in p.stdout and "after the capture" in p.stdout  # the terminal is back afterwards
    for text in ("a detail", *noise):
        assert (text in terminal) == verbose, (text, terminal)
    assert terminal.count("stage one") == 1  # shown once, even when the log is also shown live


def test_progress_tells_a_detail_by_its_indent():
    import io

    from lora_export.console import Console

    err, log = io.StringIO(), io.StringIO()
    console = Console(out=io.StringIO(), err=err, log=log)
    console.progress("merging")
    console.progress("  merging shard 1/9")
    assert "merging" in err.getvalue() and "shard" not in err.getvalue() and "shard 1/9" in log.getvalue()
